"""Validation and quarantine of incoming web shards and human annotations.

Bad input is never fatal and never silent: every sample that cannot be used is skipped,
counted by reason in ``stats.json`` and listed in ``quarantine.jsonl``. The reasons are the
stable strings of :data:`REASONS`. The same checks (:func:`validate_sample`,
:func:`decode_image`, :func:`clean_caption`) are used by the training datasets, so what
ingest keeps is exactly what training can read.

Decisions worth knowing:

- A ``.json`` member that is not a JSON object quarantines the sample (``bad_json``):
  img2dataset always writes valid JSON, so a broken one means a corrupt write, and the JSON
  carries the provenance (url, sha256) the lineage relies on. So does one that cannot be
  written back (nested too deeply, a lone surrogate, ``url``/``status`` not strings). A
  missing ``.json`` is fine (plain webdataset pairs) and a fresh one is written.
- Captions: a leading BOM is dropped and runs of whitespace (tabs, newlines, ...) collapse to
  one space; any other C0/C1 control character rejects the caption (``control_characters``),
  since it signals binary junk or terminal escapes and stripping would silently change it.
  Unicode format characters (right-to-left marks, zero-width joiners) are kept: right-to-left
  and other scripts are valid captions. A lone surrogate (possible through a JSON ``\\ud800``
  escape in an annotation file) cannot be written as UTF-8: ``non_utf8_caption``.
- Hashes mean what their producer says. img2dataset's ``sha256`` (or ``md5``) is the hash of
  the bytes it downloaded, before it resized or re-encoded them, so it cannot be checked
  against the stored image and is kept as it is. Our own ``stored_sha256`` (the hash of the
  image bytes in the shard, written by :class:`~blip_core.data.formats.ShardWriter`) is
  checked when present (``checksum_mismatch``) and recomputed for what ingest writes.
- Images in any mode PIL decodes (CMYK, P, LA, RGBA, I;16, ...) are valid: they are
  converted to RGB (alpha composited on white) and re-encoded as JPEG. RGB JPEGs keep their
  original bytes.
- Duplicate keys: the first occurrence of a key (across all shards of one ingest) is judged
  on its own, good or bad; every later occurrence is quarantined as ``duplicate_key``.
- A truncated shard keeps the samples before the cut; the sample being read and every sample
  the parquet beside the shard lists past the cut are ``truncated_tar``, one record each.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from blip_core.data.formats import (
    MAX_MEMBER_BYTES,
    SPLITS,
    STORED_HASH,
    HumanImage,
    RawSample,
    Rejection,
    Sample,
    ShardWriter,
    iter_shard,
    list_shards,
    load_karpathy_entries,
    output_schema,
    write_karpathy,
)
from blip_core.errors import UsageError
from blip_core.io import atomic_dir, atomic_write_json, safe_member_path, sha256_bytes

log = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    # images
    "missing_image": "no image member in the sample / image file not found or not a regular file",
    "empty_image": "the image has zero bytes",
    "undecodable_image": "PIL cannot open or fully decode the image (corrupt, truncated, unsupported format)",
    "image_too_large": "declared pixel count above IngestConfig.max_pixels (checked from the "
    "header, before decoding)",
    "image_too_small": "shorter side below IngestConfig.min_side",
    "checksum_mismatch": "the image bytes do not match the stored_sha256 recorded in the sample's .json",
    # captions
    "missing_caption": "no .txt member in the sample / caption is not a string",
    "empty_caption": "caption empty after whitespace normalisation",
    "caption_too_long": "caption longer than IngestConfig.max_caption_chars",
    "non_utf8_caption": "caption bytes are not valid UTF-8 (or the text holds a lone surrogate)",
    "control_characters": "caption contains C0/C1 control characters other than whitespace",
    # metadata and annotation entries
    "bad_json": "the .json member is not a JSON object, is nested too deeply, holds a lone "
    "surrogate, or has a non-string 'url'/'status'",
    "missing_field": "annotation entry lacks 'image', 'caption' or 'split', is not an object, "
    "or its image_id is not valid Unicode; a COCO annotation whose image_id is not in 'images'",
    "invalid_split": "annotation split not one of train/val/test (restval counts as train)",
    # archive structure
    "unsafe_member_name": "absolute path, '..', key outside [A-Za-z0-9_-/], or an image path "
    "that resolves (through symlinks) outside the image root",
    "unsafe_member_type": "tar member is a link, device or fifo, not a regular file",
    "duplicate_key": "key (or image) already seen; second and later occurrences are rejected",
    "stray_member": "tar member without an extension, not part of any sample",
    "member_too_large": "tar member or image file above IngestConfig.max_member_bytes (not read)",
    "truncated_tar": "the archive ends early: the sample being read, and each sample the shard's "
    "parquet lists past the cut",
    "unreadable_tar": "the file is not a tar archive: each sample its parquet lists (or one record)",
}
"""Every quarantine reason, with its meaning. Keys are stable snake_case strings."""

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions accepted in shards, in order of preference."""

_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
"""Decoders PIL may use: a closed list keeps rarely exercised decoders away from web data."""

_CONTROL = frozenset(
    [chr(c) for c in range(0x00, 0x20) if chr(c) not in "\t\n\v\f\r"]
    + ["\x7f"]
    + [chr(c) for c in range(0x80, 0xA0) if c != 0x85]  # NEL (0x85) is a line break
)


@dataclass(frozen=True)
class IngestConfig:
    """Limits applied to every sample."""

    max_pixels: int = 40_000_000  # width * height above this is image_too_large (~ 8K x 5K)
    min_side: int = 8  # shorter image side below this is image_too_small
    max_caption_chars: int = 1000  # longer captions are caption_too_long (BLIP keeps 30 words)
    max_member_bytes: int = MAX_MEMBER_BYTES  # tar members above this are never read
    jpeg_quality: int = 95  # quality when an image has to be re-encoded
    verify_stored_hash: bool = True  # check image bytes against the .json "stored_sha256" if any


DEFAULT_CONFIG = IngestConfig()
"""The limits used when none are given."""


class InvalidSample(ValueError):
    """Raised by the checks; carries a :data:`REASONS` key and a detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class ValidSample:
    """A sample that passed every check."""

    key: str  # sample key
    image: Image.Image  # decoded, RGB
    jpg: bytes  # JPEG bytes to store: the original ones when already an RGB JPEG
    caption: str  # normalised caption
    meta: dict[str, Any]  # the sample's .json fields (empty when it had none)


@dataclass
class IngestStats:
    """Counts of one ingest run, as written to ``stats.json``."""

    kept: int = 0  # samples (web) or images (human) written
    quarantined: int = 0  # entries in quarantine.jsonl counted against samples/images
    by_reason: dict[str, int] = field(default_factory=dict)  # quarantined per reason
    sources: dict[str, dict[str, int]] = field(default_factory=dict)  # per shard / file
    captions_dropped: dict[str, int] = field(default_factory=dict)  # human: bad captions dropped
    splits: dict[str, int] = field(default_factory=dict)  # human: images kept per split
    producer_status: dict[str, int] = field(default_factory=dict)  # web: producer's parquet rows
    # per status ("success", "failed_to_download", ...): what img2dataset tried, before ingest

    def to_json(self) -> dict[str, Any]:
        """The ``stats.json`` content."""
        out: dict[str, Any] = {
            "kept": self.kept,
            "quarantined": self.quarantined,
            "by_reason": dict(sorted(self.by_reason.items())),
            "sources": self.sources,
        }
        if self.producer_status:
            out["producer_status"] = self.producer_status
        if self.splits:
            out["splits"] = self.splits
            out["captions_dropped"] = dict(sorted(self.captions_dropped.items()))
        return out


def quarantine_ratio(stats: dict[str, Any]) -> float:
    """Share of a ``stats.json``'s samples that were quarantined (0.0 when it saw none: an empty
    shard is caught by its own check, not by this ratio)."""
    total = stats["kept"] + stats["quarantined"]
    return stats["quarantined"] / total if total else 0.0


# --------------------------------------------------------------------------------------------
# Checks


def to_rgb(im: Image.Image) -> Image.Image:
    """Converts a decoded image of any PIL mode to RGB (alpha composited on white)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, cfg: IngestConfig = DEFAULT_CONFIG) -> tuple[Image.Image, bool]:
    """Checks and fully decodes an encoded image.

    The pixel count is checked from the header before any decoding, so a small file declaring
    50000x50000 pixels costs nothing.

    Args:
        data: Encoded image bytes.
        cfg: Limits.

    Returns:
        ``(rgb_image, reusable)``: the decoded RGB image, and whether ``data`` is already an RGB
        JPEG whose bytes can be stored unchanged.

    Raises:
        InvalidSample: ``empty_image``, ``undecodable_image``, ``image_too_large`` or
            ``image_too_small``.
    """
    if not data:
        raise InvalidSample("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            im = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types on garbage input
        raise InvalidSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > cfg.max_pixels:
        raise InvalidSample("image_too_large", f"{w}x{h} > {cfg.max_pixels} pixels")
    if min(w, h) < cfg.min_side:
        raise InvalidSample("image_too_small", f"{w}x{h}, min side {cfg.min_side}")
    try:
        im.load()
        reusable = im.format == "JPEG" and im.mode == "RGB"
        rgb = to_rgb(im)
    except Exception as e:
        raise InvalidSample("undecodable_image", f"{type(e).__name__}: {e}") from None
    return rgb, reusable


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    """Encodes an RGB image as JPEG."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def clean_caption(text: str, cfg: IngestConfig = DEFAULT_CONFIG) -> str:
    """Checks and normalises a decoded caption (see the module docstring for the policy).

    Raises:
        InvalidSample: ``control_characters``, ``empty_caption`` or ``caption_too_long``.
    """
    text = text.removeprefix("\ufeff")
    if not _utf8(text):
        raise InvalidSample("non_utf8_caption", "lone surrogate")
    bad = next((c for c in text if c in _CONTROL), None)
    if bad is not None:
        raise InvalidSample("control_characters", f"contains {bad!r}")
    text = " ".join(text.split())
    if not any(c.isprintable() and not c.isspace() for c in text):
        raise InvalidSample("empty_caption", "no visible characters")
    if len(text) > cfg.max_caption_chars:
        raise InvalidSample("caption_too_long", f"{len(text)} > {cfg.max_caption_chars} chars")
    return text


def decode_caption(raw: bytes, cfg: IngestConfig = DEFAULT_CONFIG) -> str:
    """Decodes (strict UTF-8), checks and normalises a ``.txt`` member.

    Raises:
        InvalidSample: ``caption_too_long``, ``non_utf8_caption`` or a :func:`clean_caption` reason.
    """
    if len(raw) > 4 * cfg.max_caption_chars:  # cannot fit even at 4 bytes per character
        raise InvalidSample("caption_too_long", f"{len(raw)} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidSample("non_utf8_caption", str(e)) from None
    return clean_caption(text, cfg)


def parse_meta(raw: bytes) -> dict[str, Any]:
    """Parses and checks a ``.json`` member: an object that can be written back as it is.

    Raises:
        InvalidSample: ``bad_json``.
    """
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, > 4300-digit ints, deep nesting
        raise InvalidSample("bad_json", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise InvalidSample("bad_json", f"top level is {type(meta).__name__}")
    for name in ("url", "status"):  # parquet string columns
        if not isinstance(meta.get(name), str | None):
            raise InvalidSample("bad_json", f"{name!r} is {type(meta[name]).__name__}, not a string")
    # Strict UTF-8 bytes decode to no lone surrogate: only a \u escape can make one.
    if b"\\u" in raw and not _utf8(json.dumps(meta, ensure_ascii=False)):
        raise InvalidSample("bad_json", "lone surrogate in a string")
    return meta


_MEMBER_OF: dict[str, str | None] = {
    "missing_image": None,
    "missing_caption": None,
    "bad_json": "json",
    "non_utf8_caption": "txt",
    "control_characters": "txt",
    "empty_caption": "txt",
    "caption_too_long": "txt",
}  # which member a rejection points at (default: the image)


def validate_sample(raw: RawSample, cfg: IngestConfig = DEFAULT_CONFIG) -> ValidSample | Rejection:
    """Runs every per-sample check on a sample read from a shard.

    Args:
        raw: The sample's members.
        cfg: Limits.

    Returns:
        A :class:`ValidSample`, or a :class:`Rejection` naming the first failed check.
    """
    image_ext = next((e for e in IMAGE_EXTS if e in raw.files), None)
    try:
        if image_ext is None:
            raise InvalidSample("missing_image", f"members: {sorted(raw.files)}")
        if "txt" not in raw.files:
            raise InvalidSample("missing_caption", f"members: {sorted(raw.files)}")
        meta = parse_meta(raw.files["json"]) if "json" in raw.files else {}
        caption = decode_caption(raw.files["txt"], cfg)
        data = raw.files[image_ext]
        recorded = meta.get(STORED_HASH)
        if cfg.verify_stored_hash and isinstance(recorded, str) and data:
            actual = sha256_bytes(data)
            if actual != recorded.lower():
                raise InvalidSample("checksum_mismatch", f"{STORED_HASH} {actual} != {recorded}")
        image, reusable = decode_image(data, cfg)
    except InvalidSample as e:
        return Rejection(raw.key, raw.source(_MEMBER_OF.get(e.reason, image_ext)), e.reason, e.detail)
    jpg = data if reusable else encode_jpeg(image, cfg.jpeg_quality)
    return ValidSample(raw.key, image, jpg, caption, meta)


def iter_valid(shards: list[Path], cfg: IngestConfig = DEFAULT_CONFIG) -> Iterator[ValidSample | Rejection]:
    """Streams validated samples of several shards, rejecting duplicate keys across them."""
    seen: set[str] = set()
    for shard in shards:
        yield from iter_valid_shard(shard, cfg, seen)


def iter_valid_shard(shard: Path, cfg: IngestConfig, seen: set[str]) -> Iterator[ValidSample | Rejection]:
    """Validated samples of one shard; ``seen`` holds keys from earlier shards (updated)."""
    for item in iter_shard(shard, cfg.max_member_bytes):
        if isinstance(item, Rejection):
            if item.key:  # a rejected first occurrence still claims its key
                seen.add(item.key)
            yield item
        elif item.key in seen:
            yield Rejection(item.key, item.source(), "duplicate_key", "key seen before")
        else:
            seen.add(item.key)
            yield validate_sample(item, cfg)


# --------------------------------------------------------------------------------------------
# Web shards


class _Quarantine:
    """Appends quarantine records and keeps the counts."""

    def __init__(self, path: Path, stats: IngestStats) -> None:
        self.f = open(path, "w", encoding="utf-8")  # closed by close()
        self.stats = stats
        self.by_reason: Counter[str] = Counter()

    def add(self, rejection: Rejection, counted: bool = True, **extra: Any) -> None:
        if rejection.reason not in REASONS:
            raise KeyError(f"undocumented reason {rejection.reason!r}")
        record = {**rejection.to_json(), **extra}
        line = json.dumps(record, ensure_ascii=False)
        if not _utf8(line):  # lone surrogates (undecodable tar names): \u escapes
            line = json.dumps(record)
        self.f.write(line + "\n")
        if counted:
            self.by_reason[rejection.reason] += 1
            self.stats.quarantined += 1

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.stats.by_reason = dict(sorted(self.by_reason.items()))


SOURCE_HINT = "give a folder of img2dataset .tar shards, one .tar, or an annotations .json"
"""What an ingest source is, for error messages."""


def _source_shards(src: Path) -> list[Path]:
    """The shards of a web source: the ``.tar`` files of a folder, or one ``.tar``.

    Raises:
        FileNotFoundError: If ``src`` does not exist.
        UsageError: If ``src`` is a folder without ``.tar`` files or a file that is not a ``.tar``.
    """
    if src.is_dir():
        shards = list_shards(src)
        if not shards:
            raise UsageError(f"{src} holds no .tar shards; {SOURCE_HINT}")
        return shards
    if src.is_file():
        if src.suffix.lower() != ".tar":
            why = " (the parquet beside a shard only lists its samples)" if src.suffix == ".parquet" else ""
            raise UsageError(f"{src} is not a .tar shard{why}; {SOURCE_HINT}")
        return [src]
    raise FileNotFoundError(f"{src} does not exist; {SOURCE_HINT}")


def ingest(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: IngestConfig = DEFAULT_CONFIG,
) -> IngestStats:
    """Validates web shards, writing the good samples and quarantining the rest.

    Output (appears at once, replacing an older ``out``): one shard per input shard with the
    same name (``.tar`` + ``.parquet``, only good samples; shards left empty are not written),
    ``quarantine.jsonl`` (one ``{"key", "source", "reason", "detail"}`` per rejection) and
    ``stats.json`` (``{"kept", "quarantined", "by_reason", "sources", "producer_status"}``;
    the last counts the producer's parquet rows per status, failed downloads included: they
    were never samples and are not quarantined). A kept sample keeps every field of its
    ``.json`` and every column of its parquet row with its type; ``stored_sha256`` is added.
    Memory stays bounded by one sample plus one shard's parquet rows.

    Args:
        src: A folder of ``*.tar`` shards, or one tar file.
        out: Output folder.
        cfg: Limits.

    Returns:
        The counts written to ``stats.json``.
    """
    src, out = Path(src), Path(out)
    shards = _source_shards(src)
    stats = IngestStats()
    with atomic_dir(out) as tmp:
        quarantine = _Quarantine(tmp / "quarantine.jsonl", stats)
        seen: set[str] = set()
        producer: Counter[str] = Counter()  # the producer's parquet rows per status
        bar = tqdm(desc=f"ingest {src.name}", unit="sample", disable=None)
        try:
            for shard in shards:
                counts = {"kept": 0, "quarantined": 0}
                schema, rows, status = _producer_rows(shard)
                producer.update(status)
                with contextlib.ExitStack() as stack:
                    writer: ShardWriter | None = None  # opened at the first good sample
                    for item in iter_valid_shard(shard, cfg, seen):
                        bar.update()
                        if isinstance(item, Rejection):
                            quarantine.add(item)
                            counts["quarantined"] += 1
                            continue
                        if writer is None:
                            writer = stack.enter_context(
                                ShardWriter(tmp / f"{shard.stem}.tar", output_schema(schema)))
                        writer.write(_output_sample(item), rows.get(item.key))
                        counts["kept"] += 1
                stats.kept += counts["kept"]
                stats.sources[shard.name] = {**counts, "producer_status": dict(sorted(status.items()))} \
                    if status else counts
        finally:
            bar.close()
            quarantine.close()
        stats.producer_status = dict(sorted(producer.items()))
        atomic_write_json(tmp / "stats.json", stats.to_json())
    _log_summary(out, stats)
    return stats


def _output_sample(item: ValidSample) -> Sample:
    """The sample to write: the producer's .json fields as they are (its ``sha256`` included),
    the checked caption and image; the writer adds our :data:`STORED_HASH`."""
    meta = {k: v for k, v in item.meta.items() if k not in ("key", "caption", STORED_HASH)}
    if "width" not in meta or "height" not in meta:
        meta["width"], meta["height"] = item.image.size
    return Sample(item.key, item.jpg, item.caption, meta)


def _producer_rows(shard: Path) -> tuple[pa.Schema | None, dict[str, dict[str, Any]], Counter[str]]:
    """The parquet beside a shard: its schema, its rows by key, and its rows per ``status``.

    A missing or unreadable parquet gives ``(None, {}, {})``: the samples' .json fields are
    written instead.
    """
    try:
        table = pq.read_table(shard.with_suffix(".parquet"))
    except Exception:  # missing or unreadable: pyarrow raises several types
        return None, {}, Counter()
    rows = table.to_pylist()
    by_key = {r["key"]: r for r in rows if isinstance(r.get("key"), str)}
    status = Counter(str(r.get("status")) for r in rows)
    return table.schema, by_key, status


def _log_summary(out: Path, stats: IngestStats) -> None:
    if stats.quarantined:
        log.warning(
            "%s: kept %d, quarantined %d %s (see quarantine.jsonl)",
            out,
            stats.kept,
            stats.quarantined,
            stats.by_reason,
        )
    else:
        log.info("%s: kept %d, quarantined 0", out, stats.kept)


# --------------------------------------------------------------------------------------------
# Human (Karpathy JSON) annotations


@dataclass
class _Entry:
    index: int  # first entry index in the file
    image: str
    split: str
    image_id: str
    captions: list[Any]


def _parse_entries(entries: list[Any], source: str, quarantine: _Quarantine) -> list[_Entry]:
    """Field checks and grouping by image (repeated entries of one image merge)."""
    by_image: dict[str, _Entry] = {}
    ids: dict[str, str] = {}
    for i, e in enumerate(entries):
        where = f"{source}:{i}"
        key = str(e.get("image_id") or e.get("image") or i) if isinstance(e, dict) else str(i)
        if not isinstance(e, dict):
            quarantine.add(Rejection(key, where, "missing_field", "entry is not an object"))
            continue
        missing = [f for f in ("image", "caption", "split") if e.get(f) in (None, "")]
        if missing or not isinstance(e["image"], str):
            detail = e.get("problem") or f"missing {missing or 'image'}"  # problem: the reader's why
            quarantine.add(Rejection(key, where, "missing_field", detail))
            continue
        split = "train" if e["split"] == "restval" else e["split"]
        if split not in SPLITS:
            quarantine.add(Rejection(key, where, "invalid_split", f"split {e['split']!r}"))
            continue
        captions = [e["caption"]] if isinstance(e["caption"], str) else e["caption"]
        if not isinstance(captions, list):
            quarantine.add(Rejection(key, where, "missing_caption", "caption is not a list"))
            continue
        image_id = str(e.get("image_id") or Path(e["image"]).stem)
        if not _utf8(image_id):
            quarantine.add(Rejection(key, where, "missing_field", "image_id holds a lone surrogate"))
            continue
        prev = by_image.get(e["image"])
        if prev is not None:
            if prev.split != split:
                detail = f"image already in split {prev.split!r} (entry {prev.index})"
                quarantine.add(Rejection(key, where, "duplicate_key", detail))
            else:
                prev.captions.extend(captions)
            continue
        if image_id in ids:
            detail = f"image_id also used by {ids[image_id]}"
            quarantine.add(Rejection(key, where, "duplicate_key", detail))
            continue
        ids[image_id] = e["image"]
        by_image[e["image"]] = _Entry(i, e["image"], split, image_id, list(captions))
    return list(by_image.values())


def read_image_file(root: Path, name: str, cfg: IngestConfig = DEFAULT_CONFIG) -> bytes:
    """Reads the image file an annotation names, confined to ``root``, within the size limit.

    Raises:
        InvalidSample: ``unsafe_member_name`` (absolute, ``..``, not valid Unicode, or resolving
            outside ``root``), ``missing_image`` (absent, unreadable, or not a regular file: a
            fifo would block) or ``member_too_large``.
    """
    try:
        path = safe_member_path(root, name)
    except ValueError as e:
        raise InvalidSample("unsafe_member_name", str(e)) from None
    if not path.is_file():
        raise InvalidSample("missing_image", f"{name} is not a file under {root}")
    try:
        size = path.stat().st_size
        if size > cfg.max_member_bytes:
            raise InvalidSample("member_too_large", f"{size} bytes > limit {cfg.max_member_bytes}")
        return path.read_bytes()
    except OSError as e:
        raise InvalidSample("missing_image", f"cannot read {name}: {e}") from None


def ingest_human(
    ann_json: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    cfg: IngestConfig = DEFAULT_CONFIG,
    default_split: str | None = None,
) -> IngestStats:
    """Validates a Karpathy-split annotation file and its images.

    Output (appears at once): ``out/annotations.json`` with the good images (paths unchanged,
    image files copied to the same relative paths under ``out``), ``quarantine.jsonl`` and
    ``stats.json``. The unit counted in ``kept``/``quarantined`` is an image; bad captions of
    a kept image are dropped, listed in the quarantine file with ``"caption_index"``, and
    counted in ``captions_dropped``. An image left with no good caption is quarantined with
    the reason of its first bad caption.

    Args:
        ann_json: The annotation file: list layout, Karpathy's ``dataset_coco.json`` or COCO's
            ``captions_*.json`` (see :func:`~blip_core.data.formats.load_karpathy_entries`).
        image_root: Folder the ``image`` paths are relative to (default: the file's folder;
            for COCO, the split's image folder such as ``train2017/``).
        out: Output folder.
        cfg: Limits.
        default_split: Split of entries without one (COCO's layout has none; default: the
            split its file name names).

    Returns:
        The counts written to ``stats.json``.

    Raises:
        ValueError: If the file itself is not JSON of an accepted layout (not a per-sample
            problem): a :class:`~blip_core.errors.UsageError` naming what is missing.
        NotADirectoryError: If the image root is not a folder.
    """
    ann_json, out = Path(ann_json), Path(out)
    root = Path(image_root) if image_root is not None else ann_json.parent
    entries = load_karpathy_entries(ann_json, default_split)
    if not root.is_dir():
        raise NotADirectoryError(f"image root {root} is not a folder; give the folder the image "
                                 "paths of the annotations are relative to")
    stats = IngestStats()
    dropped: Counter[str] = Counter()
    kept: list[HumanImage] = []
    with atomic_dir(out) as tmp:
        quarantine = _Quarantine(tmp / "quarantine.jsonl", stats)
        try:
            for entry in tqdm(
                _parse_entries(entries, ann_json.name, quarantine),
                desc=f"ingest {ann_json.name}",
                unit="image",
                disable=None,
            ):
                where = f"{ann_json.name}:{entry.index}"
                try:
                    data = read_image_file(root, entry.image, cfg)
                    decode_image(data, cfg)
                except InvalidSample as e:
                    quarantine.add(Rejection(entry.image_id, where, e.reason, e.detail))
                    continue
                good, bad = _check_captions(entry, where, cfg)
                if not good:
                    reason, detail = (
                        (bad[0][1].reason, bad[0][1].detail) if bad else ("missing_caption", "no captions")
                    )
                    quarantine.add(Rejection(entry.image_id, where, reason, detail))
                    continue
                for index, rejection in bad:
                    quarantine.add(rejection, counted=False, caption_index=index)
                    dropped[rejection.reason] += 1
                dest = tmp / entry.image
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)  # the bytes checked, not the file again
                kept.append(HumanImage(entry.image, tuple(good), entry.split, entry.image_id))
        finally:
            quarantine.close()
        stats.kept = len(kept)
        stats.captions_dropped = dict(sorted(dropped.items()))
        stats.sources = {ann_json.name: {"kept": stats.kept, "quarantined": stats.quarantined}}
        stats.splits = {s: sum(im.split == s for im in kept) for s in SPLITS}
        write_karpathy(tmp / "annotations.json", kept)
        atomic_write_json(tmp / "stats.json", stats.to_json())
    _log_summary(out, stats)
    return stats


def _check_captions(
    entry: _Entry, where: str, cfg: IngestConfig
) -> tuple[list[str], list[tuple[int, Rejection]]]:
    """Cleans each caption of an entry: (good captions, [(index, rejection), ...])."""
    good: list[str] = []
    bad: list[tuple[int, Rejection]] = []
    for i, caption in enumerate(entry.captions):
        try:
            if not isinstance(caption, str):
                raise InvalidSample("missing_caption", f"caption is {type(caption).__name__}")
            good.append(clean_caption(caption, cfg))
        except InvalidSample as e:
            bad.append((i, Rejection(f"{entry.image_id}#{i}", where, e.reason, e.detail)))
    return good, bad

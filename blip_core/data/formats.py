"""Readers and writers for the two on-disk formats of DESIGN.md section 4.

- Web pairs: webdataset tar shards exactly as img2dataset writes them: ``{shard:05d}.tar``
  holding ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per sample, and a
  ``{shard:05d}.parquet`` beside it with one row per sample.
- Human pairs: COCO Karpathy-split JSON, a list of
  ``{"image": relative path, "caption": [str, ...], "split": "train"|"val"|"test",
  "image_id": str}``.

Shards are read by streaming over tar headers, one sample at a time, without extracting
anything to disk. Problems are yielded as :class:`Rejection` values, never raised; the reason
strings are documented in :data:`blip_core.data.ingest.REASONS`.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from blip_core.io import atomic_file, atomic_write_json, sha256_bytes

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
"""Keys we read and write: relative, no dots (webdataset splits the extension at the first dot)."""

MAX_MEMBER_BYTES = 64 << 20
"""Default limit on one tar member; larger members are skipped without being read."""

SPLITS = ("train", "val", "test")

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("status", pa.string()),
        ("sha256", pa.string()),
    ]
)
"""Columns of the parquet file written beside each shard (a subset of img2dataset's)."""

_TAR_MTIME = 0  # fixed member mtime: identical input gives byte-identical shards


def shard_key(shard: int, index: int, shard_size: int) -> str:
    """The img2dataset key of sample ``index`` of shard ``shard``.

    img2dataset numbers samples ``shard * 10**k + index`` with ``k`` digits for the index
    (``k = 4`` for shards of up to 10,000 samples) and pads to ``5 + k`` digits.
    """
    k = max(4, len(str(max(shard_size - 1, 0))))
    if not 0 <= index < 10**k:
        raise ValueError(f"index {index} out of range for shard_size {shard_size}")
    return f"{shard * 10**k + index:0{5 + k}d}"


@dataclass
class Sample:
    """One web image–text pair to write into a shard."""

    key: str  # sample key, matches KEY_PATTERN
    jpg: bytes  # encoded JPEG
    caption: str  # the alt-text, written as {key}.txt in UTF-8
    meta: dict[str, Any] = field(default_factory=dict)  # extra {key}.json fields (url, ...)


@dataclass(frozen=True)
class RawSample:
    """The members of one sample as read from a shard, not yet validated."""

    key: str  # webdataset key (member name up to the first dot of its basename)
    shard: str  # file name of the shard it came from
    files: dict[str, bytes]  # extension ("jpg", "txt", "json", ...) -> member bytes
    members: dict[str, str]  # extension -> full member name

    def source(self, ext: str | None = None) -> str:
        """``shard:member`` of the member with extension ``ext`` (or of the first member)."""
        if ext is None or ext not in self.members:
            ext = next(iter(self.members), None)
        member = self.members[ext] if ext is not None else self.key
        return f"{self.shard}:{member}"


@dataclass(frozen=True)
class Rejection:
    """A sample (or a piece of a shard) that cannot be used, with the reason."""

    key: str  # sample key ("" when the problem is not tied to one sample)
    source: str  # "shard.tar:member" (or the file name alone)
    reason: str  # one of blip_core.data.ingest.REASONS
    detail: str  # human-readable specifics

    def to_json(self) -> dict[str, str]:
        """The quarantine-list record."""
        return {"key": self.key, "source": self.source, "reason": self.reason, "detail": self.detail}


# --------------------------------------------------------------------------------------------
# Writing shards


def check_key(key: str) -> str:
    """Returns ``key`` if it is a safe sample key, else raises ValueError."""
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"unsafe sample key {key!r} (allowed: {KEY_PATTERN.pattern})")
    return key


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image  # header only, no decoding

    with Image.open(io.BytesIO(data)) as im:
        return im.size


class ShardWriter:
    """Writes one shard (``name.tar`` + ``name.parquet``), each appearing atomically on close.

    Members are written sorted by extension (``jpg``, ``json``, ``txt``) with a fixed mtime,
    so identical samples give byte-identical shards. Use as a context manager; on an exception
    neither file appears.
    """

    def __init__(self, tar_path: str | os.PathLike[str]) -> None:
        self.tar_path = Path(tar_path)
        self.parquet_path = self.tar_path.with_suffix(".parquet")
        self.rows: list[dict[str, Any]] = []
        self._cm = atomic_file(self.tar_path, "wb")
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        fileobj = self._cm.__enter__()
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        return self

    def add_member(
        self, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = ""
    ) -> None:
        """Appends one raw tar member, unchecked (:meth:`write` is the checked way to add samples).

        Args:
            name: Member name, written as given.
            data: Member content (regular files only).
            kind: ``tarfile`` member type (``REGTYPE``, ``SYMTYPE``, ``DIRTYPE``, ...).
            linkname: Target of a link member.
        """
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        info.mtime = _TAR_MTIME
        info.mode = 0o444
        info.uname = info.gname = "bigdata"  # what webdataset's TarWriter writes
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data) if info.size else None)

    def write(self, sample: Sample) -> None:
        """Appends one sample; fills ``width``/``height``/``sha256``/``status`` if missing."""
        check_key(sample.key)
        meta: dict[str, Any] = {"key": sample.key, "caption": sample.caption, **sample.meta}
        meta.setdefault("url", None)
        if "width" not in meta or "height" not in meta:
            meta["width"], meta["height"] = _image_size(sample.jpg)
        meta.setdefault("status", "success")
        meta.setdefault("sha256", sha256_bytes(sample.jpg))
        members = {
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            "jpg": sample.jpg,
            "txt": sample.caption.encode("utf-8"),
        }
        for ext in sorted(members):
            self.add_member(f"{sample.key}.{ext}", members[ext])
        self.rows.append({name: meta.get(name) for name in PARQUET_SCHEMA.names})

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._tar is not None
        try:
            self._tar.close()
        finally:
            self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            table = pa.Table.from_pylist(self.rows, schema=PARQUET_SCHEMA)
            with atomic_file(self.parquet_path, "wb") as f:
                pq.write_table(table, f)


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    shard_size: int,
    start_shard: int = 0,
) -> list[Path]:
    """Writes samples into consecutive shards ``{shard:05d}.tar`` (+ ``.parquet``).

    Args:
        samples: Samples in order; consumed lazily, one shard's parquet rows held at a time.
        out_dir: Destination folder (created if missing).
        shard_size: Samples per shard (the last one may hold fewer).
        start_shard: Number of the first shard.

    Returns:
        The tar paths written, in order.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    it = iter(samples)
    shard = start_shard
    pending = next(it, None)
    while pending is not None:
        path = out_dir / f"{shard:05d}.tar"
        with ShardWriter(path) as writer:
            for _ in range(shard_size):
                if pending is None:
                    break
                writer.write(pending)
                pending = next(it, None)
        paths.append(path)
        shard += 1
    return paths


def write_shard_stats(tar_path: Path, count: int) -> Path:
    """Writes img2dataset's ``{shard}_stats.json`` beside a shard."""
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": count},
    }
    return atomic_write_json(tar_path.with_name(f"{tar_path.stem}_stats.json"), stats)


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    """The ``*.tar`` files directly inside ``directory``, sorted by name (hidden ones skipped)."""
    return sorted(p for p in Path(directory).glob("*.tar") if p.is_file() and not p.name.startswith("."))


def read_parquet_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a shard's parquet file as dicts."""
    return pq.read_table(path).to_pylist()


# --------------------------------------------------------------------------------------------
# Reading shards


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split: key = name up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def _unsafe_name(name: str) -> str | None:
    """Why a member name is unsafe, or None."""
    if not name or "\0" in name or "\\" in name:
        return "empty name or NUL/backslash in name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' component"
    return None


class _Group:
    """Members of the sample being assembled."""

    def __init__(self, key: str, first_member: str) -> None:
        self.key = key
        self.first_member = first_member
        self.exts: set[str] = set()  # extensions met, read or not
        self.files: dict[str, bytes] = {}
        self.members: dict[str, str] = {}
        self.problem: tuple[str, str, str] | None = None  # (reason, detail, member)

    def reject(self, reason: str, detail: str, member: str) -> None:
        if self.problem is None:  # keep the first problem
            self.problem = (reason, detail, member)


def _finish(group: _Group, shard: str) -> RawSample | Rejection:
    if group.problem is not None:
        reason, detail, member = group.problem
        return Rejection(group.key, f"{shard}:{member}", reason, detail)
    return RawSample(group.key, shard, group.files, group.members)


def _has_end_marker(path: Path, offset: int) -> bool:
    """Whether a zero block (the end-of-archive marker) follows the last member."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _listed_keys(tar_path: Path) -> list[str] | None:
    """Keys img2dataset listed as downloaded in the parquet beside a shard (None: no readable one)."""
    parquet = tar_path.with_suffix(".parquet")
    try:
        table = pq.read_table(parquet, columns=["key", "status"])
    except Exception:  # missing or unreadable: pyarrow raises several types
        return None
    keys = (k for k, status in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
            if isinstance(k, str) and k and status in ("success", None))
    return list(dict.fromkeys(keys))


def iter_shard(
    tar_path: str | os.PathLike[str], max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[RawSample | Rejection]:
    """Streams the samples of a (plain, uncompressed) tar shard.

    Members are grouped into samples by key as webdataset does: consecutive members sharing
    the part of the name before the first dot of the basename, a new sample starting when
    the key changes or an extension repeats (so ``a.jpg a.txt a.jpg a.txt`` is two samples
    ``a``, the second a duplicate). Nothing is extracted; only the current sample's members
    are held in memory, and members larger than ``max_member_bytes`` are skipped unread.

    Yields a :class:`Rejection` (never raises) for: a file that is not a tar
    (``unreadable_tar``), unsafe member names (``unsafe_member_name``: absolute, ``..``, or a key
    outside :data:`KEY_PATTERN`), links and devices (``unsafe_member_type``), oversized members
    (``member_too_large``), names without an extension (``stray_member``) and a truncated
    archive (``truncated_tar``): the sample being read when the data ends (``key=""`` when
    there is none), then every sample the parquet beside the shard lists as downloaded but
    the archive lost past the cut. An unreadable file rejects each sample its parquet lists
    (or one ``key=""`` record when there is no parquet).

    Args:
        tar_path: Path of the shard.
        max_member_bytes: Members above this size reject their sample.

    Yields:
        :class:`RawSample` for each readable sample, :class:`Rejection` for the rest, in
        archive order.
    """
    path = Path(tar_path)
    shard = path.name
    parquet = path.with_suffix(".parquet").name
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        detail = f"{type(e).__name__}: {e}"
        listed = _listed_keys(path)
        if not listed:
            yield Rejection("", shard, "unreadable_tar", f"{detail}; no parquet listing its samples")
        for key in listed or ():
            yield Rejection(key, parquet, "unreadable_tar", f"listed in {parquet}; {shard}: {detail}")
        return
    group: _Group | None = None
    keys: set[str] = set()  # keys met in this archive
    last_member = ""
    truncation = ""
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError) as e:  # a corrupt header after the first
                truncation = f"bad header after {last_member or 'start'}: {e}"
                break
            if info is None:
                if not _has_end_marker(path, tar.offset):
                    truncation = f"no end-of-archive marker after {last_member or 'start'}"
                break
            name = info.name[2:] if info.name.startswith("./") else info.name
            last_member = name
            if info.isdir():
                continue
            parts = _split_name(name)
            why = _unsafe_name(name)
            if parts is None and why is None:
                keys.add(name)
                yield Rejection(name, f"{shard}:{name}", "stray_member", "no extension")
                continue
            key, ext = parts if parts is not None else (name, "")
            if group is None or key != group.key or ext in group.exts:
                if group is not None:
                    yield _finish(group, shard)
                group = _Group(key, name)
                keys.add(key)
            group.exts.add(ext)
            if why is not None:
                group.reject("unsafe_member_name", why, name)
                continue
            if not KEY_PATTERN.fullmatch(key):
                group.reject("unsafe_member_name", "key has characters outside [A-Za-z0-9_-/]", name)
                continue
            if not info.isfile():
                group.reject("unsafe_member_type", f"tar member type {info.type!r}", name)
                continue
            if info.size > max_member_bytes:
                group.reject("member_too_large", f"{info.size} bytes > limit {max_member_bytes}", name)
                continue
            if group.problem is not None:
                continue  # the sample is rejected anyway: do not read its data
            try:
                f = tar.extractfile(info)
                assert f is not None
                data = f.read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (tarfile.TarError, OSError, EOFError) as e:
                truncation = f"archive ends inside {name}: {e}"
                break
            group.files[ext] = data
            group.members[ext] = name
    if not truncation:
        if group is not None:
            yield _finish(group, shard)
        return
    listed = _listed_keys(path)
    lost = [k for k in listed if k not in keys] if listed is not None else []
    detail = f"{truncation}; {len(lost)} more samples listed in the parquet are lost" if listed is not None \
        else f"{truncation}; no readable parquet beside the shard: samples past the cut are unknown"
    if group is not None:  # the last sample may have lost members: reject it
        yield Rejection(group.key, f"{shard}:{group.first_member}", "truncated_tar", detail)
    else:
        yield Rejection("", shard, "truncated_tar", detail)
    for key in lost:
        yield Rejection(key, parquet, "truncated_tar", f"listed in {parquet}, past the cut of {shard}")


# --------------------------------------------------------------------------------------------
# Karpathy-split JSON


@dataclass(frozen=True)
class HumanImage:
    """One image of a human-annotated (COCO Karpathy-style) dataset."""

    image: str  # path relative to the annotation file's folder (``images/x.jpg``)
    captions: tuple[str, ...]  # its reference captions
    split: str  # "train", "val" or "test"
    image_id: str  # stable identifier (defaults to the image file's stem)

    def to_json(self) -> dict[str, Any]:
        """The Karpathy JSON record."""
        return {
            "image": self.image,
            "caption": list(self.captions),
            "split": self.split,
            "image_id": self.image_id,
        }


def _entries(raw: Any) -> list[dict[str, Any]]:
    """Normalises the accepted top-level layouts to a list of entry dicts."""
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        # Karpathy's original dataset_coco.json: {"images": [{"filepath", "filename",
        # "sentences": [{"raw"}], "split"}]}; "restval" is training data.
        out = []
        for e in raw["images"]:
            if not isinstance(e, dict):
                out.append(e)
                continue
            image = "/".join(p for p in (e.get("filepath"), e.get("filename")) if p)
            split = "train" if e.get("split") == "restval" else e.get("split")
            out.append(
                {
                    "image": image or None,
                    "caption": [s.get("raw") for s in e.get("sentences", []) if isinstance(s, dict)],
                    "split": split,
                    "image_id": e.get("cocoid", e.get("imgid")),
                }
            )
        return out
    if isinstance(raw, list):
        return raw
    raise ValueError("expected a list of entries or a dict with an 'images' list")


def load_karpathy_entries(path: str | os.PathLike[str]) -> list[Any]:
    """The raw entries of a Karpathy JSON file (list layout or ``dataset_coco.json`` layout)."""
    with open(path, encoding="utf-8") as f:
        try:
            return _entries(json.load(f))
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None


def read_karpathy(path: str | os.PathLike[str], default_split: str | None = None) -> list[HumanImage]:
    """Reads a Karpathy-split annotation file (strict: use ``ingest_human`` for untrusted files).

    Entries naming the same image are merged (BLIP's ``coco_karpathy_train.json`` repeats the
    image once per caption with ``caption`` a string).

    Args:
        path: The JSON file.
        default_split: Split of entries without a ``split`` field (BLIP's per-split files).

    Returns:
        Images in first-appearance order.

    Raises:
        ValueError: On a malformed entry.
    """
    by_image: dict[str, HumanImage] = {}
    for i, e in enumerate(load_karpathy_entries(path)):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            raise ValueError(f"{path}: entry {i} has no 'image' path")
        caps = e.get("caption")
        captions = (caps,) if isinstance(caps, str) else tuple(caps or ())
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{path}: entry {i} has no caption strings")
        split = e.get("split", default_split)
        if split not in SPLITS:
            raise ValueError(f"{path}: entry {i} has split {split!r}, expected one of {SPLITS}")
        image_id = str(e.get("image_id") or Path(e["image"]).stem)
        prev = by_image.get(e["image"])
        if prev is not None:
            if prev.split != split:
                raise ValueError(f"{path}: image {e['image']} is in {prev.split} and {split}")
            captions = prev.captions + captions
            image_id = prev.image_id
        by_image[e["image"]] = HumanImage(e["image"], captions, split, image_id)
    return list(by_image.values())


def write_karpathy(path: str | os.PathLike[str], images: Sequence[HumanImage]) -> Path:
    """Writes images as a Karpathy JSON list, atomically."""
    return atomic_write_json(path, [im.to_json() for im in images], indent=1)

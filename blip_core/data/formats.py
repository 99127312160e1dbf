"""Readers and writers for the two on-disk formats: web shards and human annotations.

- Web pairs: webdataset tar shards exactly as img2dataset writes them: ``{shard:05d}.tar``
  holding ``{key}.jpg``, ``{key}.txt`` and ``{key}.json`` per sample, and a
  ``{shard:05d}.parquet`` beside it with one row per sample.
- Human pairs: COCO Karpathy-split JSON, a list of
  ``{"image": relative path, "caption": [str, ...], "split": "train"|"val"|"test",
  "image_id": str}``. Read as well: Karpathy's ``dataset_coco.json`` and COCO's own
  ``captions_{train,val}2017.json`` (see :func:`load_karpathy_entries`).

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

from blip_core.errors import UsageError
from blip_core.io import atomic_file, atomic_write_json, sha256_bytes

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
"""Keys we read and write: relative, no dots (webdataset splits the extension at the first dot)."""

MAX_MEMBER_BYTES = 64 << 20
"""Default limit on one tar member; larger members are skipped without being read."""

SPLITS = ("train", "val", "test")


def split_source(source: str) -> tuple[str, str | None]:
    """``annotations.json:train`` -> (``annotations.json``, ``train``); (source, None) otherwise.

    A source names a split with a ``:SPLIT`` suffix (one of :data:`SPLITS`); a local path that
    exists as written is never split (a file may have a colon in its name).
    """
    head, sep, tail = source.rpartition(":")
    if sep and tail in SPLITS and (head.startswith("s3://") or not Path(source).exists()):
        return head, tail
    return source, None

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("stored_sha256", pa.string()),
    ]
)
"""Columns of the parquet file written beside each shard: img2dataset's (default settings, same
names and types; its ``sha256`` is the hash of the bytes it downloaded, before any resize or
re-encoding) plus ``stored_sha256``, ours: the hash of the image bytes stored in the tar. A
shard written from an input parquet keeps that parquet's columns and types (md5 instead of
sha256, additional columns) and gains the missing ones of this schema."""

REQUIRED_COLUMNS = ("key", "caption", "url", "status", "width", "height", "stored_sha256")
"""Columns every parquet we write has (the ``schema`` check's contract)."""

STORED_HASH = "stored_sha256"
"""Our field (``.json`` and parquet): sha256 of the image bytes stored in the shard."""

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

    Args:
        tar_path: The ``.tar`` to write; the parquet goes beside it.
        schema: Parquet columns (default :data:`PARQUET_SCHEMA`); :func:`output_schema` of an
            input parquet keeps its producer's columns and types.
    """

    def __init__(self, tar_path: str | os.PathLike[str], schema: pa.Schema | None = None) -> None:
        self.tar_path = Path(tar_path)
        self.parquet_path = self.tar_path.with_suffix(".parquet")
        self.schema = schema if schema is not None else PARQUET_SCHEMA
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

    def write(self, sample: Sample, row: dict[str, Any] | None = None) -> None:
        """Appends one sample.

        The ``.json`` member is ``sample.meta`` with ``key``, ``caption`` and
        :data:`STORED_HASH` set, and ``width``/``height``/``url``/``status`` filled if missing.
        The parquet row is ``row`` (the producer's, typed) when given, else the ``.json``
        fields; either way with ``key``, ``caption`` and :data:`STORED_HASH` of this sample.
        """
        check_key(sample.key)
        meta: dict[str, Any] = {"key": sample.key, "caption": sample.caption, **sample.meta}
        meta.setdefault("url", None)
        if "width" not in meta or "height" not in meta:
            meta["width"], meta["height"] = _image_size(sample.jpg)
        meta.setdefault("status", "success")
        meta[STORED_HASH] = sha256_bytes(sample.jpg)
        members = {
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            "jpg": sample.jpg,
            "txt": sample.caption.encode("utf-8"),
        }
        for ext in sorted(members):
            self.add_member(f"{sample.key}.{ext}", members[ext])
        ours = {name: meta[name] for name in ("key", "caption", STORED_HASH)}
        if row is not None:
            self.rows.append({**row, **ours})
        else:
            self.rows.append({f.name: _typed(meta.get(f.name), f.type) for f in self.schema} | ours)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._tar is not None
        try:
            self._tar.close()
        finally:
            self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            with atomic_file(self.parquet_path, "wb") as f:
                pq.write_table(table, f)


def _typed(value: Any, type_: pa.DataType) -> Any:
    """``value`` if it converts to ``type_`` (a producer's .json field), else None."""
    if value is None:
        return None
    try:
        pa.array([value], type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return None
    return value


def output_schema(producer: pa.Schema | None) -> pa.Schema:
    """The parquet schema of a re-written shard: the producer's columns and types, in their
    order, then those of :data:`PARQUET_SCHEMA` the producer lacks."""
    if producer is None:
        return PARQUET_SCHEMA
    fields = list(producer)
    names = set(producer.names)
    return pa.schema(fields + [f for f in PARQUET_SCHEMA if f.name not in names])


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


_SPLIT_IN_NAME = re.compile(r"(?:^|[^a-z])(train|val|test)(?=[^a-z]|$)")


def split_from_name(path: str | os.PathLike[str]) -> str | None:
    """The split a file's name names (``captions_val2017.json`` -> ``"val"``), or None when it
    names none or several (``trainval``)."""
    found = set(_SPLIT_IN_NAME.findall(Path(path).stem.lower()))
    return found.pop() if len(found) == 1 else None


def _with_split(entry: Any, default_split: str | None) -> Any:
    """A list-layout entry, with ``default_split`` when it has no split of its own."""
    if default_split is None or not isinstance(entry, dict) or entry.get("split") not in (None, ""):
        return entry
    return {**entry, "split": default_split}


def _karpathy_entries(images: list[Any], default_split: str | None) -> list[Any]:
    """Karpathy's ``dataset_coco.json`` images as list-layout entries (``restval`` is train)."""
    out: list[Any] = []
    for e in images:
        if not isinstance(e, dict):
            out.append(e)
            continue
        image = "/".join(p for p in (e.get("filepath"), e.get("filename")) if isinstance(p, str) and p)
        split = e.get("split") or default_split
        sentences = e.get("sentences")
        image_id = e.get("cocoid", e.get("imgid"))
        out.append(
            {
                "image": image or None,
                "caption": [x.get("raw") for x in sentences if isinstance(x, dict)]
                if isinstance(sentences, list) else None,
                "split": "train" if split == "restval" else split,
                "image_id": None if image_id is None else str(image_id),
            }
        )
    return out


def _coco_entries(raw: dict[str, Any], path: str, default_split: str | None) -> list[Any]:
    """COCO ``captions_*.json`` as list-layout entries: one per item of ``images``, in order,
    with the captions of the annotations naming its ``id``; then one per annotation whose
    ``image_id`` is not in ``images`` (no ``image``, a ``problem`` saying so)."""
    images, annotations = raw.get("images"), raw["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise UsageError(f"{path}: has 'annotations' (COCO captions_*.json) but 'images' and "
                         "'annotations' are not both lists")
    if annotations and not any(isinstance(a, dict) and "caption" in a for a in annotations):
        raise UsageError(f"{path}: no item of 'annotations' has a 'caption': give COCO's "
                         "captions_*.json, not instances_*.json or person_keypoints_*.json")
    split = default_split or split_from_name(path)
    if split is None:
        raise UsageError(f"{path}: COCO captions_*.json has no split field and its name names "
                         "none: give the split (blip-core ingest --split train|val|test)")
    known = {im.get("id") for im in images if isinstance(im, dict) and isinstance(im.get("id"), int | str)}
    captions: dict[int | str, list[Any]] = {}
    dangling: list[dict[str, Any]] = []
    for k, a in enumerate(annotations):
        image_id = a.get("image_id") if isinstance(a, dict) else None
        if isinstance(image_id, int | str) and image_id in known:
            captions.setdefault(image_id, []).append(a.get("caption"))
            continue
        where = f"annotations[{k}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        problem = (f"{where}: image_id {image_id!r} is not in 'images'" if image_id is not None
                   else f"{where} has no 'image_id'")
        dangling.append({"image": None, "caption": [a.get("caption") if isinstance(a, dict) else a],
                         "split": split, "image_id": None if image_id is None else str(image_id),
                         "problem": problem})
    out: list[Any] = []
    for im in images:
        if not isinstance(im, dict):
            out.append(im)
            continue
        image_id = im.get("id")
        has_id = isinstance(image_id, int | str)
        out.append({"image": im.get("file_name") or None,  # a repeated id gets no captions again
                    "caption": captions.pop(image_id, []) if has_id else [],
                    "split": split, "image_id": str(image_id) if has_id else None})
    return out + dangling


def _not_a_layout(raw: Any, path: str) -> str:
    """Why ``raw`` fits none of the layouts: what each one misses."""
    if isinstance(raw, list):
        first = raw[0]
        as_list = "entry 0 has no 'image'" if isinstance(first, dict) else \
            f"entry 0 is a {type(first).__name__}, not an object"
        as_karpathy = as_coco = "top level is a list, not an object"
    elif isinstance(raw, dict):
        as_list = "top level is an object, not a list"
        images = raw.get("images")
        as_karpathy = "no item of 'images' has 'sentences'" if isinstance(images, list) else \
            "top level has no 'images' list"
        as_coco = "top level has no 'annotations'"
    else:
        as_list = as_karpathy = as_coco = f"top level is a {type(raw).__name__}"
    return (f"{path}: not a known layout: {as_list} (list layout), {as_karpathy} (Karpathy "
            f"dataset_coco.json), {as_coco} (COCO captions_*.json)")


def _entries(raw: Any, path: str, default_split: str | None = None) -> list[Any]:
    """Normalises the accepted top-level layouts to a list of list-layout entries.

    Raises:
        UsageError: If ``raw`` fits none of the layouts, or is COCO's without a split.
    """
    if isinstance(raw, list):
        if raw and not any(isinstance(e, dict) and "image" in e for e in raw):
            raise UsageError(_not_a_layout(raw, path))
        return [_with_split(e, default_split) for e in raw]
    if isinstance(raw, dict) and "annotations" in raw:
        return _coco_entries(raw, path, default_split)
    images = raw.get("images") if isinstance(raw, dict) else None
    if isinstance(images, list) and (not images or any(isinstance(e, dict) and "sentences" in e
                                                       for e in images)):
        return _karpathy_entries(images, default_split)
    raise UsageError(_not_a_layout(raw, path))


def load_karpathy_entries(path: str | os.PathLike[str], default_split: str | None = None) -> list[Any]:
    """The entries of a human-annotation JSON file, in the list layout, not yet checked.

    Three layouts are read:

    - the list layout of this module (BLIP's ``coco_karpathy_*.json``);
    - Karpathy's ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "sentences":
      [{"raw"}], "split", "cocoid"}]}``; the image is ``filepath/filename``, ``restval`` is
      train;
    - COCO's ``captions_*.json``: ``{"images": [{"id", "file_name"}], "annotations":
      [{"image_id", "caption"}]}``; captions are grouped by image, the image is ``file_name``
      (relative to the folder of the split's images, ``train2017/``), ``image_id`` is
      ``str(id)``. An image without annotations has no captions; an annotation whose
      ``image_id`` is not in ``images`` becomes an entry without ``image`` whose ``problem``
      says so.

    Args:
        path: The JSON file.
        default_split: Split of entries without one. COCO's layout has none: without
            ``default_split`` it is read from the file name (``captions_val2017.json``: val).

    Raises:
        UsageError: If the file is not JSON, fits none of the layouts (the message names
            what each one misses), or is COCO's with no split given or in its name.
        ValueError: If ``default_split`` is not one of :data:`SPLITS`.
    """
    if default_split is not None and default_split not in SPLITS:
        raise ValueError(f"default_split {default_split!r} is not one of {SPLITS}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise UsageError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    return _entries(raw, str(path), default_split)


def read_karpathy(path: str | os.PathLike[str], default_split: str | None = None) -> list[HumanImage]:
    """Reads a Karpathy-split annotation file (strict: use ``ingest_human`` for untrusted files).

    Entries naming the same image are merged (BLIP's ``coco_karpathy_train.json`` repeats the
    image once per caption with ``caption`` a string).

    Args:
        path: The JSON file, in any layout :func:`load_karpathy_entries` reads.
        default_split: Split of entries without a ``split`` field (BLIP's per-split files,
            COCO's ``captions_*.json``).

    Returns:
        Images in first-appearance order.

    Raises:
        ValueError: On a malformed entry (:class:`~blip_core.errors.UsageError` when the file
            is not of a known layout).
    """
    by_image: dict[str, HumanImage] = {}
    for i, e in enumerate(load_karpathy_entries(path, default_split)):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            problem = e.get("problem") if isinstance(e, dict) else None
            raise ValueError(f"{path}: " + (problem or f"entry {i} has no 'image' path"))
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

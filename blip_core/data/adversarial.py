"""A seeded adversarial corpus with its answer key: every bad-input case ingest must quarantine.

:func:`generate_adversarial` writes::

    OUT/web/{shard:05d}.tar (+ .parquet)  img2dataset-layout shards: shapes-world pairs mixed
                                          with bad samples of every kind below
    OUT/human/annotations.json            Karpathy JSON with good and bad entries
    OUT/human/images/...                  their image files (good, broken, missing, a fifo,
                                          a symlink to OUT/outside/secret.jpg, ...)
    OUT/truth.json                        the answer key (:class:`AdversarialTruth`)

Web shards are written with :class:`~blip_core.data.formats.ShardWriter`: good samples with
``write``, bad ones member by member with ``add_member``. Besides the documented bad-input
cases they hold: a shard cut inside a member and one cut inside a header (their parquet
stays complete, as after an interrupted copy), a gzip-compressed "tar", crafted headers (a
PNG declaring 50,000 x 50,000 pixels, a JPEG declaring 65,000 x 65,000: never allocated),
images of 1 x 1, 2000 x 1 and in CMYK / P / I;16 / LA / RGBA / 1-bit modes, hostile captions,
unsafe member names (``../../etc/x``, absolute, undecodable bytes) and types (links, a
device), stray members, duplicate keys (adjacent, within a shard, across shards, after a
rejected first occurrence) and ``.json`` members that are not JSON or cannot be written back.

What the truth says follows the ingest policy (module docstring of
:mod:`blip_core.data.ingest`): images of any decodable mode are good (converted to RGB);
captions of any script are good, right-to-left ones included: an Arabic caption, or a Hebrew
one with its direction marks (U+200F), is correct text about the image, and direction marks
are part of correct bidirectional text. They are bad only for the reasons any caption is
(control characters, ...). The sample being read at a tar's cut is bad even when all its
members arrived: a tar does not say how many members a sample has.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from blip_core.data.formats import MAX_MEMBER_BYTES, Sample, ShardWriter, shard_key
from blip_core.data.shapes import describe, encode, human_captions, render, sample_scene
from blip_core.io import atomic_dir, atomic_write_text, sha256_bytes


@dataclass(frozen=True)
class AdversarialConfig:
    """Size and mix of the adversarial corpus."""

    n_samples: int = 2000  # web samples (tar sample groups) in all; the result is within a few
    bad_share: float = 0.15  # share of bad web samples (the cases below cycle to fill it)
    shard_size: int = 250  # samples per regular shard (the three damaged shards are smaller)
    image_size: int = 16  # side of the generated images
    n_human: int = 60  # good human images (the bad entries come on top)
    seed: int = 0  # everything follows from it


@dataclass
class Truth:
    """The answer key of one corpus (web or human)."""

    good: dict[str, dict[str, Any]] = field(default_factory=dict)  # kept key -> what must be kept
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) per quarantine record
    dropped: list[tuple[str, str]] = field(default_factory=list)  # human: (id#index, reason) of
    # bad captions dropped from kept images (records with caption_index, not counted)
    cases: Counter[str] = field(default_factory=Counter)  # samples/entries per case

    @property
    def tried(self) -> int:
        """Samples (web) or images (human) ingest has to judge."""
        return len(self.good) + len(self.bad)

    def by_reason(self) -> dict[str, int]:
        """Expected quarantine count per reason."""
        return dict(sorted(Counter(reason for _, reason in self.bad).items()))

    def to_json(self) -> dict[str, Any]:
        """JSON form (``truth.json``)."""
        return {"tried": self.tried, "good": self.good, "bad": self.bad, "dropped": self.dropped,
                "by_reason": self.by_reason(), "cases": dict(sorted(self.cases.items()))}


@dataclass
class AdversarialTruth:
    """Answer keys of :func:`generate_adversarial`."""

    web: Truth
    human: Truth
    escape_paths: list[str]  # absolute member names (with extension): must never appear


# --------------------------------------------------------------------------------------------
# Images and captions


def _encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR declares ``width`` x ``height`` RGB pixels (nothing allocated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_declaring(jpg: bytes, width: int, height: int) -> bytes:
    """``jpg`` with its baseline frame header (SOF0) patched to declare ``width`` x ``height``."""
    at = jpg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    return jpg[:at] + struct.pack(">HH", height, width) + jpg[at + 4 :]


MODES = ("cmyk_jpeg", "gray_jpeg", "palette_png", "palette_transparent_png", "gray16_png", "la_png",
         "rgba_png", "bilevel_png", "webp")
"""Image variants ingest must accept besides RGB JPEG (see :func:`_modes`)."""


def _modes(rgb: Image.Image) -> dict[str, tuple[str, bytes]]:
    """The same picture as RGB JPEG and in each of :data:`MODES`: name -> (extension, bytes)."""
    gray16 = np.asarray(rgb.convert("L"), np.uint16) * 257
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    rgba = rgb.copy()
    rgba.putalpha(128)
    return {
        "rgb_jpeg": ("jpg", encode(rgb)),
        "cmyk_jpeg": ("jpg", _encoded(rgb.convert("CMYK"), "JPEG")),
        "gray_jpeg": ("jpg", _encoded(rgb.convert("L"), "JPEG")),
        "palette_png": ("jpg", _encoded(palette, "PNG")),  # a PNG in a .jpg member
        "palette_transparent_png": ("png", _encoded(palette, "PNG", transparency=0)),
        "gray16_png": ("png", _encoded(Image.fromarray(gray16), "PNG")),
        "la_png": ("png", _encoded(rgb.convert("LA"), "PNG")),
        "rgba_png": ("png", _encoded(rgba, "PNG")),
        "bilevel_png": ("png", _encoded(rgb.convert("1"), "PNG")),
        "webp": ("webp", _encoded(rgb, "WEBP")),
    }


GOOD_CAPTIONS: dict[str, tuple[str, str]] = {
    # name -> (caption as written, caption ingest must keep)
    "arabic": ("دائرة حمراء كبيرة على اليسار", "دائرة حمراء كبيرة على اليسار"),
    "hebrew_marks": ("\u200fעיגול אדום גדול משמאל\u200f", "\u200fעיגול אדום גדול משמאל\u200f"),
    "mixed_bidi": ("a red circle — دائرة حمراء", "a red circle — دائرة حمراء"),
    "cjk_emoji": ("红色的圆 🔴 on the left", "红色的圆 🔴 on the left"),
    "whitespace": ("  a red\tcircle\n\non the   left \r\n", "a red circle on the left"),
    "bom": ("\ufeffa red circle", "a red circle"),
    "max_length": ("x" * 1000, "x" * 1000),
}
"""Captions that look odd but are good (kept, normalised as shown)."""


# --------------------------------------------------------------------------------------------
# Web


_Member = tuple[str, bytes, bytes, str]  # (name, data, tar type, link name)


def _members(key: str, image: bytes | None, caption: bytes | None, meta: bytes | None,
             ext: str = "jpg") -> list[_Member]:
    out = {"json": meta, ext: image, "txt": caption}
    return [(f"{key}.{e}", data, tarfile.REGTYPE, "") for e, data in sorted(out.items()) if data is not None]


_DAMAGED = ((40, 30, "member"), (20, 15, "header"), (10, 0, "gzip"))
"""Damaged shards after the regular ones: (samples, first sample cut, how). "member": cut
half-way through that sample's image; "header": cut inside its first header, so the sample
before it, still being read, is lost too; "gzip": the whole shard gzip-compressed."""


def _lost(n: int, cut_at: int, where: str) -> int:
    """Samples a damaged shard loses."""
    return n if where == "gzip" else n - cut_at + (where == "header")


class _WebCorpus:
    """Writes the web shards and keeps the truth."""

    def __init__(self, root: Path, final: Path, cfg: AdversarialConfig, rng: np.random.Generator) -> None:
        self.root, self.final, self.cfg, self.rng = root, final, cfg, rng
        self.truth = Truth()
        self.good_in_shard: list[str] = []  # good keys of the shard being written
        self.good_before: list[str] = []  # good keys of earlier shards
        self.bad_keys: tuple[list[str], list[str]] = ([], [])  # well-formed keys of bad samples
        # rejected by the sample checks, and by the archive reader (links, devices)
        self.escapes: list[str] = []
        self.prev: tuple[str, bool, bool] = ("", False, False)  # last sample: key, good, has .jpg
        self.extra = 0  # good samples added to give a duplicate its target
        rgb = render(sample_scene(rng), cfg.image_size)
        self.jpg = encode(rgb)  # a good image for the bad-caption / bad-json cases

    # -- one sample ---------------------------------------------------------------------------

    def scene_pair(self, size: int | None = None) -> tuple[Image.Image, str]:
        scene = sample_scene(self.rng)
        return render(scene, size or self.cfg.image_size), describe(scene, self.rng)

    def meta(self, key: str, **extra: Any) -> bytes:
        return json.dumps({"key": key, "url": f"https://adversarial.invalid/{key}", **extra}).encode()

    def good(self, w: ShardWriter, key: str, variant: str) -> None:
        """A good sample: a shapes pair, an odd image mode, an odd caption, or no .json."""
        image, caption = self.scene_pair(8 if variant == "min_side" else None)
        expected = caption
        ext, data = "jpg", encode(image)
        if variant in GOOD_CAPTIONS:
            caption, expected = GOOD_CAPTIONS[variant]
        elif variant not in ("rgb_jpeg", "min_side", "no_json"):
            ext, data = _modes(image)[variant]
        if variant == "no_json":  # a plain webdataset pair: ingest writes a fresh .json
            for m in _members(key, data, caption.encode(), None):
                w.add_member(*m)
        elif ext == "jpg":
            w.write(Sample(key, data, caption, {"url": f"https://adversarial.invalid/{key}"}))
        else:
            for m in _members(key, data, caption.encode("utf-8"), self.meta(key), ext):
                w.add_member(*m)
        with Image.open(io.BytesIO(data)) as im:
            same_bytes = ext == "jpg" and (im.format, im.mode) == ("JPEG", "RGB")  # stored unchanged
        self.truth.good[key] = {"caption": expected, "size": list(image.size),
                                "sha256": sha256_bytes(data) if same_bytes else None}
        self.good_in_shard.append(key)
        self.truth.cases[f"good:{variant}"] += 1
        self.prev = (key, True, ext == "jpg")

    def bad(self, w: ShardWriter, key: str, case: str) -> None:
        """One bad case (see :data:`WEB_BAD_CASES`), recorded with its expected reason."""
        reason, build = WEB_BAD_CASES[case]
        if case.startswith("duplicate"):
            key, members = self.duplicate(w, case)
        else:
            key, members = build(self, key)
        for m in members:
            w.add_member(*m)
        self.truth.bad.append((key, reason))
        self.truth.cases[case] += 1
        if case in _WELL_FORMED:
            self.bad_keys[reason == "unsafe_member_type"].append(key)
        self.prev = (key, False, False)

    def duplicate(self, w: ShardWriter, case: str) -> tuple[str, list[_Member]]:
        """A good-looking sample reusing a key met before: right after it (``a.jpg`` repeating
        starts a new sample), elsewhere in the shard, in an earlier shard, or a rejected one's.

        Targets other than the adjacent one are never the previous sample: adjacent members of
        one key merge into one sample when their extensions do not repeat.
        """
        prev_key, prev_good, prev_jpg = self.prev
        if case == "duplicate_adjacent":
            targets = [prev_key] if prev_good and prev_jpg else []
        elif case == "duplicate_of_rejected":  # alternately of the two kinds of rejection
            first = self.truth.cases[case] % 2
            targets = [k for k in self.bad_keys[first] if k != prev_key] or \
                [k for k in self.bad_keys[1 - first] if k != prev_key]
        else:
            pool = self.good_in_shard if case == "duplicate_in_shard" else self.good_before
            targets = [k for k in pool if k != prev_key]
        if targets:
            key = targets[int(self.rng.integers(len(targets)))]
        else:  # nothing to duplicate yet: a good sample, then its adjacent duplicate
            self.extra += 1
            key = f"extra{self.extra:05d}"
            self.good(w, key, "rgb_jpeg")
        image, caption = self.scene_pair()
        return key, _members(key, encode(image), caption.encode(), self.meta(key))

    # -- shards -------------------------------------------------------------------------------

    def write(self) -> None:
        cfg, rng = self.cfg, self.rng
        n_regular = cfg.n_samples - sum(n for n, _, _ in _DAMAGED)
        n_bad = round(cfg.bad_share * cfg.n_samples) - sum(_lost(*d) for d in _DAMAGED)
        if n_regular < n_bad + 4 * len(GOOD_VARIANTS) or n_bad < 0:
            raise ValueError(f"n_samples {cfg.n_samples} / bad_share {cfg.bad_share}: too few to mix")
        cases = [list(WEB_BAD_CASES)[i % len(WEB_BAD_CASES)] for i in range(n_bad)]
        variants = [v for v in GOOD_VARIANTS for _ in range(4)]
        goods = variants + ["rgb_jpeg"] * (n_regular - n_bad - len(variants))
        slots = [("bad", c) for c in cases] + [("good", v) for v in goods]
        slots = [slots[i] for i in rng.permutation(len(slots))]
        n_shards = -(-n_regular // cfg.shard_size)
        for shard in range(n_shards):
            chunk = slots[shard * cfg.shard_size : (shard + 1) * cfg.shard_size]
            with ShardWriter(self.root / f"{shard:05d}.tar") as w:
                for i, (kind, name) in enumerate(chunk):
                    key = shard_key(shard, i, cfg.shard_size)
                    if kind == "good":
                        self.good(w, key, name)
                    else:
                        self.bad(w, key, name)
            self.good_before += self.good_in_shard
            self.good_in_shard = []
        self.damaged(n_shards)

    def damaged(self, first: int) -> None:
        """The :data:`_DAMAGED` shards, numbered from ``first``."""
        for shard, (n, cut_at, where) in enumerate(_DAMAGED, start=first):
            path = self.root / f"{shard:05d}.tar"
            keys = [shard_key(shard, i, self.cfg.shard_size) for i in range(n)]
            with ShardWriter(path) as w:
                for key in keys:
                    self.good(w, key, "rgb_jpeg")
            if where == "gzip":
                path.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
                lost, reason = keys, "unreadable_tar"
            else:
                with tarfile.open(path) as tar:
                    info = tar.getmember(f"{keys[cut_at]}.jpg")  # the sample's first member
                cut = info.offset_data + info.size // 2 if where == "member" else info.offset + 100
                os.truncate(path, cut)
                lost, reason = keys[n - _lost(n, cut_at, where) :], "truncated_tar"
            for k in lost:
                del self.truth.good[k]
                self.truth.bad.append((k, reason))
            self.truth.cases["good:rgb_jpeg"] -= len(lost)
            self.truth.cases[f"{reason}:{where}"] += len(lost)


def _bad_image(data: Callable[[_WebCorpus], bytes]) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        return key, _members(key, data(c), b"a red circle", c.meta(key))
    return build


def _bad_caption(text: bytes) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        return key, _members(key, c.jpg, text, c.meta(key))
    return build


def _bad_json(meta: bytes) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        return key, _members(key, c.jpg, b"a red circle", meta)
    return build


def _named(name: Callable[[_WebCorpus, str], str]) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        bad = name(c, key)
        return bad, _members(bad, c.jpg, b"a red circle", None)
    return build


def _typed(kind: bytes, link: str) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        return key, [(f"{key}.jpg", b"", kind, link), (f"{key}.txt", b"a red circle", tarfile.REGTYPE, "")]
    return build


def _absolute(c: _WebCorpus, key: str) -> str:
    """An absolute name inside the corpus's own folder tree (``OUT/escaped/``)."""
    path = f"{c.final.parent}/escaped/{key}"
    c.escapes += [f"{path}.jpg", f"{path}.txt"]
    return path


def _no_pair(image: bool) -> Callable[[_WebCorpus, str], tuple[str, list[_Member]]]:
    def build(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
        return key, _members(key, c.jpg if image else None, None if image else b"a red circle", c.meta(key))
    return build


def _stray(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
    return f"README_{key}", [(f"README_{key}", b"not a sample", tarfile.REGTYPE, "")]


def _checksum(c: _WebCorpus, key: str) -> tuple[str, list[_Member]]:
    return key, _members(key, c.jpg, b"a red circle", c.meta(key, stored_sha256="0" * 64))


def _dotdot_once(c: _WebCorpus, key: str) -> str:
    """``../../etc/x`` exactly, the first time; then numbered variants (distinct keys)."""
    return "../../etc/x" if "../../etc/x" not in (k for k, _ in c.truth.bad) else f"../../etc/x{key}"


_DROP = object()  # marks a field to leave out of a human entry

_RECURSIVE = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

WEB_BAD_CASES: dict[str, tuple[str, Callable[..., Any]]] = {
    # case -> (expected reason, builder(corpus, key) -> (key, members)); duplicates built apart
    "zero_byte_image": ("empty_image", _bad_image(lambda c: b"")),
    "truncated_jpeg": ("undecodable_image", _bad_image(lambda c: c.jpg[: len(c.jpg) // 2])),
    "garbage_image": ("undecodable_image", _bad_image(lambda c: c.rng.bytes(700))),
    "html_as_image": ("undecodable_image", _bad_image(lambda c: b"<html><body>404 Not Found</body></html>")),
    "pcx_image": ("undecodable_image", _bad_image(lambda c: _encoded(Image.new("RGB", (16, 16)), "PCX"))),
    "png_declaring_50000x50000": ("image_too_large", _bad_image(lambda c: png_declaring(50_000, 50_000))),
    "jpeg_declaring_65000x65000": ("image_too_large",
                                   _bad_image(lambda c: jpeg_declaring(c.jpg, 65_000, 65_000))),
    "image_1x1": ("image_too_small", _bad_image(lambda c: encode(Image.new("RGB", (1, 1), (9, 9, 9))))),
    "image_2000x1": ("image_too_small", _bad_image(lambda c: encode(Image.new("RGB", (2000, 1))))),
    "checksum_mismatch": ("checksum_mismatch", _checksum),
    "empty_caption": ("empty_caption", _bad_caption(b"")),
    "blank_caption": ("empty_caption", _bad_caption(b" \t\r\n ")),
    "zero_width_caption": ("empty_caption", _bad_caption("\u200b\u200b\u2060".encode())),
    "caption_1mb": ("caption_too_long", _bad_caption(b"a red circle " * 80_660)),
    "caption_1001_chars": ("caption_too_long", _bad_caption(b"y" * 1001)),
    "latin1_caption": ("non_utf8_caption", _bad_caption("un cercle rouge à gauche".encode("latin-1"))),
    "utf16_caption": ("non_utf8_caption", _bad_caption("a red circle".encode("utf-16"))),
    "overlong_utf8_caption": ("non_utf8_caption", _bad_caption(b"a red \xc0\xaf circle")),
    "encoded_surrogate_caption": ("non_utf8_caption", _bad_caption(b"a red \xed\xa0\x80 circle")),
    "nul_caption": ("control_characters", _bad_caption(b"a red\x00circle")),
    "ansi_escape_caption": ("control_characters", _bad_caption(b"\x1b[31ma red circle\x1b[0m")),
    "c1_control_caption": ("control_characters", _bad_caption("a red \u009b circle".encode())),
    "bell_backspace_caption": ("control_characters", _bad_caption(b"a red\x07\x08 circle")),
    "arabic_with_control": ("control_characters", _bad_caption("دائرة\x00حمراء".encode())),
    "image_without_caption": ("missing_caption", _no_pair(image=True)),
    "caption_without_image": ("missing_image", _no_pair(image=False)),
    "json_only": ("missing_image", lambda c, key: (key, _members(key, None, None, c.meta(key)))),
    "json_not_json": ("bad_json", _bad_json(b"{not json")),
    "json_array": ("bad_json", _bad_json(b"[1, 2, 3]")),
    "json_non_utf8": ("bad_json", _bad_json(b'{"url": "http://x/\xff"}')),
    "json_nested_100k": ("bad_json", _bad_json(_RECURSIVE)),
    "json_5000_digit_int": ("bad_json", _bad_json(b'{"width": 1' + b"0" * 5000 + b"}")),
    "json_url_not_string": ("bad_json", _bad_json(b'{"url": 12345}')),
    "json_lone_surrogate": ("bad_json", _bad_json(b'{"url": "http://x/\\ud800"}')),
    "member_dotdot": ("unsafe_member_name", _named(_dotdot_once)),
    "member_inner_dotdot": ("unsafe_member_name", _named(lambda c, k: f"a/../../{k}")),
    "member_absolute": ("unsafe_member_name", _named(_absolute)),
    "member_bad_chars": ("unsafe_member_name", _named(lambda c, k: f"{k} (copy)")),
    "member_undecodable_name": ("unsafe_member_name", _named(lambda c, k: f"{k}\udcff\udcfe")),
    "member_symlink": ("unsafe_member_type", _typed(tarfile.SYMTYPE, "/etc/passwd")),
    "member_hardlink": ("unsafe_member_type", _typed(tarfile.LNKTYPE, "../../etc/passwd")),
    "member_device": ("unsafe_member_type", _typed(tarfile.CHRTYPE, "")),
    "stray_member": ("stray_member", _stray),
    "duplicate_adjacent": ("duplicate_key", None),
    "duplicate_in_shard": ("duplicate_key", None),
    "duplicate_across_shards": ("duplicate_key", None),
    "duplicate_of_rejected": ("duplicate_key", None),
}
"""Every bad web case, with the reason ingest must give it."""

_WELL_FORMED = {c for c, (reason, _) in WEB_BAD_CASES.items()
                if reason not in ("unsafe_member_name", "stray_member", "duplicate_key")}

GOOD_VARIANTS = ("min_side", "no_json", *MODES, *GOOD_CAPTIONS)
"""Good web sample variants besides plain RGB JPEG pairs (4 of each)."""


# --------------------------------------------------------------------------------------------
# Human


def _human(root: Path, cfg: AdversarialConfig, rng: np.random.Generator) -> Truth:
    """Writes ``root/annotations.json`` and images; ``root.parent/outside`` holds the secret."""
    truth = Truth()
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    entries: list[Any] = []
    splits = ("train", "val", "test", "restval")

    def image_file(name: str, data: bytes) -> str:
        (images / name).write_bytes(data)
        return f"images/{name}"

    def add_good(i: int, image: bytes, ext: str, captions: list[Any], kept: list[str]) -> None:
        image_id = f"good{i:03d}"
        split = splits[i % 4]
        rel = image_file(f"{'sub/' if i % 7 == 0 else ''}{image_id}.{ext}", image)
        entries.append({"image": rel, "caption": captions, "split": split, "image_id": image_id})
        truth.good[image_id] = {"captions": kept, "split": "train" if split == "restval" else split}

    modes = ["rgb_jpeg", "cmyk_jpeg", "palette_png", "gray16_png", "rgba_png"]
    for i in range(cfg.n_human):
        scene = sample_scene(rng)
        rgb = render(scene, cfg.image_size)
        mode = modes[i % len(modes)]
        ext, data = ("jpg", encode(rgb)) if mode == "rgb_jpeg" else _modes(rgb)[mode]
        captions = human_captions(scene, rng, 3)
        kept = list(captions)
        if i % 10 == 1:  # right-to-left captions are good
            captions.append(GOOD_CAPTIONS["arabic"][0])
            kept.append(GOOD_CAPTIONS["arabic"][1])
        if i % 10 == 2:  # bad captions of a good image: dropped, the image kept
            bad = [("", "empty_caption"), ("\x1b[2J clear", "control_characters"), (7, "missing_caption"),
                   ("a \ud800 b", "non_utf8_caption"), ("z" * 1001, "caption_too_long")]
            for text, reason in bad:
                captions.append(text)
                truth.dropped.append((f"good{i:03d}#{len(captions) - 1}", reason))
        add_good(i, data, ext, captions, kept)
        truth.cases[f"good:{mode}"] += 1
    # BLIP's per-caption layout: the same image again with one more caption (merged).
    first = dict(entries[0], caption="one more caption")
    entries.append(first)
    truth.good["good000"]["captions"].append("one more caption")
    truth.cases["good:repeated_entry"] += 1

    jpg = encode(render(sample_scene(rng), cfg.image_size))
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpg)
    (images / "link.jpg").symlink_to(os.path.relpath(outside / "secret.jpg", images))
    (images / "adir.jpg").mkdir()
    os.mkfifo(images / "fifo.jpg")
    with open(images / "huge.jpg", "wb") as f:  # sparse: no disk, no memory unless read
        f.truncate(MAX_MEMBER_BYTES + 1)

    def bad(case: str, reason: str, entry: Any, key: str | None = None) -> None:
        entries.append(entry)
        truth.bad.append((key if key is not None else entry["image_id"], reason))
        truth.cases[case] += 1

    ok = {"caption": ["a red circle"], "split": "train"}
    for case, entry in (("not_an_object_str", "just a string"), ("not_an_object_int", 42),
                        ("not_an_object_null", None), ("not_an_object_list", ["images/x.jpg"])):
        bad(case, "missing_field", entry, key=str(len(entries)))  # keyed by position
    other_split = "val" if entries[3]["split"] == "test" else "test"
    rows: dict[str, tuple[str, dict[str, Any]]] = {
        # case -> (expected reason, fields replacing those of a good entry; _DROP removes one)
        "no_image_field": ("missing_field", {"image": _DROP}),
        "image_null": ("missing_field", {"image": None}),
        "image_int": ("missing_field", {"image": 5}),
        "image_empty": ("missing_field", {"image": ""}),
        "no_caption_field": ("missing_field", {"caption": _DROP}),
        "caption_null": ("missing_field", {"caption": None}),
        "no_split": ("missing_field", {"split": _DROP}),
        "image_id_lone_surrogate": ("missing_field", {"image_id": "id\ud801"}),
        "caption_dict": ("missing_caption", {"caption": {"a": 1}}),
        "caption_int": ("missing_caption", {"caption": 3}),
        "caption_empty_list": ("missing_caption", {"caption": []}),
        "captions_all_blank": ("empty_caption", {"caption": ["", "  "]}),
        "caption_control": ("control_characters", {"caption": ["\x1b[31m red"]}),
        "caption_too_long": ("caption_too_long", {"caption": ["w" * 1001]}),
        "caption_lone_surrogate": ("non_utf8_caption", {"caption": ["red \udc00"]}),
        "split_dev": ("invalid_split", {"split": "dev"}),
        "split_list": ("invalid_split", {"split": ["train"]}),
        "missing_file": ("missing_image", {"image": "images/nowhere.jpg"}),
        "image_is_dir": ("missing_image", {"image": "images/adir.jpg"}),
        "image_is_fifo": ("missing_image", {"image": "images/fifo.jpg"}),
        "zero_byte_file": ("empty_image", {"image": image_file("zero.jpg", b"")}),
        "garbage_file": ("undecodable_image", {"image": image_file("garbage.jpg", rng.bytes(500))}),
        "truncated_jpeg_file": ("undecodable_image", {"image": image_file("cut.jpg", jpg[: len(jpg) // 2])}),
        "image_1x1": ("image_too_small", {"image": image_file("one.png", encode(Image.new("RGB", (1, 1))))}),
        "png_declaring_50000x50000": ("image_too_large",
                                      {"image": image_file("bomb.png", png_declaring(50_000, 50_000))}),
        "file_too_large": ("member_too_large", {"image": "images/huge.jpg"}),
        "path_dotdot": ("unsafe_member_name", {"image": "../../etc/passwd"}),
        "path_absolute": ("unsafe_member_name", {"image": "/etc/passwd"}),
        "path_inner_dotdot": ("unsafe_member_name", {"image": "images/../../outside/secret.jpg"}),
        "path_symlink_outside": ("unsafe_member_name", {"image": "images/link.jpg"}),
        "path_undecodable": ("unsafe_member_name", {"image": image_file("\udcff.jpg", jpg)}),
        "same_image_other_split": ("duplicate_key", {"image": entries[3]["image"], "split": other_split}),
        "same_id_other_image": ("duplicate_key", {"image_id": "good004"}),
    }
    for n, (case, (reason, fields)) in enumerate(rows.items()):
        entry = {"image": image_file(f"bad{n:03d}.jpg", jpg), **ok, "image_id": f"bad{n:03d}", **fields}
        bad(case, reason, {k: v for k, v in entry.items() if v is not _DROP})
    atomic_write_text(root / "annotations.json", json.dumps(entries))  # \u escapes: lone surrogates
    return truth


# --------------------------------------------------------------------------------------------


def generate_adversarial(out: str | os.PathLike[str], cfg: AdversarialConfig = AdversarialConfig()
                         ) -> AdversarialTruth:
    """Writes the adversarial web shards and human pairs to ``out`` (appearing at once).

    Args:
        out: Destination folder (replaced).
        cfg: Size, mix and seed.

    Returns:
        The answer key, also written to ``out/truth.json``.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "web").mkdir()
        web = _WebCorpus(tmp / "web", out.resolve() / "web", cfg, np.random.default_rng([cfg.seed, 1]))
        web.write()
        human = _human(tmp / "human", cfg, np.random.default_rng([cfg.seed, 2]))
        truth = AdversarialTruth(web.truth, human, web.escapes)
        record = {"web": web.truth.to_json(), "human": human.to_json(), "escape_paths": web.escapes,
                  "config": asdict(cfg)}
        atomic_write_text(tmp / "truth.json", json.dumps(record, indent=1))
    return truth

"""The embedded "shapes world": a seeded generator of image–text data.

Images are small RGB pictures of one or two coloured shapes on a dark, lightly textured
background. A shape has a colour (6), a kind (4), a size (2) and a position: a single shape
sits left, right, top, bottom or in the center; two shapes sit side by side (left/right) or one
above the other (top/bottom), which the captions express as a relation ("to the left of",
"above", ...). Captions come from a small grammar with several paraphrases per scene; every
word is in the BERT uncased WordPiece vocabulary.

Output layout of :func:`generate_world` (the whole folder appears at once)::

    OUT/human/annotations.json     Karpathy JSON, 5 correct captions per image, train/val/test
    OUT/human/images/<id>.jpg
    OUT/web/{shard:05d}.tar        img2dataset-style webdataset shards (+ .parquet, _stats.json)
    OUT/truth/web_truth.jsonl      per web key: noisy, kind, true caption, scene  (eval only)
    OUT/truth/human_scenes.jsonl   per human image: its scene                      (eval only)
    OUT/manifest.json              config, counts, hashes, generator version

Web texts: a fraction ``web_noise`` is noisy, split between ``mismatched`` (the description of
another web image whose colours+shapes are all different, so it is wrong for this one) and
``boilerplate`` ("IMG_2034.jpg", "click here", ...). The clean rest is ``correct`` (a full
description) or ``terse`` ("red circle"). Counts are exact, not sampled.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from blip_core.data.formats import HumanImage, Sample, shard_key, write_karpathy, write_shards
from blip_core.data.formats import write_shard_stats as _write_shard_stats
from blip_core.io import atomic_dir, atomic_write_json, sha256_bytes, tree_hash

GENERATOR_VERSION = "2"
"""Bumped whenever the same config would produce different bytes."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 50),
    "purple": (150, 60, 195),
    "white": (238, 238, 238),
}
KINDS = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
NOISY_KINDS = ("mismatched", "boilerplate")
CLEAN_KINDS = ("correct", "terse")

# Geometry, in fractions of the image side.
_CENTERS = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 0.10, "large": 0.18}
_POS_JITTER = 0.03  # max shift of a shape's center
_SIZE_JITTER = 0.06  # max relative change of a shape's radius
_COLOR_JITTER = 12  # max change of each colour channel
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled (anti-aliasing)

# Grammar. Each tuple lists interchangeable phrases.
_SIZE_WORDS = {"small": ("small",), "large": ("large", "big")}
_POS_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_REL_PHRASES = {  # (position of the subject, position of the object) -> phrases
    ("left", "right"): ("to the left of", "left of"),
    ("right", "left"): ("to the right of", "right of"),
    ("top", "bottom"): ("above",),
    ("bottom", "top"): ("below", "under"),
}
_BOILERPLATE = (
    "click here",
    "stock photo",
    "image",
    "download now",
    "free download",
    "untitled",
    "thumbnail",
    "click to enlarge",
    "view larger image",
    "no image available",
    "product image",
    "shop now",
    "best price guaranteed",
    "copyright all rights reserved",
    "IMG_{n4}.jpg",
    "DSC_{n5}.JPG",
    "photo {n2}",
    "screenshot 20{n2}",
)


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and noise of a generated shapes world. Defaults: the embedded default run."""

    seed: int = 0  # everything (scenes, captions, pixels, noise assignment) follows from it
    image_size: int = 64  # side of the square images in pixels
    n_human_train: int = 600  # human-annotated train images
    n_human_val: int = 100  # human-annotated val images (distinct descriptions)
    n_human_test: int = 200  # human-annotated test images (distinct descriptions)
    captions_per_image: int = 5  # human captions per image (COCO has 5)
    n_web: int = 3000  # web image–text pairs
    web_noise: float = 0.4  # exact fraction of web texts that are wrong for their image
    mismatched_share: float = 0.5  # of the noisy texts, fraction from another image (rest boilerplate)
    terse_share: float = 0.5  # of the clean texts, fraction terse ("red circle"; rest full)
    pair_fraction: float = 0.7  # fraction of images with two shapes (rest: one)
    shard_size: int = 500  # web samples per tar shard
    jpeg_quality: int = 90  # JPEG quality of every image

    def __post_init__(self) -> None:
        for name in ("web_noise", "mismatched_share", "terse_share", "pair_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        counts = ("n_human_train", "n_human_val", "n_human_test", "n_web")
        if any(getattr(self, n) < 0 for n in counts):
            raise ValueError("counts must be >= 0")
        if self.image_size < 16 or self.captions_per_image < 1 or self.shard_size < 1:
            raise ValueError("image_size >= 16, captions_per_image >= 1, shard_size >= 1")


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    color: str  # key of COLORS
    kind: str  # one of KINDS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``seed`` fixes the pixel-level details (jitter, background)."""

    shapes: tuple[Shape, ...]  # one shape, or two: (left, right) or (top, bottom)
    seed: int  # rendering seed

    @property
    def content(self) -> frozenset[tuple[str, str]]:
        """The (colour, kind) pairs shown."""
        return frozenset((s.color, s.kind) for s in self.shapes)

    def signature(self) -> tuple[tuple[str, str, str, str], ...]:
        """Everything a full description states (two scenes alike here render alike)."""
        return tuple((s.color, s.kind, s.size, s.position) for s in self.shapes)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"shapes": [asdict(s) for s in self.shapes], "seed": self.seed}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_json`."""
        return Scene(tuple(Shape(**s) for s in obj["shapes"]), int(obj["seed"]))


# --------------------------------------------------------------------------------------------
# Scenes and pixels


def sample_scene(rng: np.random.Generator, pair_fraction: float = 0.7) -> Scene:
    """Draws a random scene."""

    def attrs() -> tuple[str, str, str]:
        return (
            str(rng.choice(list(COLORS))),
            str(rng.choice(KINDS)),
            str(rng.choice(SIZES)),
        )

    seed = int(rng.integers(2**31))
    if rng.random() >= pair_fraction:
        color, kind, size = attrs()
        return Scene((Shape(color, kind, size, str(rng.choice(POSITIONS))),), seed)
    first, second = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    a = attrs()
    b = attrs()
    while b[:2] == a[:2]:  # two shapes of the same colour and kind cannot be told apart
        b = attrs()
    return Scene((Shape(*a, first), Shape(*b, second)), seed)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":  # equilateral, pointing up, centroid at (cx, cy)
        angles, radii = np.deg2rad([-90, 30, 150]), [1.2 * r] * 3
    else:  # star: 5 points, inner radius half the outer
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = [1.2 * r if i % 2 == 0 else 0.6 * r for i in range(10)]
    return [(cx + q * np.cos(t), cy + q * np.sin(t)) for t, q in zip(angles, radii, strict=True)]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draws a scene as a ``size`` x ``size`` RGB image (deterministic for ``scene.seed``)."""
    rng = np.random.default_rng(scene.seed)
    # Background: a dark grey with a slight tint, a gentle gradient and pixel noise.
    base = rng.uniform(20, 80) + rng.uniform(-6, 6, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    gradient = rng.uniform(0, 16) * (np.cos(angle) * xs + np.sin(angle) * ys)
    background = base[None, None, :] + gradient[..., None]
    # Shapes (never overlapping): each drawn as a mask at SUPERSAMPLE x, downsampled for
    # smooth edges, then blended over the background in its colour.
    big = size * _SUPERSAMPLE
    pixels = background
    for shape in scene.shapes:
        fx, fy = _CENTERS[shape.position]
        cx = (fx + rng.uniform(-_POS_JITTER, _POS_JITTER)) * big
        cy = (fy + rng.uniform(-_POS_JITTER, _POS_JITTER)) * big
        r = _RADIUS[shape.size] * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) * big
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        fill = np.clip(np.array(COLORS[shape.color]) + jitter, 0, 255)
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=255)
        alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float64)[..., None]
        pixels = pixels + (fill[None, None, :] - pixels) * (alpha / 255.0)  # [size, size, 3]
    pixels += rng.normal(0, 2.5, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def encode(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an image."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Grammar


def _pick(rng: np.random.Generator | None, options: Sequence[str]) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _np(shape: Shape, rng: np.random.Generator | None, with_size: bool = True) -> str:
    """Noun phrase: "a large red circle"."""
    size = f"{_pick(rng, _SIZE_WORDS[shape.size])} " if with_size else ""
    return f"a {size}{shape.color} {shape.kind}"


def _single(scene: Scene, rng: np.random.Generator | None, full: bool) -> str:
    s = scene.shapes[0]
    pos = _pick(rng, _POS_PHRASES[s.position])
    if not full:
        templates = [f"{_np(s, rng, False)} {pos}", _np(s, rng)]
        return _pick(rng, templates)
    np_ = _np(s, rng)
    templates = [
        f"{np_} {pos}",
        f"there is {np_} {pos}",
        f"{pos} there is {np_}",
        f"{np_} {pos} of the image",
        f"an image with {np_} {pos}",
        f"one {_pick(rng, _SIZE_WORDS[s.size])} {s.color} {s.kind} {pos}",
    ]
    return _pick(rng, templates)


def _pair(scene: Scene, rng: np.random.Generator | None, full: bool) -> str:
    a, b = scene.shapes
    ab = _pick(rng, _REL_PHRASES[(a.position, b.position)])
    ba = _pick(rng, _REL_PHRASES[(b.position, a.position)])
    if not full:
        templates = [
            f"{_np(a, rng, False)} {ab} {_np(b, rng, False)}",
            f"{_np(a, rng)} and {_np(b, rng)}",
        ]
        return _pick(rng, templates)
    na, nb = _np(a, rng), _np(b, rng)
    pa, pb = _pick(rng, _POS_PHRASES[a.position]), _pick(rng, _POS_PHRASES[b.position])
    templates = [
        f"{na} {ab} {nb}",
        f"{nb} {ba} {na}",
        f"there is {na} {ab} {nb}",
        f"{na} {pa} and {nb} {pb}",
        f"{nb} {pb} and {na} {pa}",
        f"an image with {na} {ab} {nb}",
    ]
    return _pick(rng, templates)


def describe(scene: Scene, rng: np.random.Generator | None = None, full: bool = True) -> str:
    """A correct caption of a scene.

    Args:
        scene: The scene.
        rng: Picks the paraphrase; ``None`` gives the canonical caption.
        full: Whether the caption states every attribute (colour, kind, size, position or
            relation); partial ones leave out sizes, positions or the relation.

    Returns:
        Lower-case caption without punctuation.
    """
    return (_single if len(scene.shapes) == 1 else _pair)(scene, rng, full)


def canonical_caption(scene: Scene) -> str:
    """The one full description used as the truth ("a large red circle to the left of ...")."""
    return describe(scene, None, True)


def terse_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A short, correct alt-text: "red circle", "large red circle", "red circle and blue star"."""
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        size = _pick(rng, _SIZE_WORDS[s.size])
        return _pick(rng, [f"{s.color} {s.kind}", f"{size} {s.color} {s.kind}"])
    a, b = scene.shapes
    return _pick(
        rng, [f"{a.color} {a.kind} and {b.color} {b.kind}", f"{b.color} {b.kind} and {a.color} {a.kind}"]
    )


def boilerplate_caption(rng: np.random.Generator) -> str:
    """Web junk text that says nothing about the image ("IMG_2034.jpg", "click here")."""
    template = _pick(rng, _BOILERPLATE)
    return template.format(
        n2=f"{int(rng.integers(10, 100))}",
        n4=f"{int(rng.integers(1000, 10000))}",
        n5=f"{int(rng.integers(10000, 100000))}",
    )


def human_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct correct captions (about 4 in 5 full), COCO-like."""
    captions: list[str] = []
    for _ in range(50 * n):
        if len(captions) == n:
            break
        caption = describe(scene, rng, full=rng.random() < 0.8)
        if caption not in captions:
            captions.append(caption)
    while len(captions) < n:  # the grammar ran out of paraphrases: repeat some
        captions.append(captions[len(captions) % max(len(captions), 1)])
    return captions


def grammar_words() -> set[str]:
    """Every word the grammar (not boilerplate) can produce; all are in BERT's vocabulary."""
    words: set[str] = set()
    for color, kind, size in itertools.product(COLORS, KINDS, SIZES):
        for pos_a, pos_b in [("left", "right"), ("top", "bottom")]:
            a, b = Shape(color, kind, size, pos_a), Shape("red", "star", size, pos_b)
            for rng_seed in range(40):
                rng = np.random.default_rng(rng_seed)
                for scene in (Scene((a,), 0), Scene((a, b), 0)):
                    words.update(describe(scene, rng, full=bool(rng_seed % 2)).split())
                    words.update(terse_caption(scene, rng).split())
        words.update(describe(Scene((Shape(color, kind, size, "center"),), 0)).split())
    for phrases in _POS_PHRASES.values():
        for p in phrases:
            words.update(p.split())
    return words


# --------------------------------------------------------------------------------------------
# Checking a caption against a scene (for evaluating captioners and filters)

_COLOR_WORDS = {c: c for c in COLORS}
_KIND_WORDS = {k: k for k in KINDS} | {f"{k}s": k for k in KINDS}
_SIZE_OF = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_POS_OF = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": "center",
    "centre": "center",
    "middle": "center",
}
_REL_OF = {
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "beside": "any",
    "next": "any",
}
_POS_REL = {"left": "left_of", "right": "right_of", "top": "above", "bottom": "below", "center": "any"}
_FRAME_WORDS = {"image", "picture", "photo", "frame"}


@dataclass
class _Mention:
    color: str | None = None
    kind: str | None = None
    size: str | None = None
    position: str | None = None

    def empty(self) -> bool:
        return self.color is None and self.kind is None and self.size is None


def _parse(caption: str) -> tuple[list[_Mention], list[tuple[int, str, int]]]:
    """Mentions of shapes and relations (subject index, relation, object index)."""
    tokens = re.findall(r"[a-z]+", caption.lower())
    mentions: list[_Mention] = []
    relations: list[tuple[int, str, int]] = []
    pending = _Mention()  # adjectives waiting for their noun
    pending_pos: str | None = None  # a position stated before any shape ("on the left there is")
    open_relation: tuple[int, str] | None = None  # waiting for its object

    def close() -> None:
        nonlocal pending, pending_pos, open_relation
        if pending.empty():
            return
        pending.position = pending.position or pending_pos
        pending_pos = None
        mentions.append(pending)
        if open_relation is not None:
            relations.append((open_relation[0], open_relation[1], len(mentions) - 1))
            open_relation = None
        pending = _Mention()

    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _SIZE_OF:
            pending.size = _SIZE_OF[t]
        elif t in _COLOR_WORDS:
            pending.color = t
        elif t in _KIND_WORDS or t in ("shape", "shapes", "object"):
            pending.kind = _KIND_WORDS.get(t)
            close()
        elif t in _POS_OF or t in _REL_OF:
            close()
            j = i + 1
            while j < len(tokens) and tokens[j] in ("side", "to"):  # "left side of", "next to"
                j += 1
            has_of = j < len(tokens) and tokens[j] == "of"
            k = j + 1 if has_of else j
            while k < len(tokens) and tokens[k] in ("the", "a", "an"):
                k += 1
            of_frame = has_of and k < len(tokens) and tokens[k] in _FRAME_WORDS
            rel = _REL_OF.get(t) or (_POS_REL[_POS_OF[t]] if has_of and not of_frame else None)
            if rel is not None:  # "to the left of X", "above X", "on top of X"
                if mentions:
                    open_relation = (len(mentions) - 1, rel)
                i = j + 1 if has_of else i + 1
                continue
            if mentions and pending_pos is None and mentions[-1].position is None:
                mentions[-1].position = _POS_OF[t]  # "a red circle on the left"
            else:
                pending_pos = _POS_OF[t]  # "on the left there is a red circle"
            if of_frame:
                i = k
        else:
            close()
        i += 1
    close()
    if pending_pos is not None and mentions:  # a trailing position with no shape after it
        mentions.append(replace(mentions[-1], position=pending_pos))
    return mentions, relations


def _holds(rel: str, a: Shape, b: Shape) -> bool:
    if a is b:
        return False
    return {
        "left_of": a.position == "left" and b.position == "right",
        "right_of": a.position == "right" and b.position == "left",
        "above": a.position == "top" and b.position == "bottom",
        "below": a.position == "bottom" and b.position == "top",
        "any": True,
    }[rel]


def is_correct(caption: str, scene: Scene) -> bool:
    """Whether a caption says something true and nothing false about a scene.

    Understands the grammar's vocabulary (colours, kinds, sizes, positions, relations and a
    few synonyms such as "big", "middle", "over"): every mentioned shape must match a shape of
    the scene in every stated attribute, and every stated relation must hold. A caption that
    mentions no shape (boilerplate) is not correct. Partial captions ("a red circle") are.

    Args:
        caption: Free text.
        scene: The scene it should describe.
    """
    mentions, relations = _parse(caption)
    if not mentions or len(mentions) > 12:
        return False

    def fits(m: _Mention, s: Shape) -> bool:
        return all(
            want is None or want == have
            for want, have in (
                (m.color, s.color),
                (m.kind, s.kind),
                (m.size, s.size),
                (m.position, s.position),
            )
        )

    shapes = scene.shapes
    options = [[s for s in shapes if fits(m, s)] for m in mentions]
    if any(not o for o in options):
        return False
    for assignment in itertools.product(*options):
        if all(_holds(rel, assignment[a], assignment[b]) for a, rel, b in relations):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Writing a world


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent random stream per purpose: changing n_web leaves the human split alone."""
    return np.random.default_rng([seed, stream])


def _human_split(rng: np.random.Generator, n: int, distinct: bool, pair_fraction: float) -> list[Scene]:
    scenes: list[Scene] = []
    seen: set[tuple[Any, ...]] = set()
    while len(scenes) < n:
        scene = sample_scene(rng, pair_fraction)
        if distinct and scene.signature() in seen:
            continue  # evaluation splits: every image has its own full description
        seen.add(scene.signature())
        scenes.append(scene)
    return scenes


def _write_human(root: Path, truth: Path, cfg: WorldConfig) -> dict[str, Any]:
    rng = _rng(cfg.seed, 1)
    images: list[HumanImage] = []
    (root / "images").mkdir(parents=True)
    with open(truth / "human_scenes.jsonl", "w", encoding="utf-8") as f:
        for split, n in (("train", cfg.n_human_train), ("val", cfg.n_human_val), ("test", cfg.n_human_test)):
            for i, scene in enumerate(_human_split(rng, n, split != "train", cfg.pair_fraction)):
                image_id = f"{split}_{i:05d}"
                rel = f"images/{image_id}.jpg"
                (root / rel).write_bytes(encode(render(scene, cfg.image_size), cfg.jpeg_quality))
                captions = human_captions(scene, rng, cfg.captions_per_image)
                images.append(HumanImage(rel, tuple(captions), split, image_id))
                record = {
                    "image_id": image_id,
                    "split": split,
                    "scene": scene.to_json(),
                    "true_caption": canonical_caption(scene),
                }
                f.write(json.dumps(record) + "\n")
    write_karpathy(root / "annotations.json", images)
    per_split = Counter(im.split for im in images)
    return {
        "images": {s: per_split.get(s, 0) for s in ("train", "val", "test")},
        "captions": sum(len(im.captions) for im in images),
    }


def _exact_kinds(rng: np.random.Generator, cfg: WorldConfig) -> list[str]:
    """Web text kinds with exact counts, in random order."""
    n_noisy = round(cfg.web_noise * cfg.n_web)
    n_mismatched = round(cfg.mismatched_share * n_noisy)
    n_terse = round(cfg.terse_share * (cfg.n_web - n_noisy))
    kinds = (
        ["mismatched"] * n_mismatched
        + ["boilerplate"] * (n_noisy - n_mismatched)
        + ["terse"] * n_terse
        + ["correct"] * (cfg.n_web - n_noisy - n_terse)
    )
    return [kinds[i] for i in rng.permutation(len(kinds))]


def _web_text(i: int, kind: str, scenes: list[Scene], rng: np.random.Generator, pair_fraction: float) -> str:
    scene = scenes[i]
    if kind == "correct":
        text = describe(scene, rng, full=True)
        return text[0].upper() + text[1:] if rng.random() < 0.3 else text  # alt-text style
    if kind == "terse":
        return terse_caption(scene, rng)
    if kind == "boilerplate":
        return boilerplate_caption(rng)
    for _ in range(100):  # mismatched: another web image with nothing in common
        j = int(rng.integers(len(scenes)))
        if not scene.content & scenes[j].content:
            return describe(scenes[j], rng, full=True)
    while True:  # tiny worlds: describe a fresh scene instead
        other = sample_scene(rng, pair_fraction)
        if not scene.content & other.content:
            return describe(other, rng, full=True)


def _write_web(root: Path, truth: Path, cfg: WorldConfig) -> dict[str, Any]:
    rng = _rng(cfg.seed, 2)
    scenes = [sample_scene(rng, cfg.pair_fraction) for _ in range(cfg.n_web)]
    kinds = _exact_kinds(rng, cfg)
    texts = [_web_text(i, k, scenes, rng, cfg.pair_fraction) for i, k in enumerate(kinds)]
    keys = [shard_key(i // cfg.shard_size, i % cfg.shard_size, cfg.shard_size) for i in range(cfg.n_web)]

    def samples() -> Iterator[Sample]:
        for key, scene, text in zip(keys, scenes, texts, strict=True):
            jpg = encode(render(scene, cfg.image_size), cfg.jpeg_quality)
            meta = {
                "url": f"https://shapes.invalid/{key}.jpg",
                "width": cfg.image_size,
                "height": cfg.image_size,
                "original_width": cfg.image_size,
                "original_height": cfg.image_size,
                "sha256": sha256_bytes(jpg),  # img2dataset's: of the "downloaded" bytes, stored as is
            }
            yield Sample(key, jpg, text, meta)

    root.mkdir(parents=True)
    shards = write_shards(samples(), root, cfg.shard_size)
    for n, shard in enumerate(shards):
        _write_shard_stats(shard, min(cfg.shard_size, cfg.n_web - n * cfg.shard_size))
    with open(truth / "web_truth.jsonl", "w", encoding="utf-8") as f:
        for key, scene, kind, text in zip(keys, scenes, kinds, texts, strict=True):
            record = {
                "key": key,
                "noisy": kind in NOISY_KINDS,
                "kind": kind,
                "caption": text,
                "true_caption": canonical_caption(scene),
                "scene": scene.to_json(),
            }
            f.write(json.dumps(record) + "\n")
    by_kind = Counter(kinds)
    n_noisy = sum(by_kind[k] for k in NOISY_KINDS)
    return {
        "pairs": cfg.n_web,
        "shards": len(shards),
        "by_kind": {k: by_kind.get(k, 0) for k in (*CLEAN_KINDS, *NOISY_KINDS)},
        "noisy": n_noisy,
        "noise_ratio": n_noisy / cfg.n_web if cfg.n_web else 0.0,
    }


def generate_world(out: str | Path, cfg: WorldConfig = WorldConfig()) -> dict[str, Any]:
    """Writes a shapes world to ``out`` (replacing it atomically) and returns its manifest.

    The same config gives byte-identical output (``tree_hash`` equal across runs).

    Args:
        out: Destination folder.
        cfg: World sizes, noise and seed.

    Returns:
        The manifest, also written to ``out/manifest.json``: generator version, config,
        counts per split and kind, and ``tree_hash`` of ``human``, ``web`` and ``truth``.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        truth = tmp / "truth"
        truth.mkdir()
        human = _write_human(tmp / "human", truth, cfg)
        web = _write_web(tmp / "web", truth, cfg)
        manifest = {
            "generator": "blip_core.data.shapes",
            "version": GENERATOR_VERSION,
            "config": asdict(cfg),
            "counts": {"human": human, "web": web},
            "files": {
                "human_annotations": "human/annotations.json",
                "web_shards": "web",
                "web_truth": "truth/web_truth.jsonl",
                "human_scenes": "truth/human_scenes.jsonl",
            },
            "hashes": {name: tree_hash(tmp / name) for name in ("human", "web", "truth")},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest

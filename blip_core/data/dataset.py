"""PyTorch datasets over web shards and Karpathy-split JSON.

A *source* is one of:

- a folder of web shards (``*.tar``) or a single ``.tar``;
- ``path/to/annotations.json:SPLIT`` (or ``path/to/folder:SPLIT`` for a folder holding an
  ``annotations.json``), image paths relative to the JSON's folder.

Every sample goes through the same checks as ``blip_core.data.ingest`` (the functions are
shared); samples that fail are skipped, counted in ``dataset.skipped`` and reported with one
warning per dataset, never silently.

Memory: images are decoded once, at construction, and kept as uint8 arrays. That is the right
trade for the embedded shapes world and small fine-tuning sets (thousands of 64–384 px
images: tens to a few hundred MB, shared copy-on-write with DataLoader workers, no JPEG
decoding per epoch). Web-scale corpora should be streamed with ``webdataset`` instead.
Captions are returned as stored (whitespace-normalised); BLIP's ``pre_caption`` is applied
by the text collator.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from blip_core.data.formats import Rejection, list_shards, read_karpathy, split_source
from blip_core.data.ingest import (
    DEFAULT_CONFIG,
    IngestConfig,
    InvalidSample,
    clean_caption,
    decode_image,
    iter_valid,
    read_image_file,
)

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean used by BLIP (CLIP's) to normalise images."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation used by BLIP (CLIP's)."""

Transform = Callable[[Image.Image], torch.Tensor]


def image_transform(image_size: int, train: bool = False) -> Transform:
    """PIL RGB image -> normalised tensor ``[3, image_size, image_size]``.

    Training adds only a mild random resized crop (80–100 % of the area, near-square). There
    is deliberately no horizontal flip and no colour jitter, unlike BLIP's recipe: captions
    state positions ("on the left") and colours, which those augmentations would falsify.

    Args:
        image_size: Output side in pixels.
        train: Whether to apply the training augmentation.
    """
    bicubic = T.InterpolationMode.BICUBIC
    resize: torch.nn.Module = (
        T.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=bicubic)
        if train
        else T.Resize((image_size, image_size), interpolation=bicubic)
    )
    return T.Compose([resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


# --------------------------------------------------------------------------------------------
# Loading sources


@dataclass
class _Image:
    id: str  # web key or Karpathy image_id
    pixels: np.ndarray  # [H, W, 3] uint8
    captions: list[str]


def parse_source(source: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Splits a source string into (path, split); split is None for web shards.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If a JSON source lacks its ``:split`` suffix.
    """
    text = str(source)
    head, split = split_source(text)
    path = Path(head)
    if not path.exists():
        raise FileNotFoundError(f"data source {text!r} not found")
    if split is not None and path.is_dir():
        path = path / "annotations.json"
    if split is None and path.suffix == ".json":
        raise ValueError(f"{text!r}: name the split of a JSON source, e.g. '{text}:train'")
    return path, split


def _load_shards(path: Path, skipped: Counter[str], cfg: IngestConfig) -> Iterator[_Image]:
    """One image per sample; consecutive samples whose ``.json`` names the same ``image_id`` (a
    bootstrapped corpus stores an image once per kept caption) become one image with several
    captions, so that they are positives of each other."""
    shards = [path] if path.is_file() else list_shards(path)
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {path}")
    current: _Image | None = None
    for item in iter_valid(shards, cfg):
        if isinstance(item, Rejection):
            skipped[item.reason] += 1
            continue
        image_id = str(item.meta.get("image_id") or item.key)
        if current is not None and current.id == image_id:
            current.captions.append(item.caption)
            continue
        if current is not None:
            yield current
        current = _Image(image_id, np.asarray(item.image, dtype=np.uint8), [item.caption])
    if current is not None:
        yield current


def _load_karpathy(path: Path, split: str, skipped: Counter[str], cfg: IngestConfig) -> Iterator[_Image]:
    root = path.parent
    for im in read_karpathy(path):
        if im.split != split:
            continue
        try:
            image, _ = decode_image(read_image_file(root, im.image, cfg), cfg)
        except InvalidSample as e:
            skipped[e.reason] += 1
            continue
        captions = []
        for caption in im.captions:
            try:
                captions.append(clean_caption(caption, cfg))
            except InvalidSample as e:
                skipped[e.reason] += 1
        if captions:
            yield _Image(im.image_id, np.asarray(image, dtype=np.uint8), captions)


def load_images(
    sources: Sequence[str | os.PathLike[str]], cfg: IngestConfig = DEFAULT_CONFIG
) -> tuple[list[_Image], Counter[str]]:
    """Decodes every valid image (with its captions) of the sources, in order."""
    skipped: Counter[str] = Counter()
    images: list[_Image] = []
    for source in sources:
        path, split = parse_source(source)
        loader = (
            _load_shards(path, skipped, cfg) if split is None else _load_karpathy(path, split, skipped, cfg)
        )
        images.extend(loader)
    if skipped:
        log.warning(
            "skipped %d invalid samples/captions in %s: %s",
            sum(skipped.values()),
            [str(s) for s in sources],
            dict(skipped),
        )
    return images, skipped


def _as_list(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list:
    return [sources] if isinstance(sources, str | os.PathLike) else list(sources)


# --------------------------------------------------------------------------------------------
# Datasets


class _DecodedImages(Dataset):
    """The decoded images of some sources, and the transform that turns one into a tensor."""

    def _load(self, sources: Sequence[str | os.PathLike[str]], transform: Transform | None,
              image_size: int, train: bool, cfg: IngestConfig) -> list[_Image]:
        """Decodes the valid images of ``sources`` (skipped ones counted in ``skipped``)."""
        images, self.skipped = load_images(list(sources), cfg)
        self.transform = transform or image_transform(image_size, train)
        self.images = [im.pixels for im in images]  # [H, W, 3] uint8 each
        return images

    def _tensor(self, image_index: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.images[image_index]))


class ImageTextDataset(_DecodedImages):
    """One item per (image, caption) pair of the given sources, for training.

    Items are ``(image, caption, image_index)``: ``image`` a tensor ``[3, H, W]``, ``caption``
    a string, ``image_index`` an int identifying the image across all sources (pairs of one
    image share it: an image with 5 captions gives 5 items).

    Args:
        sources: Sources (see the module docstring), concatenated in order.
        transform: PIL -> tensor; default :func:`image_transform` of ``image_size``/``train``.
        image_size: Side of the output images when ``transform`` is None.
        train: Whether the default transform augments.
        cfg: The ingest limits used to reject bad samples.
    """

    def __init__(
        self,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        transform: Transform | None = None,
        image_size: int = 64,
        train: bool = False,
        cfg: IngestConfig = DEFAULT_CONFIG,
    ) -> None:
        images = self._load(_as_list(sources), transform, image_size, train, cfg)
        self.image_ids = [im.id for im in images]
        self.captions = [c for im in images for c in im.captions]
        self.pair_image = [i for i, im in enumerate(images) for _ in im.captions]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        image_index = self.pair_image[index]
        return self._tensor(image_index), self.captions[index], image_index


class ImageCaptionsSplit(_DecodedImages):
    """The images of one split with all their captions, for retrieval and captioning eval.

    Mirrors BLIP's ``coco_karpathy_retrieval_eval``: ``texts`` flattens every caption,
    ``txt2img[t]`` is the image of text ``t`` and ``img2txt[i]`` the texts of image ``i``.
    Items are ``(image [3, H, W], image_index)``.

    Args:
        source: ``annotations.json:SPLIT`` (or ``folder:SPLIT``); or a path with ``split``.
        split: The split when ``source`` has no ``:SPLIT`` suffix.
        transform: PIL -> tensor; default the evaluation :func:`image_transform`.
        image_size: Side of the output images when ``transform`` is None.
        cfg: The ingest limits used to reject bad samples.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        split: str | None = None,
        transform: Transform | None = None,
        image_size: int = 64,
        cfg: IngestConfig = DEFAULT_CONFIG,
    ) -> None:
        spec = f"{source}:{split}" if split is not None else source
        path, self.split = parse_source(spec)
        if self.split is None:
            raise ValueError(f"{spec!r} is not a Karpathy JSON split")
        images = self._load([spec], transform, image_size, False, cfg)
        self.image_ids = [im.id for im in images]
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for i, im in enumerate(images):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(im.captions))))
            self.texts.extend(im.captions)
            self.txt2img.extend([i] * len(im.captions))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._tensor(index), index

    def references(self) -> dict[str, list[str]]:
        """image_id -> its captions (the references of captioning metrics)."""
        return {self.image_ids[i]: [self.texts[t] for t in texts] for i, texts in enumerate(self.img2txt)}


class ImageOnlyDataset(_DecodedImages):
    """The images of web shards (or of a JSON split), for caption generation and filtering.

    Items are ``(image [3, H, W], key)`` where ``key`` is the web key (or image_id); the
    caption stored with each image is kept in ``captions`` (same order) for the filter.

    Args:
        sources: One source or several (see the module docstring).
        transform: PIL -> tensor; default the evaluation :func:`image_transform`.
        image_size: Side of the output images when ``transform`` is None.
        cfg: The ingest limits used to reject bad samples.
    """

    def __init__(
        self,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        transform: Transform | None = None,
        image_size: int = 64,
        cfg: IngestConfig = DEFAULT_CONFIG,
    ) -> None:
        images = self._load(_as_list(sources), transform, image_size, False, cfg)
        self.keys = [im.id for im in images]
        self.captions = [im.captions for im in images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self._tensor(index), self.keys[index]

"""The CapFilt filter: ITM match probabilities of image–text pairs, and keep / remove decisions.

A text is noisy when the filter's ITM match probability ``softmax(itm_logits)[:, 1]`` is below a
threshold (0.5 by default, as in the paper). Each image is encoded once, however many texts it
has: its tokens are repeated (``index_select``) for its texts inside one ITM forward.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from blip_core.generate import (
    add_model_run_args,
    inference,
    load_model_and_images,
    model_device,
    read_captions_jsonl,
)
from blip_core.model import BlipModel
from blip_core.tokenizer import pre_caption

DEFAULT_THRESHOLD = 0.5


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-normalised ([`pre_caption`]) texts to (T, L) ids and mask, [CLS] first, truncated."""
    batch = tokenizer([pre_caption(t) for t in texts], padding="longest", truncation=True,
                      max_length=max_len, return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def itm_probabilities(
    model: BlipModel,
    tokenizer: Any,
    images: torch.Tensor,
    texts: Sequence[Sequence[str]],
    *,
    bf16: bool = False,
) -> list[torch.Tensor]:
    """ITM match probabilities of every text of every image.

    Args:
        images: (B, 3, H, W) normalised images.
        texts: B lists of texts; ``texts[b]`` are scored against image ``b`` (may be empty).
        bf16: run under bf16 autocast.

    Returns:
        B float tensors on the CPU, ``out[b]`` of shape (len(texts[b]),) with values in [0, 1].
    """
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} text lists")
    counts = [len(t) for t in texts]
    flat = [t for group in texts for t in group]
    if not flat:
        return [torch.zeros(0) for _ in texts]
    device = model_device(model)
    with inference(model, bf16):
        ids, mask = tokenize_texts(tokenizer, flat, model.cfg.max_text_len, device)
        if all(c == 1 for c in counts):  # one text per image: no gather, no host-device syncs
            image_embeds = model.encode_image(images.to(device))  # (B, 1 + N, Dv)
        else:
            keep = [b for b, c in enumerate(counts) if c > 0]  # index built on the host
            owner = [row for row, b in enumerate(keep) for _ in range(counts[b])]  # (T,)
            encoded = model.encode_image(images[keep].to(device))  # (B', 1 + N, Dv), once each
            image_embeds = encoded[torch.tensor(owner, device=device)]
        logits = model.itm_logits(image_embeds, ids, mask)  # (T, 2)
        probs = logits.float().softmax(-1)[:, 1].cpu()
    return list(probs.split(counts))


def filter_decisions(
    probs: torch.Tensor | Sequence[float], threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Keep mask of texts: (T,) bool, False (noisy) where the match probability < ``threshold``."""
    return torch.as_tensor(probs, dtype=torch.float32) >= threshold


def score_dataset(
    model: BlipModel,
    tokenizer: Any,
    dataset: Iterable[tuple[torch.Tensor, str]],
    texts_by_key: dict[str, list[str]],
    batch_size: int,
    *,
    num_workers: int = 0,
    progress: bool = True,
    bf16: bool = False,
) -> dict[str, list[float]]:
    """Score the texts of each image of a dataset of ``(image (3, H, W), key)`` items.

    Args:
        dataset: e.g. ``blip_core.data.dataset.ImageOnlyDataset``.
        texts_by_key: texts to score per image key; images without texts are skipped.

    Returns:
        key -> match probabilities in the order of ``texts_by_key[key]``, for the keys found in
        the dataset.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)  # type: ignore[arg-type]
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    out: dict[str, list[float]] = {}
    with tqdm(total=total, desc="filter", unit="img", disable=not progress) as bar:
        for images, keys in loader:
            texts = [texts_by_key.get(k, []) for k in keys]
            for key, probs in zip(keys, itm_probabilities(model, tokenizer, images, texts, bf16=bf16),
                                  strict=True):
                if key in texts_by_key:
                    out[key] = probs.tolist()
            bar.update(len(keys))
    return out


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``blip-core filter``."""
    p = argparse.ArgumentParser(
        prog="blip-core filter",
        description="Score image-text pairs with a filter checkpoint's ITM head: each image's own "
                    "caption(s) and, with --texts, the captions of a `blip-core caption` file. "
                    "Writes one JSON line per image: {\"key\", \"texts\", \"origin\" (own|extra), "
                    "\"itm\" (match probabilities), \"keep\"}.",
    )
    p.add_argument("--checkpoint", required=True, help="filter checkpoint folder")
    p.add_argument("--data", required=True, help="shard folder / .tar, or ANNOTATIONS.json:SPLIT")
    p.add_argument("--texts", type=Path, help="extra texts: a captions .jsonl ({key, captions})")
    p.add_argument("--out", type=Path, required=True, help="scores .jsonl to write (atomically)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"noisy when the match probability is below it (default {DEFAULT_THRESHOLD})")
    add_model_run_args(p, batch_size=64)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core filter``: score a dataset's texts and write ``--out`` atomically."""
    from blip_core.io import atomic_write_text

    args = build_parser().parse_args(argv)
    model, tokenizer, dataset, _ = load_model_and_images(args)
    extra = read_captions_jsonl(args.texts) if args.texts else {}
    unknown = set(extra) - set(dataset.keys)
    if unknown:
        print(f"warning: {len(unknown)} keys of {args.texts} are not in {args.data} "
              f"(e.g. {sorted(unknown)[:3]}); their texts are not scored")
    texts: dict[str, list[str]] = {}
    origins: dict[str, list[str]] = {}
    for key, own in zip(dataset.keys, dataset.captions, strict=True):
        texts[key] = list(own) + extra.get(key, [])
        origins[key] = ["own"] * len(own) + ["extra"] * len(extra.get(key, []))

    start = time.perf_counter()
    scores = score_dataset(model, tokenizer, dataset, texts, args.batch_size,
                           num_workers=args.num_workers, progress=not args.no_progress,
                           bf16=args.bf16)
    seconds = time.perf_counter() - start
    kept: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    lines = []
    for key in dataset.keys:
        keep = filter_decisions(scores[key], args.threshold).tolist()
        for origin, k in zip(origins[key], keep, strict=True):
            (kept if k else removed)[origin] += 1
        lines.append(json.dumps({"key": key, "texts": texts[key], "origin": origins[key],
                                 "itm": [round(p, 6) for p in scores[key]], "keep": keep},
                                ensure_ascii=False))
    atomic_write_text(args.out, "".join(line + "\n" for line in lines))
    pairs = sum(len(s) for s in scores.values())
    for origin in ("own", "extra"):
        n = kept[origin] + removed[origin]
        if n:
            print(f"{origin}: kept {kept[origin]} / {n}, removed {removed[origin]} "
                  f"(threshold {args.threshold})")
    print(f"{pairs} pairs of {len(scores)} images in {seconds:.1f}s = "
          f"{pairs / max(seconds, 1e-9):.0f} pairs/s")
    print(f"written to {args.out.resolve()}")
    return 0

"""Downstream evaluation: image–text retrieval and captioning, and side-by-side comparisons.

Retrieval follows BLIP's COCO evaluation: ITC cosine similarities of all images x all texts
(features computed once, in batches), then for every image its top-k texts, and for every text
its top-k images, are re-ranked by ``ITM match logit + ITC similarity``; pairs outside the top k
keep no score (-inf). The ITM head runs only on those pairs (each distinct pair once even when it
is in both directions' top k), and each image is encoded once for the whole evaluation
(retrieval and captioning share its tokens). Recall@K is in percent, as BLIP's ``itm_eval``:
image->text counts an image as found at K when its best-ranked ground-truth caption is in the
top K; ties are counted against the model.

Captioning: BLEU-4 and CIDEr (pycocoevalcap's scorers) of one caption per image against the
split's references, both tokenised here (lower case, punctuation stripped, so no Java / PTB
tokenizer is needed). Both are reported x100 as in the paper (CIDEr 127.8 = 1.278 raw). METEOR
(Java) only when asked for and ``java`` is on the PATH. By default captions use BLIP's
evaluation decoding: beam search, 3 beams, at most 20 and at least 5 tokens after the prompt.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip_core.config import DECODING
from blip_core.device import resolve_device
from blip_core.filtering import tokenize_texts
from blip_core.generate import (
    decode_captions,
    generate_token_ids,
    inference,
    model_device,
    prompt_token_ids,
)
from blip_core.model import BlipModel

RETRIEVAL_KEYS = ("tr@1", "tr@5", "tr@10", "ir@1", "ir@5", "ir@10", "r_mean")
CAPTION_KEYS = ("bleu4", "cider", "meteor")
METRIC_KEYS = RETRIEVAL_KEYS + CAPTION_KEYS
# BLIP's evaluation decoding for COCO captioning: beam search, the other settings as DECODING.
DEFAULT_CAPTION_KWARGS: dict[str, Any] = {"method": "beam"}


# --- retrieval -----------------------------------------------------------------------------


def recall_metrics(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """Recall@1/5/10 in both directions, in percent (BLIP's ``itm_eval``).

    Args:
        scores_i2t: (I, T) score of each text for each image (higher is better).
        scores_t2i: (T, I) score of each image for each text.
        img2txt: ground-truth texts of each image.
        txt2img: ground-truth image of each text.

    Returns:
        "tr@1", "tr@5", "tr@10" (image->text), "ir@1", "ir@5", "ir@10" (text->image) and
        "r_mean", their mean.
    """
    n_img, n_txt = scores_i2t.shape
    gt_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(img2txt):
        gt_i2t[i, list(texts)] = True
    gt_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool)
    gt_t2i[torch.arange(n_txt), torch.as_tensor(list(txt2img), dtype=torch.long)] = True
    out: dict[str, float] = {}
    for prefix, scores, gt in (("tr", scores_i2t, gt_i2t), ("ir", scores_t2i, gt_t2i)):
        ranks = gt_ranks(scores.float().cpu(), gt)
        for k in (1, 5, 10):
            out[f"{prefix}@{k}"] = 100.0 * (ranks < k).float().mean().item()
    out["r_mean"] = sum(out[k] for k in RETRIEVAL_KEYS[:-1]) / 6
    return out


def gt_ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(Q,) 0-based rank of the best-scored ground truth of each query row.

    The rank is the number of non-ground-truth candidates scoring at least as high (ties count
    against the model). ``scores`` and ``gt`` are (Q, C); every row needs a ground truth.
    """
    if not bool(gt.any(dim=1).all()):
        raise ValueError("every query needs at least one ground-truth candidate")
    best = scores.masked_fill(~gt, float("-inf")).max(dim=1, keepdim=True).values  # (Q, 1)
    return ((scores >= best) & ~gt).sum(dim=1)


def itc_features(
    model: BlipModel,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(I, E) image and (T, E) text unit ITC features, in batches (call under ``inference``)."""
    image_feat = torch.cat([model.image_features(image_embeds[i : i + batch_size])
                            for i in range(0, image_embeds.shape[0], batch_size)])
    text_feat = []
    for i in range(0, text_ids.shape[0], batch_size):
        ids, mask = _trim(text_ids[i : i + batch_size], text_mask[i : i + batch_size])
        text_feat.append(model.text_features(ids, mask))
    return image_feat.float(), torch.cat(text_feat).float()


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns a batch does not need."""
    length = int(mask.sum(dim=1).max())
    return ids[:, :length], mask[:, :length]


def retrieval_scores(
    model: BlipModel,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    k: int = 256,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's retrieval scores: ITC top-k re-ranked by ITM (call under ``inference``).

    Args:
        image_embeds: (I, 1 + N, Dv) encoded images.
        text_ids, text_mask: (T, L) tokenised texts, [CLS] first.
        k: candidates re-ranked per query (capped at the number of candidates).
        batch_size: image-text pairs per ITM forward (and items per feature batch).

    Returns:
        (I, T) image->text and (T, I) text->image scores: ``itm_logit + itc_sim`` on each
        query's top-k candidates, -inf elsewhere.
    """
    from tqdm.auto import tqdm

    image_feat, text_feat = itc_features(model, image_embeds, text_ids, text_mask, batch_size)
    sims = image_feat @ text_feat.t()  # (I, T)
    n_img, n_txt = sims.shape
    k_t, k_i = min(k, n_txt), min(k, n_img)
    top_t = sims.topk(k_t, dim=1).indices  # (I, k_t) texts of each image
    top_i = sims.t().topk(k_i, dim=1).indices  # (T, k_i) images of each text
    i2t_pairs = torch.arange(n_img, device=sims.device)[:, None] * n_txt + top_t
    t2i_pairs = top_i * n_txt + torch.arange(n_txt, device=sims.device)[:, None]
    pairs, inverse = torch.unique(torch.cat([i2t_pairs.view(-1), t2i_pairs.view(-1)]),
                                  return_inverse=True)  # each distinct (image, text) once
    itm = torch.empty(pairs.shape[0], device=sims.device)
    for start in tqdm(range(0, pairs.shape[0], batch_size), desc="itm re-rank", unit="batch",
                      disable=not progress):
        chunk = pairs[start : start + batch_size]
        img, txt = chunk // n_txt, chunk % n_txt
        ids, mask = _trim(text_ids[txt], text_mask[txt])
        itm[start : start + batch_size] = model.itm_logits(image_embeds[img], ids, mask)[:, 1].float()
    pair_itm = itm[inverse]
    itm_i2t = pair_itm[: i2t_pairs.numel()].view(n_img, k_t)
    itm_t2i = pair_itm[i2t_pairs.numel() :].view(n_txt, k_i)
    scores_i2t = torch.full_like(sims, float("-inf"))
    scores_i2t.scatter_(1, top_t, itm_i2t + sims.gather(1, top_t))
    sims_t = sims.t()
    scores_t2i = torch.full_like(sims_t, float("-inf"))
    scores_t2i.scatter_(1, top_i, itm_t2i + sims_t.gather(1, top_i))
    return scores_i2t.cpu(), scores_t2i.cpu()


# --- captioning ----------------------------------------------------------------------------


def caption_tokens(text: str) -> str:
    """Lower case, punctuation stripped, words separated by one space (for BLEU / CIDEr)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_metrics(
    candidates: dict[str, str], references: dict[str, Sequence[str]], meteor: bool = False
) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (x100, as papers report them) of one caption per image.

    Args:
        candidates: image id -> generated caption.
        references: image id -> its reference captions (same ids).
        meteor: also METEOR (x100); needs ``java`` on the PATH.

    Returns:
        {"bleu4", "cider"} and "meteor" when asked for.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(candidates) != set(references):
        raise ValueError("candidates and references must cover the same images")
    if not candidates:
        raise ValueError("no captions to score")
    res = {i: [caption_tokens(c)] for i, c in candidates.items()}
    gts = {i: [caption_tokens(r) for r in references[i]] for i in candidates}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}
    if meteor:
        if shutil.which("java") is None:
            raise RuntimeError("METEOR needs java on the PATH")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java subprocess, ended when the scorer is garbage collected
        score, _ = scorer.compute_score(gts, res)
        del scorer
        out["meteor"] = 100.0 * float(score)
    return out


# --- one checkpoint ------------------------------------------------------------------------


def _split_spec(annotations: str, split: str) -> tuple[str, str]:
    """``x.json:test`` -> (``x.json``, ``test``); a path without a suffix keeps ``split``."""
    from blip_core.data.formats import split_source

    path, named = split_source(str(annotations))
    return path, named or split


def encode_images(
    model: BlipModel, dataset: Any, batch_size: int, progress: bool = False
) -> torch.Tensor:
    """(I, 1 + N, Dv) tokens of every image of a dataset of ``(image, index)`` items."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size)
    return torch.cat([model.encode_image(images.to(device))
                      for images, _ in tqdm(loader, desc="encode images", disable=not progress)])


def evaluate_model(
    model: BlipModel,
    tokenizer: Any,
    dataset: Any,
    *,
    k: int = 256,
    batch_size: int = 64,
    caption_kwargs: dict[str, Any] | None = None,
    captioning: bool = True,
    meteor: bool = False,
    bf16: bool = False,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, str]]:
    """Retrieval and captioning metrics of a model on an ``ImageCaptionsSplit``.

    Returns:
        The metrics (see :func:`evaluate_checkpoint`) and image id -> generated caption.
    """
    timings: dict[str, float] = {}
    captions: dict[str, str] = {}
    start = time.perf_counter()
    with inference(model, bf16):
        image_embeds = encode_images(model, dataset, batch_size, progress)
        timings["seconds_encode"] = time.perf_counter() - start
        ids, mask = tokenize_texts(tokenizer, dataset.texts, model.cfg.max_text_len,
                                   model_device(model))
        t0 = time.perf_counter()
        scores_i2t, scores_t2i = retrieval_scores(model, image_embeds, ids, mask, k, batch_size,
                                                  progress)
        metrics = recall_metrics(scores_i2t, scores_t2i, dataset.img2txt, dataset.txt2img)
        timings["seconds_retrieval"] = time.perf_counter() - t0
        if captioning:
            t0 = time.perf_counter()
            kwargs = {**DEFAULT_CAPTION_KWARGS, **(caption_kwargs or {}), "num_captions": 1}
            prompt_ids = prompt_token_ids(tokenizer, model.cfg.prompt)
            generated = []
            for i in range(0, image_embeds.shape[0], batch_size):
                gen = generate_token_ids(model, image_embeds[i : i + batch_size], prompt_ids,
                                         **kwargs)
                generated.extend(c[0] for c in decode_captions(tokenizer, gen))
            captions = dict(zip(dataset.image_ids, generated, strict=True))
            metrics.update(caption_metrics(captions, dataset.references(), meteor=meteor))
            timings["seconds_captioning"] = time.perf_counter() - t0
    metrics.update(n_images=float(len(dataset.image_ids)), n_texts=float(len(dataset.texts)),
                   k=float(k), **timings, seconds=time.perf_counter() - start)
    return metrics, captions


def evaluate_checkpoint(
    checkpoint: str | Path,
    annotations: str,
    split: str = "test",
    k: int = 256,
    batch_size: int = 64,
    caption_kwargs: dict[str, Any] | None = None,
    device: str = "auto",
    *,
    captioning: bool = True,
    meteor: bool = False,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Evaluate a checkpoint folder on a Karpathy split.

    Args:
        checkpoint: model folder (``config.json``, ``model.safetensors``, ``tokenizer/``).
        annotations: Karpathy JSON (or ``x.json:SPLIT``, which overrides ``split``).
        k: retrieval candidates re-ranked by ITM per query (BLIP: 256 on COCO 5k).
        batch_size: images per encoder batch, pairs per ITM batch, images per decoding batch.
        caption_kwargs: overrides of :data:`DEFAULT_CAPTION_KWARGS` (beam search).
        captioning: also generate captions and score them.
        meteor: also METEOR (needs Java).

    Returns:
        "tr@1/5/10", "ir@1/5/10", "r_mean" (percent), "bleu4", "cider" (x100), "meteor" when
        asked, plus "n_images", "n_texts", "k" and timings ("seconds", "seconds_encode",
        "seconds_retrieval", "seconds_captioning").
    """
    from blip_core.checkpoint import load_for_inference
    from blip_core.data.dataset import ImageCaptionsSplit

    path, split = _split_spec(annotations, split)
    model, tokenizer = load_for_inference(checkpoint, resolve_device(device))
    dataset = ImageCaptionsSplit(path, split, image_size=model.cfg.vision.image_size)
    metrics, _ = evaluate_model(model, tokenizer, dataset, k=k, batch_size=batch_size,
                                caption_kwargs=caption_kwargs, captioning=captioning,
                                meteor=meteor, bf16=bf16, progress=progress)
    return metrics


# --- comparisons ---------------------------------------------------------------------------


def compare_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the metrics of several models, with deltas against the first.

    Args:
        results: model name -> metrics; the first model is the baseline.
    """
    names = list(results)
    if not names:
        raise ValueError("nothing to compare")
    keys = [k for k in METRIC_KEYS if any(k in m for m in results.values())]
    head = ["metric", *names, *(f"Δ {n} − {names[0]}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for key in keys:
        values = [results[n].get(key) for n in names]
        cells = [key, *("—" if v is None else f"{v:.2f}" for v in values)]
        base = values[0]
        for v in values[1:]:
            cells.append("—" if v is None or base is None else f"{v - base:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(results: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Grouped bar chart (PNG) of every metric, one bar per model; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from blip_core.io import atomic_write_bytes

    names = list(results)
    keys = [k for k in METRIC_KEYS if all(k in m for m in results.values())]
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys) + 2), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, [results[name][k] for k in keys], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("percent (BLEU-4, CIDEr x100)")
    ax.set_title("retrieval recall and captioning scores")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``blip-core eval``."""
    from blip_core.recipe import Recipe

    p = argparse.ArgumentParser(
        prog="blip-core eval",
        description="Retrieval (ITC top-k re-ranked by ITM; TR/IR@1/5/10) and captioning (BLEU-4, "
                    "CIDEr) metrics of one or more checkpoints on a Karpathy split; writes "
                    "OUT/metrics.json, OUT/comparison.md and OUT/comparison.png.",
    )
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint folder; repeat to compare (the first is the baseline)")
    p.add_argument("--name", action="append", help="display name of each --checkpoint, in order")
    p.add_argument("--data", required=True, help="ANNOTATIONS.json:SPLIT (e.g. human/annotations.json:test)")
    p.add_argument("--out", type=Path, required=True, help="folder for the metrics and comparison")
    d = Recipe().eval
    p.add_argument("--k", type=int, default=d.k,
                   help=f"candidates re-ranked by ITM (default {d.k}, the recipe's; BLIP: 256 on COCO 5k)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--caption-method", choices=["beam", "greedy", "nucleus"], default=d.caption_method,
                   help=f"decoding for the captioning metrics (default {d.caption_method}, the recipe's; "
                        "BLIP: beam)")
    p.add_argument("--num-beams", type=int, default=DECODING.num_beams)
    p.add_argument("--no-captioning", action="store_true", help="retrieval only")
    p.add_argument("--meteor", action="store_true", help="also METEOR (needs java; slow to start)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _names(checkpoints: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(checkpoints) or len(set(names)) != len(names):
            raise SystemExit("error: give one distinct --name per --checkpoint")
        return list(names)
    out = [Path(c).resolve().name or str(c) for c in checkpoints]
    return out if len(set(out)) == len(out) else [f"{i}:{n}" for i, n in enumerate(out)]


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core eval``: evaluate checkpoints, write the comparison, print the table."""
    from blip_core.report import write_comparison

    args = build_parser().parse_args(argv)
    names = _names(args.checkpoint, args.name)
    device = str(resolve_device(args.device))
    caption_kwargs = {"method": args.caption_method, "num_beams": args.num_beams}
    results: dict[str, dict[str, float]] = {}
    for name, ckpt in zip(names, args.checkpoint, strict=True):
        results[name] = evaluate_checkpoint(
            ckpt, args.data, k=args.k, batch_size=args.batch_size, caption_kwargs=caption_kwargs,
            device=device, captioning=not args.no_captioning, meteor=args.meteor, bf16=args.bf16,
            progress=not args.no_progress,
        )
        print(f"{name}: {results[name]['seconds']:.1f}s")
    table = write_comparison(results, args.out, data=args.data, k=args.k, caption_kwargs=caption_kwargs,
                             checkpoints=dict(zip(names, map(str, args.checkpoint), strict=True)))
    print(table)
    print(f"written to {args.out.resolve()}")
    return 0

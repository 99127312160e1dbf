"""CapFilt: caption the web images, filter web and synthetic texts, write the bootstrapped corpus.

The captioner and the filter are fine-tuned separately from the same pre-trained model (paper,
Table 4). Several of each form an ensemble: synthetic captions are pooled from every captioner,
and a text's match probability is the mean ITM probability over the filters.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from blip_core.checkpoint import load_for_inference
from blip_core.config import DECODING, parse_bool
from blip_core.data.dataset import ImageOnlyDataset, image_transform
from blip_core.data.formats import Rejection, Sample, list_shards, read_karpathy, write_shards
from blip_core.data.ingest import iter_valid
from blip_core.device import resolve_device
from blip_core.io import atomic_dir, atomic_write_json, sha256_bytes

SYNTHETIC_FILE = "synthetic.jsonl"
MANIFEST_FILE = "manifest.json"
SCORES_FILE = "scores.jsonl"


@dataclass(frozen=True)
class CapfiltConfig:
    """How captions are generated and texts filtered."""

    # A text is noisy when its ITM match probability is below the threshold. None: calibrate it
    # (see ``calibration``); a number: use it (the paper's argmax rule is 0.5).
    threshold: float | None = None
    # web: from the web texts' own scores, which split into a tight low mode of noisy texts and a
    # broad high one of clean texts (otsu_threshold; label-free); human: on calibration_split
    # of the human annotations (calibrate_threshold). web falls back to human when its scores do
    # not split into two clear modes.
    calibration: Literal["web", "human"] = "web"
    calibration_split: str = "val"  # held-out human split of the "human" calibration
    method: Literal["nucleus", "beam", "greedy"] = DECODING.method
    top_p: float = DECODING.top_p
    num_beams: int = DECODING.num_beams
    num_captions: int = 1  # synthetic captions per web image and captioner
    # Whether the synthetic captions the filter keeps join the corpus (the paper's C + F). The tiny
    # captioner of the CPU recipe names the colours but not the shapes (kinds right in ~24% of
    # captions, near chance): ~95% of the synthetic captions the filter keeps are wrong for their
    # image, which made the corpus noisier than the web. So they are generated, scored and
    # reported, but only web texts are filtered into the corpus (the paper's F alone); true is
    # the paper's C + F, for a captioner that sees what it describes.
    use_synthetic: bool = False
    max_length: int = DECODING.max_length
    min_length: int = DECODING.min_length
    batch_size: int = 64  # images per forward
    seed: int = 0  # seeds nucleus sampling
    shard_size: int = 2000  # samples per corpus shard
    device: str = "auto"  # cpu, cuda, or auto: cuda when available


def _batches(dataset: ImageOnlyDataset, size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    for start in range(0, len(dataset), size):
        idx = list(range(start, min(start + size, len(dataset))))
        yield torch.stack([dataset[i][0] for i in idx]), idx


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def caption_web(
    captioners: Sequence[str],
    web: Sequence[str],
    out: str | Path,
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Generate synthetic captions for every valid web image with each captioner.

    Writes ``out/synthetic.jsonl`` (one line per image: ``key`` and ``captions``, pooled over
    the captioners) and ``out/manifest.json``, atomically.

    Returns:
        The manifest: images, captions, captioners, seconds, generated tokens per second.
    """
    from blip_core.generate import CaptionStats, caption_dataset

    start = time.time()
    device = resolve_device(cfg.device)
    by_key: dict[str, list[str]] = {}
    stats = CaptionStats()
    dataset = ImageOnlyDataset(list(web))  # decoded once; each model sets its own transform
    for ckpt in captioners:
        model, tokenizer = load_for_inference(ckpt, device)
        dataset.transform = image_transform(model.cfg.vision.image_size)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        for key, caps in caption_dataset(
            model, tokenizer, dataset, cfg.batch_size, progress=progress, stats=stats,
            desc=f"caption ({Path(ckpt).name})", method=cfg.method, num_captions=cfg.num_captions,
            top_p=cfg.top_p, num_beams=cfg.num_beams, max_length=cfg.max_length,
            min_length=cfg.min_length, generator=generator,
        ):
            by_key.setdefault(key, []).extend(caps)
    manifest = {
        "images": len(by_key),
        "captions": sum(map(len, by_key.values())),
        "captioners": [str(c) for c in captioners],
        "config": _cfg_dict(cfg),
        "seconds": round(time.time() - start, 2),
        "tokens_per_second": round(stats.tokens_per_second, 1),  # of the generation alone
    }
    with atomic_dir(out) as tmp:
        lines = (json.dumps({"key": k, "captions": v}) for k, v in by_key.items())
        (tmp / SYNTHETIC_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


def read_synthetic(path: str | Path) -> dict[str, list[str]]:
    """Synthetic captions by web key, from a ``caption_web`` folder (or its jsonl file)."""
    from blip_core.generate import read_captions_jsonl

    path = Path(path)
    return read_captions_jsonl(path / SYNTHETIC_FILE if path.is_dir() else path)


def score_texts(
    filters: Sequence[str],
    web: Sequence[str] | ImageOnlyDataset,
    synthetic: dict[str, list[str]],
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Mean ITM match probability over ``filters`` of every web text and synthetic caption.

    Args:
        web: shard folders (or JSON splits), or their images already loaded.

    Returns:
        One row per text: ``key``, ``source`` ("web" or "synthetic"), ``text``, ``prob``.
    """
    from blip_core.filtering import itm_probabilities

    device = resolve_device(cfg.device)
    rows: list[dict[str, Any]] | None = None
    dataset = web if isinstance(web, ImageOnlyDataset) else ImageOnlyDataset(list(web))
    for ckpt in filters:
        model, tokenizer = load_for_inference(ckpt, device)
        dataset.transform = image_transform(model.cfg.vision.image_size)
        probs: list[float] = []
        with _progress(len(dataset), f"filter ({Path(ckpt).name})", progress) as bar:
            for images, idx in _batches(dataset, cfg.batch_size):
                texts = [dataset.captions[i] + synthetic.get(dataset.keys[i], []) for i in idx]
                for p in itm_probabilities(model, tokenizer, images.to(device), texts):
                    probs.extend(p.tolist())
                bar.update(len(idx))
        if rows is None:
            rows = [
                {"key": dataset.keys[i], "source": source, "text": text, "prob": 0.0}
                for i in range(len(dataset))
                for source, text in [("web", c) for c in dataset.captions[i]]
                + [("synthetic", c) for c in synthetic.get(dataset.keys[i], [])]
            ]
        for row, p in zip(rows, probs, strict=True):
            row["prob"] += p / len(filters)
    return rows or []


def calibrate_threshold(
    filters: Sequence[str],
    split: str,
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """The match-probability threshold that best tells true pairs from wrong ones on a held-out split.

    The ITM head learns with one positive per two negatives, so its probabilities lean low, and
    more so on texts shaped unlike its training captions (terse alt-texts): the argmax rule (0.5)
    then drops many clean web texts. Here each image of ``split`` is scored against its own
    captions (positives) and as many captions of other images (negatives, drawn with
    ``cfg.seed``), and the threshold maximising Youden's J (true-positive minus false-positive
    rate) is returned, halfway between the two scores it separates.

    Args:
        split: ``annotations.json:SPLIT`` of human pairs never trained on (``val``).

    Returns:
        ``threshold``, ``youden_j``, ``tpr``, ``fpr`` (at that threshold), ``positives``,
        ``negatives``, ``split``.
    """
    import numpy as np

    images = ImageOnlyDataset([split])
    if len(images) < 2:
        raise ValueError(f"calibrating the filter threshold needs at least 2 images in {split!r}, "
                         f"found {len(images)}; pass a fixed threshold instead")
    rng = np.random.default_rng(cfg.seed)
    owner = [i for i, caps in enumerate(images.captions) for _ in caps]
    pool = [c for caps in images.captions for c in caps]
    negatives: dict[str, list[str]] = {}
    for i, key in enumerate(images.keys):
        own = set(images.captions[i])
        picked: list[str] = []
        for t in rng.permutation(len(pool)):  # lazily: stops after len(own) usable texts
            if owner[t] != i and pool[t] not in own:
                picked.append(pool[t])
                if len(picked) == len(own):
                    break
        negatives[key] = picked
    rows = score_texts(filters, images, negatives, cfg, progress)
    pos = [r["prob"] for r in rows if r["source"] == "web"]  # each image's own captions
    neg = [r["prob"] for r in rows if r["source"] == "synthetic"]  # other images' captions
    return youden_threshold(pos, neg) | {"positives": len(pos), "negatives": len(neg), "split": split}


def youden_threshold(pos: Sequence[float], neg: Sequence[float]) -> dict[str, float]:
    """The threshold ``t`` (keep when ``p >= t``) maximising TPR − FPR over the given scores.

    Among equally good cuts the highest score wins; the threshold sits halfway between it and the
    next lower score, so that scores near either side fall where their neighbours did.

    Returns:
        ``threshold``, ``youden_j``, ``tpr``, ``fpr``.
    """
    import numpy as np

    pos_a, neg_a = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    if not len(pos_a) or not len(neg_a):
        raise ValueError("youden_threshold needs positive and negative scores")
    cuts = np.unique(np.concatenate([pos_a, neg_a]))[::-1]  # highest first
    # Share of scores >= each cut, by binary search (O(n log n), no cuts x scores matrix).
    tpr = 1.0 - np.searchsorted(np.sort(pos_a), cuts, side="left") / len(pos_a)
    fpr = 1.0 - np.searchsorted(np.sort(neg_a), cuts, side="left") / len(neg_a)
    best = int(np.argmax(np.round(tpr - fpr, 9)))  # ties (to rounding): the highest cut
    below = cuts[best + 1] if best + 1 < len(cuts) else 0.0
    return {"threshold": float((cuts[best] + below) / 2), "youden_j": float(tpr[best] - fpr[best]),
            "tpr": float(tpr[best]), "fpr": float(fpr[best])}


def otsu_threshold(probs: Sequence[float], min_separability: float = 0.8) -> dict[str, Any]:
    """A label-free threshold from the scored texts alone: Otsu's cut of their logit(p).

    A filter is sure that noisy texts do not match (a tight low mode of logits) and less sure
    about clean ones, terse alt-texts most of all (a broad high mode). Otsu's cut splits the
    texts into the two groups of least within-group variance; the share below it estimates the
    noise share. Exact: every cut between two sorted scores is tried.

    Args:
        probs: match probabilities of the texts to filter (at least 20).
        min_separability: least between-group share of the variance (Otsu's η) for two modes.
            One Gaussian mode gives η = 2/π ≈ 0.64 and would be cut in half; the web texts of the
            embedded default give 0.86–0.91.

    Returns:
        ``threshold`` (halfway between the two scores it separates, in logit), ``separability``
        (η), ``noise_share`` (share of the texts below), ``texts``.

    Raises:
        ValueError: too few texts, or the scores do not split into two clear modes.
    """
    import numpy as np

    p = np.clip(np.asarray(probs, dtype=float), 1e-6, 1 - 1e-6)
    if len(p) < 20:
        raise ValueError(f"{len(p)} scores are too few to split into two modes (20 at least)")
    x = np.sort(np.log(p / (1 - p)))
    n, k = len(x), np.arange(1, len(x))  # cut after the k lowest
    total = np.cumsum(x)
    low, high = total[:-1] / k, (total[-1] - total[:-1]) / (n - k)
    between = np.where(x[1:] > x[:-1], k * (n - k) / n**2 * (low - high) ** 2, -1.0)
    best, variance = int(np.argmax(between)), x.var()
    separability = float(between[best] / variance) if variance > 0 else 0.0
    if separability < min_separability:
        raise ValueError(f"the scores do not split into two clear modes (Otsu's η "
                         f"{separability:.3f} < {min_separability})")
    cut = (x[best] + x[best + 1]) / 2
    return {"threshold": float(1 / (1 + np.exp(-cut))), "separability": separability,
            "noise_share": (best + 1) / n, "texts": n}


def choose_threshold(
    rows: Sequence[dict[str, Any]], cfg: CapfiltConfig, calibrate_human: Callable[[], dict[str, Any]]
) -> tuple[float, dict[str, Any] | None]:
    """The threshold of ``cfg`` for scored ``rows``, and how it was chosen (None when fixed).

    Args:
        rows: scored texts (:func:`score_texts`); the web ones calibrate ``calibration="web"``.
        calibrate_human: runs :func:`calibrate_threshold`, only when it is needed.
    """
    if cfg.threshold is not None:
        return cfg.threshold, None
    fallback = None
    if cfg.calibration == "web":
        try:
            fit = otsu_threshold([r["prob"] for r in rows if r["source"] == "web"])
            return fit["threshold"], {"method": "web", **fit}
        except ValueError as e:
            fallback = str(e)
    found = calibrate_human()
    return found["threshold"], {"method": "human", **found,
                                **({"fallback_reason": fallback} if fallback else {})}


def describe_threshold(calibration: dict[str, Any] | None) -> str:
    """One line on how a corpus threshold was chosen (its manifest's ``calibration``)."""
    if calibration is None:
        return "fixed"
    if calibration.get("method") == "web":
        return ("Otsu's cut of the {texts} web texts' scores: separability {separability:.3f}, "
                "{noise_share:.1%} below".format(**calibration))
    line = ("calibrated on human {split}: Youden's J {youden_j:.3f} (TPR {tpr:.3f}, FPR {fpr:.3f})"
            .format(**calibration))
    return line + (f"; web calibration failed: {calibration['fallback_reason']}"
                   if "fallback_reason" in calibration else "")


def build_corpus(
    filters: Sequence[str],
    web: Sequence[str],
    synthetic: str | Path | None,
    human_annotations: str | Path,
    out: str | Path,
    cfg: CapfiltConfig = CapfiltConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Write the bootstrapped corpus: human train pairs + web texts kept + synthetic kept.

    The corpus is a folder of shards in the web format. Samples of one image share its
    ``image_id`` in their ``.json`` (so they are positives of each other in ITC). Beside the
    shards: ``scores.jsonl`` (every scored text, its probability and decision) and
    ``manifest.json`` (counts kept / removed per source, noise ratios, threshold, checkpoints,
    image hashes of the human images included).
    """
    start = time.time()
    ann = Path(human_annotations)
    synth = read_synthetic(synthetic) if synthetic else {}
    rows = score_texts(filters, web, synth, cfg, progress)
    threshold, calibration = choose_threshold(rows, cfg, lambda: calibrate_threshold(
        filters, f"{ann}:{cfg.calibration_split}", cfg, progress))
    for row in rows:  # decided on the probability as scores.jsonl records it (5 decimals: the last
        row["prob"] = round(row["prob"], 5)  # digits vary with the batch composition)
        row["kept"] = row["prob"] >= threshold
    kept_by_key: dict[str, list[dict[str, Any]]] = {}  # what goes into the corpus, by web key
    for row in rows:
        if row["kept"] and (cfg.use_synthetic or row["source"] == "web"):
            kept_by_key.setdefault(row["key"], []).append(row)

    human = [im for im in read_karpathy(ann) if im.split == "train"]
    human_hashes: list[str] = []

    def samples() -> Iterator[Sample]:
        for im in human:
            jpg = (ann.parent / im.image).read_bytes()
            human_hashes.append(sha256_bytes(jpg))
            for i, caption in enumerate(im.captions):
                meta = {"image_id": f"human/{im.image_id}", "source": "human"}
                yield Sample(f"h_{_safe(im.image_id)}_{i}", jpg, caption, meta)
        for item in iter_valid([s for w in web for s in _shards(w)]):
            if isinstance(item, Rejection) or item.key not in kept_by_key:
                continue
            for j, row in enumerate(kept_by_key[item.key]):
                meta = {"image_id": f"web/{item.key}", "source": row["source"],
                        "itm_prob": round(row["prob"], 4)}
                yield Sample(f"{item.key}_{row['source'][0]}{j}", item.jpg, row["text"], meta)

    counts = {"human": sum(len(im.captions) for im in human)}
    for source in ("web", "synthetic"):
        total = sum(r["source"] == source for r in rows)
        kept = sum(r["source"] == source and r["kept"] for r in rows)
        counts[f"{source}_kept"], counts[f"{source}_removed"] = kept, total - kept
    with atomic_dir(out) as tmp:
        shards = write_shards(samples(), tmp, cfg.shard_size)
        scores = "\n".join(json.dumps(r) for r in rows)
        (tmp / SCORES_FILE).write_text(scores + "\n", encoding="utf-8")
        manifest = {
            "counts": counts,
            "total": counts["human"] + counts["web_kept"]
            + (counts["synthetic_kept"] if cfg.use_synthetic else 0),
            "use_synthetic": cfg.use_synthetic,
            "noise_ratio": {s: _ratio(counts[f"{s}_removed"], counts[f"{s}_kept"])
                            for s in ("web", "synthetic")},
            "threshold": threshold,
            "calibration": calibration,
            "checkpoints": {"filters": [str(f) for f in filters]},
            "synthetic": str(synthetic) if synthetic else None,
            "web": [str(w) for w in web],
            "human_annotations": str(ann),
            "human_image_sha256": sorted(set(human_hashes)),
            "shards": [p.name for p in shards],
            "config": _cfg_dict(cfg),
            "seconds": round(time.time() - start, 2),
        }
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


def _shards(path: str | Path) -> list[Path]:
    path = Path(path)
    return [path] if path.is_file() else list_shards(path)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _ratio(removed: int, kept: int) -> float:
    return removed / (removed + kept) if removed + kept else 0.0


def _cfg_dict(cfg: CapfiltConfig) -> dict[str, Any]:
    from blip_core.config import to_dict

    return to_dict(cfg)


def filter_quality(scores: str | Path, truth: str | Path) -> dict[str, float]:
    """The filter's decisions against the shapes world's truth.

    Web texts: precision and recall (0..1) of the 'noisy' decisions, and their counts. Synthetic
    captions (when the truth holds each image's scene): how many are true of their image (the
    grammar's :func:`~blip_core.data.shapes.is_correct`), kept and removed, so a run shows whether
    the captioner adds clean pairs or noise.

    Args:
        scores: a corpus folder (its ``scores.jsonl``) or the file.
        truth: the shapes world's ``web_truth.jsonl`` (``key``, ``noisy``, ``scene``).
    """
    from blip_core.data.shapes import Scene, is_correct

    scores, truth = Path(scores), Path(truth)
    if scores.is_dir():
        scores = scores / SCORES_FILE
    noisy, scenes = {}, {}
    for line in truth.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            noisy[row["key"]] = bool(row["noisy"])
            if "scene" in row:
                scenes[row["key"]] = Scene.from_json(row["scene"])
    tp = fp = fn = 0
    synthetic = {"synthetic_kept_correct": 0, "synthetic_kept_wrong": 0,
                 "synthetic_removed_correct": 0, "synthetic_removed_wrong": 0}
    for line in scores.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["source"] == "synthetic" and row["key"] in scenes:
            correct = is_correct(row["text"], scenes[row["key"]])
            decision = "kept" if row["kept"] else "removed"
            synthetic[f"synthetic_{decision}_{'correct' if correct else 'wrong'}"] += 1
        if row["source"] != "web" or row["key"] not in noisy:
            continue
        removed, is_noisy = not row["kept"], noisy[row["key"]]
        tp += removed and is_noisy
        fp += removed and not is_noisy
        fn += (not removed) and is_noisy
    kept = synthetic["synthetic_kept_correct"] + synthetic["synthetic_kept_wrong"]
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "removed_noisy": tp, "removed_clean": fp, "kept_noisy": fn,
        **synthetic,
        # share of the synthetic captions the filter kept that are wrong for their image
        "synthetic_kept_wrong_ratio": synthetic["synthetic_kept_wrong"] / kept if kept else 0.0,
    }


def _threshold(raw: str) -> float | None:
    if raw.lower() in {"auto", "none", "null"}:
        return None
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"threshold {value} is not a probability in [0, 1]")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core capfilt``: captioners + filters + web shards → bootstrapped corpus."""
    from blip_core.recipe import Recipe

    d = Recipe().capfilt_config()
    p = argparse.ArgumentParser(
        prog="blip-core capfilt",
        description="Caption web images with the captioner(s), score web and synthetic texts with "
                    "the filter(s) (mean ITM probability), and write the bootstrapped corpus: human "
                    "train pairs + web texts kept + synthetic captions kept.",
    )
    p.add_argument("--captioner", action="append", help="captioner checkpoint (repeat for an ensemble)")
    p.add_argument("--synthetic", type=Path, help="existing synthetic captions (a caption_web folder or "
                   "its synthetic.jsonl): skip captioning")
    p.add_argument("--filter", action="append", required=True, help="filter checkpoint (repeat for an "
                   "ensemble: mean ITM probability)")
    p.add_argument("--web", nargs="+", required=True, help="web shard folders")
    p.add_argument("--human", required=True, help="human annotations.json (its train split is kept)")
    p.add_argument("--out", type=Path, required=True, help="corpus folder to write")
    p.add_argument("--synthetic-out", type=Path, help="where to write the synthetic captions "
                   "(default OUT.synthetic)")
    p.add_argument("--threshold", type=_threshold, default=d.threshold,
                   help="a fixed ITM probability below which a text is noisy (the paper's argmax: "
                        "0.5), or 'auto' (default): calibrated, see --calibration")
    p.add_argument("--calibration", choices=["web", "human"], default=d.calibration,
                   help="how 'auto' calibrates: web (default) = Otsu's cut of the web texts' own "
                        "scores, label-free (falls back to human when they show no two modes); "
                        "human = Youden's J on --calibration-split")
    p.add_argument("--calibration-split", default=d.calibration_split,
                   help="split of --human the 'human' calibration uses (default: %(default)s)")
    p.add_argument("--method", choices=["nucleus", "beam", "greedy"], default=d.method)
    p.add_argument("--num-captions", type=int, default=d.num_captions)
    p.add_argument("--use-synthetic", type=parse_bool, default=d.use_synthetic, metavar="true|false",
                   help="put the synthetic captions the filter keeps into the corpus (default "
                        f"{str(d.use_synthetic).lower()}; false: score and report them, but filter "
                        "only the web texts in)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--truth", type=Path, help="web_truth.jsonl: also report filter precision/recall")
    args = p.parse_args(argv)
    cfg = replace(d, threshold=args.threshold, calibration=args.calibration,
                  calibration_split=args.calibration_split,
                  method=args.method, num_captions=args.num_captions, use_synthetic=args.use_synthetic,
                  batch_size=args.batch_size,
                  seed=args.seed, device=args.device)
    if args.synthetic:
        synthetic = args.synthetic
    elif args.captioner:
        synthetic = args.synthetic_out or args.out.with_name(args.out.name + ".synthetic")
        caption_web(args.captioner, args.web, synthetic, cfg)
    else:
        p.error("give --captioner CHECKPOINT (to caption the web images) or --synthetic CAPTIONS")
    manifest = build_corpus(args.filter, args.web, synthetic, args.human, args.out, cfg)
    print(json.dumps({"counts": manifest["counts"], "noise_ratio": manifest["noise_ratio"]}, indent=2))
    if args.truth:
        print(json.dumps({"filter": filter_quality(args.out, args.truth)}, indent=2))
    print(f"corpus: {args.out.resolve()}")
    return 0

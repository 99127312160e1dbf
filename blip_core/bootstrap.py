"""The whole BLIP lineage without orchestration: ``blip-core bootstrap --out DIR``.

pre-train (web + human train) → fine-tune captioner and filter separately → CapFilt →
pre-train from scratch on the bootstrapped corpus → evaluate both on the human test split.
Every stage writes its own folder under DIR and is skipped when that folder is already
complete, so a killed run continues where it stopped. The recipe below is the default of the
Dagster assets too.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blip_core.capfilt import (
    MANIFEST_FILE,
    CapfiltConfig,
    build_corpus,
    caption_web,
    describe_threshold,
    filter_quality,
)
from blip_core.checkpoint import is_checkpoint
from blip_core.config import TrainConfig, apply_overrides, load_yaml, to_dict
from blip_core.data.shapes import WorldConfig, generate_world
from blip_core.io import atomic_write_json, atomic_write_text

METRIC_KEYS = ("tr@1", "tr@5", "ir@1", "ir@5", "bleu4", "cider")


@dataclass(frozen=True)
class Stage:
    """Optimisation settings of one training stage."""

    max_steps: int  # optimizer steps
    batch_size: int = 32  # pairs per step
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 20  # linear warm-up steps


@dataclass(frozen=True)
class BootstrapConfig:
    """The default recipe on the embedded shapes world (2 CPU cores, under 10 minutes)."""

    preset: str = "tiny"  # model preset of every stage
    world: WorldConfig = field(default_factory=WorldConfig)  # the shapes world to generate
    # From-scratch tiny models want larger learning rates than the paper's ViT-B (3e-4, 1e-5..2e-5).
    # Steps matter more than batch size here: 600 steps of 32 pairs retrieve better than 300 of 64
    # (and as well as 600 of 64) at half the cost. Retrieval takes off between 600 and 1800
    # pre-training steps; 900 is what fits in 10 minutes on 2 cores (README, "Steps, time ...").
    pretrain: Stage = Stage(max_steps=900, lr=1e-3)  # both pre-trainings (baseline, bootstrapped)
    captioner: Stage = Stage(max_steps=200, lr=5e-4)  # LM fine-tune on human train
    filter: Stage = Stage(max_steps=600, lr=1e-3)  # ITC + ITM fine-tune; 400 filter worse
    # Generation and filtering. The tiny captioner of this CPU recipe names the colours but not the
    # shapes (kinds right in ~24% of captions, near chance): ~95% of the synthetic captions the
    # filter keeps are wrong for their image, which made the corpus noisier than the web. So they
    # are generated, scored and reported (report.json "synthetic") but left out of the corpus;
    # use_synthetic=true is the paper's C + F, for a captioner that sees what it describes.
    capfilt: CapfiltConfig = field(default_factory=lambda: CapfiltConfig(use_synthetic=False))
    rounds: int = 1  # bootstrap rounds (the paper does one)
    eval_k: int = 16  # ITM re-ranks the top-k of ITC (256 for COCO's 5k test)
    eval_method: str = "greedy"  # caption decoding for captioning metrics
    seed: int = 0  # seeds the world, training and sampling
    device: str = "cpu"  # "cuda" on a GPU
    # bf16-lm: fp32 but the LM's vocabulary projection (fast on CPUs with AVX512-BF16/AMX, slow on
    # others: use fp32 there); "bf16" on a GPU
    precision: str = "bf16-lm"


def stage_config(cfg: BootstrapConfig, stage: Stage, task: str, data: Sequence[str], out: Path,
                 init_from: Path | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one stage of the recipe."""
    return TrainConfig(
        task=task,  # type: ignore[arg-type]
        preset=cfg.preset,
        data=tuple(str(d) for d in data),
        out=str(out),
        init_from=str(init_from) if init_from else None,
        max_steps=stage.max_steps,
        batch_size=stage.batch_size,
        lr=stage.lr,
        warmup_steps=stage.warmup_steps,
        save_every=max(50, stage.max_steps // 4),
        log_every=max(1, stage.max_steps // 30),
        seed=cfg.seed,
        precision=cfg.precision,  # type: ignore[arg-type]
        resume=True,
    )


def _train(tcfg: TrainConfig, progress: bool) -> dict[str, Any]:
    from blip_core.train import train

    if is_checkpoint(tcfg.out):
        return {"checkpoint": tcfg.out, "skipped": True}
    result = train(replace(tcfg, progress=progress))
    return {"checkpoint": result.checkpoint, "steps": result.steps, "seconds": round(result.seconds, 1),
            "final": result.history[-1] if result.history else {}}


def _say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run_bootstrap(out: str | Path, cfg: BootstrapConfig = BootstrapConfig(),
                  progress: bool = True) -> dict[str, Any]:
    """Run the lineage into ``out`` and write ``out/report.json``; returns the report."""
    from blip_core.data.ingest import ingest, ingest_human
    from blip_core.evaluate import compare_plot, compare_table, evaluate_checkpoint

    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", to_dict(cfg))
    capfilt_cfg = replace(cfg.capfilt, seed=cfg.seed, device=cfg.device)

    world = out / "world"
    if not (world / "manifest.json").is_file():
        _say(f"generating the shapes world into {world}")
        generate_world(world, replace(cfg.world, seed=cfg.seed))
    web, human_dir = out / "web", out / "human"
    if not (web / "stats.json").is_file():
        _say("ingesting web shards")
        ingest(world / "web", web)
    if not (human_dir / "stats.json").is_file():
        _say("ingesting human pairs")
        ingest_human(world / "human" / "annotations.json", world / "human", human_dir)
    human = human_dir / "annotations.json"

    stages: dict[str, Any] = {}
    _say("pre-training the baseline on web + human train pairs")
    baseline = out / "pretrained"
    stages["pretrained"] = _train(
        stage_config(cfg, cfg.pretrain, "pretrain", [web, f"{human}:train"], baseline), progress)

    source = baseline
    corpus = out / "corpus"
    for r in range(1, cfg.rounds + 1):
        tag = "" if r == 1 else f"_r{r}"
        captioner, filt = out / f"captioner{tag}", out / f"filter{tag}"
        _say(f"round {r}: fine-tuning the captioner (LM) and the filter (ITC+ITM) from {source.name}")
        stages[captioner.name] = _train(stage_config(
            cfg, cfg.captioner, "captioner", [f"{human}:train"], captioner, source), progress)
        stages[filt.name] = _train(stage_config(
            cfg, cfg.filter, "filter", [f"{human}:train"], filt, source), progress)
        synthetic, corpus = out / f"synthetic{tag}", out / f"corpus{tag}"
        if not (synthetic / MANIFEST_FILE).is_file():
            _say("captioning web images")
            caption_web([str(captioner)], [str(web)], synthetic, capfilt_cfg, progress)
        if not (corpus / MANIFEST_FILE).is_file():
            _say("filtering web texts and synthetic captions")
            build_corpus([str(filt)], [str(web)], synthetic, human, corpus, capfilt_cfg, progress)
        source = out / f"bootstrapped{tag}"
        _say(f"pre-training from scratch on the bootstrapped corpus in {corpus}")
        stages[source.name] = _train(
            stage_config(cfg, cfg.pretrain, "pretrain", [corpus], source), progress)
    manifest = json.loads((corpus / MANIFEST_FILE).read_text())
    quality = filter_quality(out / "corpus", world / "truth" / "web_truth.jsonl")

    _say("evaluating baseline and bootstrapped models on the human test split")
    results = {}
    for name, ckpt in (("baseline", baseline), ("bootstrapped", source)):
        results[name] = evaluate_checkpoint(
            str(ckpt), str(human), split="test", k=cfg.eval_k, device=cfg.device,
            caption_kwargs={"method": cfg.eval_method},
        )
    evals = out / "eval"
    evals.mkdir(exist_ok=True)
    atomic_write_json(evals / "metrics.json", results)
    table = compare_table(results)
    atomic_write_text(evals / "comparison.md", table + "\n")
    compare_plot(results, evals / "comparison.png")

    counts = manifest["counts"]
    report = {
        "baseline": {k: results["baseline"][k] for k in METRIC_KEYS},
        "bootstrapped": {k: results["bootstrapped"][k] for k in METRIC_KEYS},
        "filter": {"precision": quality["precision"], "recall": quality["recall"],
                   "threshold": manifest["threshold"], "calibration": manifest.get("calibration")},
        "corpus": {k: counts[k] for k in ("web_kept", "web_removed", "synthetic_kept",
                                          "synthetic_removed")}
        | {"human": counts["human"], "use_synthetic": manifest.get("use_synthetic", True)},
        # synthetic captions true of their image (the world's truth), by the filter's decision
        "synthetic": {k.removeprefix("synthetic_"): v for k, v in quality.items()
                      if k.startswith("synthetic_")},
        "checkpoints": {"pretrained": str(baseline), "captioner": str(out / "captioner"),
                        "filter": str(out / "filter"), "bootstrapped": str(source)},
        "stages": stages,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out / "report.json", report)
    return report


def summary(report: dict[str, Any]) -> str:
    """A short human-readable summary of a report."""
    lines = ["| metric | baseline | bootstrapped | delta |", "|---|---:|---:|---:|"]
    for k in METRIC_KEYS:
        a, b = report["baseline"][k], report["bootstrapped"][k]
        lines.append(f"| {k} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    f, c = report["filter"], report["corpus"]
    lines += [
        "",
        f"filter on web noise: precision {f['precision']:.3f}, recall {f['recall']:.3f} "
        f"(threshold {f['threshold']:.4f}: {describe_threshold(f.get('calibration'))})",
        f"corpus: web kept {c['web_kept']}, removed {c['web_removed']}; synthetic kept "
        f"{c['synthetic_kept']}, removed {c['synthetic_removed']}"
        f"{'' if c.get('use_synthetic', True) else ' (not put in the corpus)'}; human {c['human']}",
        *([f"synthetic captions kept: {s['kept_correct']} true of their image, {s['kept_wrong']} "
           f"wrong ({s['kept_wrong_ratio']:.0%})"] if (s := report.get("synthetic")) else []),
        f"total time: {report['seconds']:.0f}s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core bootstrap --out DIR [--preset tiny]``."""
    p = argparse.ArgumentParser(
        prog="blip-core bootstrap",
        description="Run the whole lineage (pretrain, captioner + filter, CapFilt, pretrain again, "
                    "eval) on the embedded shapes world and write DIR/report.json. Stages already "
                    "complete in DIR are skipped.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", type=Path, help="YAML file with BootstrapConfig fields")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. pretrain.max_steps=100 capfilt.threshold=0.6 world.web_noise=0.3")
    args = p.parse_args(argv)
    cfg = load_yaml(BootstrapConfig, args.config) if args.config else BootstrapConfig()
    cfg = replace(cfg, preset=args.preset)
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if args.device:
        cfg = replace(cfg, device=args.device, precision="bf16" if args.device == "cuda" else cfg.precision)
    cfg = apply_overrides(cfg, args.overrides)
    report = run_bootstrap(args.out, cfg, progress=not args.no_progress)
    print(summary(report))
    print(f"report: {(args.out / 'report.json').resolve()}")
    return 0

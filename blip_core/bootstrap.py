"""The whole BLIP lineage without orchestration: ``blip-core bootstrap --out DIR``.

pre-train (web + human train) → fine-tune captioner and filter separately → CapFilt →
pre-train from scratch on the bootstrapped corpus → evaluate both on the human test split.
Every stage writes its own folder under DIR and is skipped when that folder is already
complete, so a killed run continues where it stopped. It runs :class:`blip_core.recipe.Recipe`,
as the Dagster assets do.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from blip_core.capfilt import (
    MANIFEST_FILE,
    build_corpus,
    caption_web,
    filter_quality,
)
from blip_core.checkpoint import is_checkpoint
from blip_core.config import TrainConfig, to_dict
from blip_core.data.shapes import generate_world
from blip_core.errors import UsageError
from blip_core.io import atomic_write_json
from blip_core.recipe import Recipe, load_recipe, stage_config
from blip_core.report import build_report, capfilt_lines, report_table, write_comparison


def _train(tcfg: TrainConfig, progress: bool) -> dict[str, Any]:
    from blip_core.train import train

    if is_checkpoint(tcfg.out):
        return {"checkpoint": tcfg.out, "skipped": True}
    result = train(replace(tcfg, progress=progress))
    return {"checkpoint": result.checkpoint, "steps": result.steps, "seconds": round(result.seconds, 1),
            "final": result.history[-1] if result.history else {}}


def _say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run_bootstrap(out: str | Path, cfg: Recipe | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` (default: the recipe) into ``out`` and write ``out/report.json``; returns the report."""
    cfg = cfg or Recipe()
    from blip_core.data.ingest import ingest, ingest_human
    from blip_core.evaluate import evaluate_checkpoint

    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", to_dict(cfg))
    capfilt_cfg = cfg.capfilt_config()

    world = out / "world"
    if not (world / "manifest.json").is_file():
        _say(f"generating the shapes world into {world}")
        generate_world(world, cfg.world_config())
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
    quality = filter_quality(corpus, world / "truth" / "web_truth.jsonl")  # the last round's

    _say(f"evaluating baseline and bootstrapped models on the human {cfg.eval.split} split")
    results = {}
    for name, ckpt in (("baseline", baseline), ("bootstrapped", source)):
        results[name] = evaluate_checkpoint(
            str(ckpt), str(human), split=cfg.eval.split, k=cfg.eval.k, device=cfg.device,
            caption_kwargs={"method": cfg.eval.caption_method},
        )
    write_comparison(results, out / "eval", split=cfg.eval.split, k=cfg.eval.k)
    report = build_report(
        results, manifest, quality, rounds=cfg.rounds,
        checkpoints={"pretrained": str(baseline), "captioner": str(captioner), "filter": str(filt),
                     "corpus": str(corpus), "bootstrapped": str(source)},
        stages=stages, seconds=round(time.time() - start, 1),
    )
    atomic_write_json(out / "report.json", report)
    return report


def summary(report: dict[str, Any]) -> str:
    """A short human-readable summary of a report."""
    return "\n".join([report_table(report), *capfilt_lines(report), f"total time: {report['seconds']:.0f}s"])


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Recipe]:
    """The arguments of ``blip-core bootstrap`` and the recipe they ask for."""
    p = argparse.ArgumentParser(
        prog="blip-core bootstrap",
        description="Run the whole lineage (pretrain, captioner + filter, CapFilt, pretrain again, "
                    "eval) on the embedded shapes world and write DIR/report.json. Stages already "
                    "complete in DIR are skipped.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path,
                   help="recipe YAML naming the fields it changes (e.g. recipes/quick.yaml)")
    p.add_argument("--preset", help="model preset of every stage (default: the recipe's, tiny)")
    p.add_argument("--seed", type=int, help="seeds the world, training and sampling")
    p.add_argument("--device", help="cpu, cuda or auto (default: the recipe's, auto)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. pretrain.max_steps=100 capfilt.threshold=0.6 world.web_noise=0.3")
    args = p.parse_args(argv)
    try:
        cfg = load_recipe(args.config, args.overrides, preset=args.preset, seed=args.seed,
                          device=args.device)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{args.config or 'recipe'}: {e}") from None
    return args, cfg


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core bootstrap --out DIR [--config RECIPE.yaml] [KEY=VALUE ...]``."""
    args, cfg = parse_args(argv)
    report = run_bootstrap(args.out, cfg, progress=not args.no_progress)
    print(summary(report))
    print(f"report: {(args.out / 'report.json').resolve()}")
    return 0

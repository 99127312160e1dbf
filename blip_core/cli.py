"""``blip-core``: the pipeline's steps as commands. Each command imports its module lazily."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# name -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("blip_core.cli:synth_main", "generate the embedded shapes world"),
    "ingest": ("blip_core.cli:ingest_main", "validate web shards / human pairs, quarantine bad ones"),
    "pretrain": ("blip_core.train:pretrain_main", "pre-train with ITC + ITM + LM"),
    "finetune": ("blip_core.train:finetune_main", "fine-tune a captioner (LM) or filter (ITC+ITM)"),
    "caption": ("blip_core.generate:main", "caption images (nucleus sampling or beam search)"),
    "filter": ("blip_core.filtering:main", "score image-text pairs with the filter's ITM head"),
    "capfilt": ("blip_core.capfilt:main", "bootstrap a cleaner corpus (captioner + filter)"),
    "eval": ("blip_core.evaluate:main", "retrieval and captioning metrics; compare checkpoints"),
    "bootstrap": ("blip_core.bootstrap:main", "the whole lineage, without orchestration"),
    "export-hf": ("blip_core.interop:export_main", "export to Hugging Face transformers folders"),
    "import-blip": ("blip_core.interop:import_main", "import an official BLIP checkpoint"),
}


def _offline_env() -> None:
    """Nothing is ever fetched from a hub at run time."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blip-core`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="blip-core",
        description="BLIP pre-training, CapFilt bootstrapping and evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{listing}\n\n'blip-core COMMAND --help' describes each one.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    parser.parse_args(argv[:1])
    _offline_env()
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    result = getattr(importlib.import_module(module), func)(argv[1:])
    return result if isinstance(result, int) else 0


def synth_main(argv: Sequence[str]) -> int:
    """``blip-core synth``."""
    from blip_core.data.shapes import WorldConfig, generate_world

    defaults = WorldConfig()
    p = argparse.ArgumentParser(prog="blip-core synth",
                                description="Generate the shapes world (human + noisy web pairs).")
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    p.add_argument("--web-noise", type=float, default=defaults.web_noise,
                   help=f"fraction of noisy web texts (default {defaults.web_noise})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    p.add_argument("--n-web", type=int, default=defaults.n_web, help="web images")
    p.add_argument("--n-human-train", type=int, default=defaults.n_human_train)
    p.add_argument("--n-human-test", type=int, default=defaults.n_human_test)
    args = p.parse_args(argv)
    from dataclasses import replace

    cfg = replace(defaults, web_noise=args.web_noise, seed=args.seed, n_web=args.n_web,
                  n_human_train=args.n_human_train, n_human_test=args.n_human_test)
    manifest = generate_world(args.out, cfg)
    print(f"shapes world: {_counts(manifest)}")
    print(f"written to {args.out.resolve()}")
    return 0


def ingest_main(argv: Sequence[str]) -> int:
    """``blip-core ingest``."""
    from blip_core.data.ingest import ingest, ingest_human

    p = argparse.ArgumentParser(
        prog="blip-core ingest",
        description="Validate web shards (a folder of .tar or one .tar) or a Karpathy JSON. Good "
                    "samples are written to OUT; bad ones go to OUT/quarantine.jsonl with their "
                    "reason; counts to OUT/stats.json.",
    )
    p.add_argument("src", type=Path, help="shard folder, shard .tar, or annotations .json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-root", type=Path,
                   help="images folder of a JSON source (default: the JSON's folder)")
    args = p.parse_args(argv)
    if args.src.suffix == ".json":
        stats = ingest_human(args.src, args.image_root or args.src.parent, args.out)
    else:
        stats = ingest(args.src, args.out)
    s = stats if isinstance(stats, dict) else vars(stats)
    print(f"kept {s['kept']}, quarantined {s['quarantined']} {s.get('by_reason', {})}")
    print(f"written to {args.out.resolve()}")
    return 0


def _counts(manifest: dict) -> str:
    human, web = manifest["counts"]["human"], manifest["counts"]["web"]
    return (f"human images {human['images']} ({human['captions']} captions), web pairs {web['pairs']} "
            f"in {web['shards']} shards, noise ratio {web['noise_ratio']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

"""``blip-core``: the pipeline's steps as commands. Each command imports its module lazily.

A bad input (a missing or empty source, a wrong kind of file, an option out of range) ends a
command with one line on stderr, ``blip-core COMMAND: error: ...``, and exit status 2; an
ingest that keeps nothing exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from blip_core.env import set_defaults
from blip_core.errors import UsageError

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
    set_defaults()
    target, _ = COMMANDS[argv[0]]
    module, func = target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(argv[1:])
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"blip-core {argv[0]}: error: {_message(e)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def _message(e: Exception) -> str:
    """One line describing a bad-input error (``PATH: No such file or directory`` for OS errors)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines())


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def synth_main(argv: Sequence[str]) -> int:
    """``blip-core synth``."""
    from blip_core.data.shapes import WorldConfig, generate_world

    defaults = WorldConfig()
    p = argparse.ArgumentParser(prog="blip-core synth",
                                description="Generate the shapes world (human + noisy web pairs).")
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    p.add_argument("--web-noise", type=_fraction, default=defaults.web_noise,
                   help=f"fraction of noisy web texts, in [0, 1] (default {defaults.web_noise})")
    p.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    p.add_argument("--n-web", type=_count, default=defaults.n_web, help="web images")
    p.add_argument("--n-human-train", type=_count, default=defaults.n_human_train)
    p.add_argument("--n-human-test", type=_count, default=defaults.n_human_test)
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
    from blip_core.data.formats import SPLITS
    from blip_core.data.ingest import SOURCE_HINT, ingest, ingest_human

    p = argparse.ArgumentParser(
        prog="blip-core ingest",
        description="Validate web shards (a folder of .tar or one .tar) or human annotations (a "
                    "list-layout JSON, Karpathy's dataset_coco.json or COCO's captions_*.json). "
                    "Good samples are written to OUT; bad ones go to OUT/quarantine.jsonl with "
                    "their reason; counts to OUT/stats.json. Exit status 1 when nothing is kept.",
    )
    p.add_argument("src", type=Path, help="shard folder, shard .tar, or annotations .json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-root", type=Path,
                   help="images folder of a JSON source (default: the JSON's folder; for COCO "
                        "the split's folder, e.g. train2017/)")
    p.add_argument("--split", choices=SPLITS,
                   help="split of JSON entries without one (COCO captions_*.json; default: from "
                        "the file name, captions_val2017.json is val)")
    args = p.parse_args(argv)
    human = args.src.suffix.lower() == ".json"
    if not args.src.exists():
        raise UsageError(f"{args.src} does not exist; {SOURCE_HINT}")
    if not human and (args.image_root or args.split):
        raise UsageError("--image-root and --split apply to an annotations .json, not to web shards")
    root = args.image_root or args.src.parent
    if human:
        stats = ingest_human(args.src, root, args.out, default_split=args.split)
    else:
        stats = ingest(args.src, args.out)
    print(f"kept {stats.kept}, quarantined {stats.quarantined} {stats.by_reason}")
    print(f"written to {args.out.resolve()}")
    if stats.kept:
        return 0
    unit = "images" if human else "samples"
    if not stats.quarantined:
        why = f"{args.src} holds no {'annotated images' if human else 'samples'}"
    else:
        why = (f"all {stats.quarantined} {unit} were quarantined, see {args.out / 'quarantine.jsonl'} "
               "for the reasons")
        if human and "missing_image" in stats.by_reason:
            why += f" (image files not found: are the paths relative to --image-root, now {root}?)"
    print(f"blip-core ingest: error: kept nothing: {why}", file=sys.stderr)
    return 1


def _counts(manifest: dict) -> str:
    human, web = manifest["counts"]["human"], manifest["counts"]["web"]
    return (f"human images {human['images']} ({human['captions']} captions), web pairs {web['pairs']} "
            f"in {web['shards']} shards, noise ratio {web['noise_ratio']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

"""One training entry point for pre-training and the captioner / filter fine-tunes.

``train(cfg)`` is a linear loop of ``setup_*`` steps; ``main(argv)`` parses a command line into a
:class:`~blip_core.config.TrainConfig`. CLI, assets and tests all call these. Launched by
``torchrun`` it trains with DDP; on one process it runs unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from blip_core.checkpoint import (
    clear_trainer_states,
    latest_trainer_state,
    load_model,
    load_trainer_state,
    remove_leftovers,
    save_checkpoint,
    save_trainer_state,
)
from blip_core.config import (
    TrainConfig,
    apply_overrides,
    load_yaml,
    model_preset,
    to_dict,
)
from blip_core.device import PRECISIONS, cpu_has_native_bf16, resolve_device, resolve_precision
from blip_core.model import EMPTY_SLOT, BlipModel, TextBatch
from blip_core.tokenizer import load_tokenizer, pre_caption

LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoint: str  # model folder (config.json, model.safetensors, tokenizer/)
    steps: int  # optimizer steps taken in total
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log step
    seconds: float = 0.0  # wall time of this process's run
    resumed_from: int | None = None  # step the run resumed at, if any


# --- distributed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group when launched by it; one CPU/GPU process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(device).type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


# --- data ----------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch (resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0
        self.limit: int | None = None  # batches per epoch, when fewer than the data allows

    def batches_per_epoch(self) -> int:
        full = (self.n // self.world) // self.batch_size
        return full if self.limit is None else min(full, self.limit)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank :: self.world]
        usable = self.batches_per_epoch() * self.batch_size  # drop the last partial batch
        return iter(order[self.start_batch * self.batch_size : usable].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class Collator:
    """Tokenises captions twice (ITC/ITM text; prompt + text for the decoder) into a batch."""

    def __init__(self, tokenizer: Any, max_len: int, prompt: str) -> None:
        self.tokenizer, self.max_len, self.prompt = tokenizer, max_len, prompt
        self.prompt_length = len(tokenizer(prompt).input_ids) - 1  # [CLS] + prompt words

    def __call__(self, items: Sequence[tuple[torch.Tensor, str, int]]) -> TextBatch:
        images, captions, idx = zip(*items, strict=True)
        captions = [pre_caption(c) for c in captions]
        kw = dict(padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        text = self.tokenizer(list(captions), **kw)
        lm = self.tokenizer([self.prompt + c for c in captions], **kw)
        return TextBatch(
            images=torch.stack(images),
            text_ids=text.input_ids,
            text_mask=text.attention_mask,
            lm_ids=lm.input_ids,
            lm_mask=lm.attention_mask,
            image_idx=torch.tensor(idx, dtype=torch.long),
            prompt_length=self.prompt_length,
        )


def setup_data(cfg: TrainConfig, image_size: int, info: DistInfo):
    """The training dataset (every source in ``cfg.data``) and its resumable sampler."""
    from blip_core.data.dataset import ImageTextDataset, image_transform

    if not cfg.data:
        raise ValueError("no training data: pass at least one source (shard folder or json:split)")
    dataset = ImageTextDataset(
        list(cfg.data), transform=image_transform(image_size, train=cfg.train_augment)
    )
    if len(dataset) < cfg.batch_size * info.world_size:
        raise ValueError(
            f"{len(dataset)} training pairs are fewer than one batch "
            f"({cfg.batch_size} x {info.world_size} processes)"
        )
    sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, info.rank, info.world_size)
    return dataset, sampler


# --- model and optimisation ----------------------------------------------------------------


def setup_model(cfg: TrainConfig) -> BlipModel:
    """A fresh model of ``cfg.preset``, or the ``cfg.init_from`` checkpoint (queues reset)."""
    if cfg.init_from:
        model = load_model(cfg.init_from, image_size=cfg.image_size)
        # Image identities of the new data do not match the queued ones: start with an empty queue.
        model.idx_queue.fill_(EMPTY_SLOT)
        model.queue_ptr.zero_()
        return model
    mcfg = model_preset(cfg.preset)
    if cfg.image_size:
        mcfg = replace(mcfg, vision=replace(mcfg.vision, image_size=cfg.image_size))
    return BlipModel(mcfg)


def setup_optimizer(model: BlipModel, cfg: TrainConfig, total_steps: int):
    """AdamW (no decay on biases, norms, embeddings' positions or temperature) + warm-up/cosine."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
        # One kernel for all parameters: 6x faster than the per-tensor loop on CPU. A run resumed
        # from a trainer state of the per-tensor optimizer keeps that one (the state's settings).
        fused=True,
    )
    floor = cfg.min_lr / cfg.lr

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    plain = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    random.setstate(_from_json(plain["python"]))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _to_json(x: Any) -> Any:
    return [_to_json(v) for v in x] if isinstance(x, tuple | list) else x


def _from_json(x: Any) -> Any:
    return tuple(_from_json(v) for v in x) if isinstance(x, list) else x


# --- the loop ------------------------------------------------------------------------------


def train(cfg: TrainConfig, on_log: LogFn | None = None) -> TrainResult:
    """Train as ``cfg`` says and write the checkpoint folder ``cfg.out``.

    The same seed gives the same weights whatever the number of threads: deterministic kernels
    are used for the run (without them, two CPU runs of 30 steps on 2 threads differed by 1.6e-5,
    which a short from-scratch run can amplify into points of recall; ~2% slower on CPU).

    Args:
        on_log: called on rank 0 every ``log_every`` steps with (step, metrics).
    """
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for it
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn where an op has no such kernel
    try:
        return _train(cfg, on_log)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(cfg: TrainConfig, on_log: LogFn | None) -> TrainResult:
    start = time.time()
    info = setup_distributed(cfg.device)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, info.device))  # type: ignore[arg-type]
    seed = cfg.seed + info.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    model = setup_model(cfg).to(info.device)
    tokenizer = load_tokenizer(Path(cfg.init_from) / "tokenizer" if cfg.init_from else None)
    dataset, sampler = setup_data(cfg, model.cfg.vision.image_size, info)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=Collator(tokenizer, model.cfg.max_text_len, model.cfg.prompt),
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=info.device.type == "cuda",
        persistent_workers=False,
        # Its own generator: starting an iterator draws a worker seed, which from the global RNG
        # would shift the augmentation and hard-negative streams of a resumed run by one draw.
        generator=torch.Generator().manual_seed(seed),
    )
    steps_per_epoch = max(1, sampler.batches_per_epoch() // cfg.grad_accum)
    micro_per_epoch = sampler.limit = steps_per_epoch * cfg.grad_accum  # whole steps only
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    ramp = cfg.alpha_rampup_steps or steps_per_epoch
    optimizer, scheduler = setup_optimizer(model, cfg, total_steps)

    step, history, resumed_from = 0, [], None
    window: list[dict[str, float]] = []  # loss terms since the last log row
    if info.is_main:  # what a killed run left half-written: never read, deleted here
        remove_leftovers(cfg.out)
        if not cfg.resume and (cleared := clear_trainer_states(cfg.out)):
            print(f"fresh run: deleted {cleared} trainer state(s) of an earlier run in {cfg.out}",
                  flush=True)
    state_path = latest_trainer_state(cfg.out) if cfg.resume else None
    if state_path is not None:
        optim_state, progress = load_trainer_state(state_path, model)
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
        _set_rng_state(optim_state["rng"], progress["rng"])
        step, history, resumed_from = progress["step"], progress["history"], progress["step"]
        window = progress["window"]
        if info.is_main:
            print(f"resuming {cfg.out} at step {step} from {state_path.name}", flush=True)
            if cfg.num_workers > 0 and cfg.train_augment:
                print("note: with DataLoader workers the resumed run's augmentations differ from an "
                      "uninterrupted run's (exact resume needs num_workers=0)", flush=True)

    ddp_model: torch.nn.Module = model
    if info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=True,  # captioner / filter leave some heads unused
        )

    def checkpoint_now() -> None:
        if not info.is_main:
            return
        tensors, plain = _rng_state()
        save_trainer_state(
            cfg.out, step, model,
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": tensors},
            {"step": step, "history": history, "window": window, "rng": plain,
             "config": to_dict(cfg)},
        )

    progress_bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.task}", unit="step",
                            dynamic_ncols=True)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16")
    lm_dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
    emulated_bf16 = cfg.precision == "bf16-lm" and info.device.type == "cpu" and not cpu_has_native_bf16()
    if info.is_main and emulated_bf16:
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX); precision=bf16-lm is "
              "slower here than fp32 (precision=auto chooses fp32)", flush=True)
    model.train()
    while step < total_steps:
        epoch, micro_done = divmod(step * cfg.grad_accum, micro_per_epoch)
        sampler.set_position(epoch, micro_done)
        for micro, batch in enumerate(loader, start=1):
            batch = batch.to(info.device)
            alpha = model.cfg.alpha * min(1.0, step / ramp) if ramp else model.cfg.alpha
            sync = micro % cfg.grad_accum == 0
            ctx = ddp_model.no_sync() if (info.world_size > 1 and not sync) else _null()
            with ctx, autocast:
                out = ddp_model(batch, alpha=alpha, losses=cfg.losses, lm_dtype=lm_dtype)
            with ctx:
                (out.loss / cfg.grad_accum).backward()
            window.append(out.terms())
            if not sync:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                row.update(step=step, lr=scheduler.get_last_lr()[0], alpha=alpha,
                           temp=model.temp.item())
                history.append(row)
                window.clear()
                if info.is_main and on_log:
                    on_log(step, row)
            if progress_bar is not None:
                progress_bar.update(1)
                progress_bar.set_postfix({k: f"{v:.3f}" for k, v in out.terms().items()})
            if step % cfg.save_every == 0 and step < total_steps:
                checkpoint_now()
            if step >= total_steps:
                break
    if progress_bar is not None:
        progress_bar.close()
    if step != resumed_from:  # a run resumed at its last step has that state on disk already
        checkpoint_now()
    if info.is_main:
        save_checkpoint(cfg.out, model, tokenizer, meta={
            "task": cfg.task, "steps": step, "train_config": to_dict(cfg),
            "history": history,
        })
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(checkpoint=str(cfg.out), steps=step, history=history,
                       seconds=time.time() - start, resumed_from=resumed_from)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --- command line --------------------------------------------------------------------------


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """Arguments shared by ``blip-core pretrain`` and ``blip-core finetune``."""
    p = argparse.ArgumentParser(
        prog=f"blip-core {'pretrain' if task in (None, 'pretrain') else 'finetune'}",
        description="Train BLIP (ITC + ITM + LM), or fine-tune a captioner (LM) or filter "
                    "(ITC + ITM) from a pre-trained checkpoint.",
    )
    if task is None:
        p.add_argument("--task", choices=["pretrain", "captioner", "filter"], default="pretrain")
    p.add_argument("--config", type=Path, help="YAML file with TrainConfig fields")
    p.add_argument("--data", nargs="+", default=None,
                   help="shard folders and/or ANNOTATIONS.json:SPLIT sources")
    p.add_argument("--out", help="checkpoint folder to write")
    p.add_argument("--preset", help="model preset: tiny, base, large")
    p.add_argument("--init-from", help="checkpoint to start from")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): the fastest the hardware runs natively; fp32; bf16-lm: bf16 "
                        "LM vocabulary projection only (fast on CPUs with AVX512-BF16/AMX); bf16: "
                        "autocast everywhere (GPUs)")
    p.add_argument("--device", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from out/trainer_state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="any TrainConfig field, e.g. warmup_steps=20 save_every=50")
    return p


def recipe_train_config(task: str) -> TrainConfig:
    """What ``blip-core pretrain / finetune`` train with no options: the recipe's stage of ``task``."""
    from blip_core.recipe import Recipe, stage_config

    recipe = Recipe()
    return replace(stage_config(recipe, recipe.stage(task), task, (), f"runs/{task}"), resume=False)


def config_from_args(args: argparse.Namespace, task: str | None = None) -> TrainConfig:
    """The recipe's stage < ``--config`` file < flags < ``key=value`` overrides."""
    task = task or getattr(args, "task", None) or "pretrain"
    cfg = recipe_train_config(task)
    if args.config:
        cfg = load_yaml(TrainConfig, args.config, base=cfg)
    flags = {
        "task": task, "data": tuple(args.data) if args.data else None,
        "out": args.out, "preset": args.preset, "init_from": args.init_from,
        "max_steps": args.max_steps, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "precision": args.precision, "device": args.device, "seed": args.seed,
    }
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.epochs is not None and args.max_steps is None:
        cfg = replace(cfg, max_steps=None)  # --epochs alone: passes over the data, not the recipe's steps
    if args.resume:
        cfg = replace(cfg, resume=True)
    if args.no_progress:
        cfg = replace(cfg, progress=False)
    cfg = apply_overrides(cfg, args.overrides)
    if cfg.task != "pretrain" and not cfg.init_from:
        raise SystemExit(f"error: fine-tuning a {cfg.task} needs --init-from CHECKPOINT")
    return cfg


def main(argv: Sequence[str] | None = None, task: str | None = None) -> TrainResult:
    """Parse ``argv`` and train; prints where the checkpoint went."""
    args = build_parser(task).parse_args(argv)
    cfg = config_from_args(args, task)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{k}={last[k]:.3f}" for k in ("itc", "itm", "lm") if k in last)
        print(f"{cfg.task}: {result.steps} steps in {result.seconds:.1f}s ({losses})")
        print(f"checkpoint: {Path(result.checkpoint).resolve()}")
    return result




def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """``blip-core pretrain``."""
    main(argv, task="pretrain")
    return 0


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``blip-core finetune --task captioner|filter --init-from CKPT``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", choices=["captioner", "filter"])
    known, rest = p.parse_known_args(argv)
    if known.task is None:
        if any(a in ("-h", "--help") for a in rest):
            build_parser("finetune").print_help()
            print("\n  --task {captioner,filter}  what to fine-tune (required)")
            return 0
        raise SystemExit("error: blip-core finetune needs --task captioner|filter")
    main(rest, task=known.task)
    return 0

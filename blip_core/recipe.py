"""The recipe: every setting of the lineage on the embedded shapes world, each default stated once.

``blip-core bootstrap``, the defaults of ``blip-core pretrain / finetune / caption / capfilt / eval``,
the Dagster assets (``make run``) and ``params.yaml`` (``dvc repro``) all read :class:`Recipe`;
``tests/test_recipe.py`` builds it through each of them and finds them equal. A variant is a YAML
file naming only what it changes (``recipes/quick.yaml``), read by :func:`load_recipe`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blip_core.capfilt import CapfiltConfig
from blip_core.config import TrainConfig, apply_overrides, load_yaml
from blip_core.data.shapes import WorldConfig


@dataclass(frozen=True)
class Stage:
    """Optimisation settings of one training stage."""

    max_steps: int  # optimizer steps
    batch_size: int = 32  # pairs per step
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 20  # linear warm-up steps


@dataclass(frozen=True)
class Evaluation:
    """How the baseline and the bootstrapped model are compared."""

    split: str = "test"  # human split scored
    k: int = 16  # ITM re-ranks the top-k of ITC (256 for COCO's 5k test)
    caption_method: str = "greedy"  # caption decoding for the captioning metrics


@dataclass(frozen=True)
class Recipe:
    """The default recipe on the embedded shapes world (2 CPU cores, about 10 minutes).

    ``seed`` and ``device`` apply to every part: they replace ``world.seed``, ``capfilt.seed``
    and ``capfilt.device``.
    """

    preset: str = "tiny"  # model preset of every stage
    world: WorldConfig = field(default_factory=WorldConfig)  # the shapes world to generate
    # From-scratch tiny models want larger learning rates than the paper's ViT-B (3e-4, 1e-5..2e-5).
    # Steps matter more than batch size here: 600 steps of 32 pairs retrieve better than 300 of 64
    # (and as well as 600 of 64) at half the cost. Retrieval takes off between 600 and 1800
    # pre-training steps; 900 is what fits in 10 minutes on 2 cores (docs/experiments.md).
    pretrain: Stage = Stage(max_steps=900, lr=1e-3)  # both pre-trainings (baseline, bootstrapped)
    captioner: Stage = Stage(max_steps=200, lr=5e-4)  # LM fine-tune on human train
    filter: Stage = Stage(max_steps=600, lr=1e-3)  # ITC + ITM fine-tune; 400 filter worse
    capfilt: CapfiltConfig = field(default_factory=CapfiltConfig)  # generation and filtering
    rounds: int = 1  # bootstrap rounds (the paper does one)
    eval: Evaluation = field(default_factory=Evaluation)
    seed: int = 0  # seeds the world, training and sampling
    device: str = "auto"  # cuda when available, else cpu
    precision: str = "auto"  # blip_core.device.resolve_precision: the fastest the hardware runs natively

    def stage(self, task: str) -> Stage:
        """The optimisation settings of ``task`` (pretrain, captioner or filter)."""
        return {"pretrain": self.pretrain, "captioner": self.captioner, "filter": self.filter}[task]

    def world_config(self) -> WorldConfig:
        """The world to generate, with the recipe's seed."""
        return replace(self.world, seed=self.seed)

    def capfilt_config(self) -> CapfiltConfig:
        """Captioning and filtering settings with the recipe's seed and device."""
        return replace(self.capfilt, seed=self.seed, device=self.device)


def stage_config(recipe: Recipe, stage: Stage, task: str, data: Sequence[str], out: str | Path,
                 init_from: str | Path | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one stage of ``recipe``."""
    return TrainConfig(
        task=task,  # type: ignore[arg-type]
        preset=recipe.preset,
        data=tuple(str(d) for d in data),
        out=str(out),
        init_from=str(init_from) if init_from else None,
        max_steps=stage.max_steps,
        batch_size=stage.batch_size,
        lr=stage.lr,
        warmup_steps=stage.warmup_steps,
        save_every=max(50, stage.max_steps // 4),
        log_every=max(1, stage.max_steps // 30),
        seed=recipe.seed,
        precision=recipe.precision,  # type: ignore[arg-type]
        device=recipe.device,
        resume=True,
    )


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = (), **fields: Any) -> Recipe:
    """The default recipe, changed by a YAML file, then ``fields``, then ``key=value`` overrides."""
    recipe = load_yaml(Recipe, path) if path else Recipe()
    recipe = replace(recipe, **{k: v for k, v in fields.items() if v is not None})
    return apply_overrides(recipe, list(overrides))

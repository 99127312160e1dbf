"""Training on a CUDA device: the GPU path of the recipe (``precision: bf16``, autocast everywhere).

The CPU suite trains in fp32 (and bf16 for the LM projection only); this checks what only a GPU
runs: the training loop on ``cuda`` with bf16 autocast gives finite losses that fall on held-out
pairs, keeps its weights in fp32, and follows the fp32 run of the same seed within a tolerance.
Skipped without CUDA.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip_core.checkpoint import load_model
from blip_core.config import TrainConfig, model_preset
from blip_core.data.dataset import ImageTextDataset
from blip_core.model import BlipModel, TextBatch
from blip_core.tokenizer import load_tokenizer
from blip_core.train import Collator, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS, SEED = 60, 3
TERMS = ("itc", "itm", "lm")


def _train(world: Path, out: Path, precision: str) -> tuple[list[dict[str, float]], int]:
    """``STEPS`` pre-training steps on the tiny world; returns the per-step history and the peak
    CUDA memory the run allocated."""
    torch.cuda.reset_peak_memory_stats()
    result = train(TrainConfig(
        data=(str(world / "web"), f"{world / 'human' / 'annotations.json'}:train"), out=str(out),
        max_steps=STEPS, batch_size=16, lr=1e-3, warmup_steps=3, log_every=1, save_every=1000,
        progress=False, seed=SEED, precision=precision))  # type: ignore[arg-type]
    assert result.steps == STEPS and len(result.history) == STEPS
    return result.history, torch.cuda.max_memory_allocated()


def _held_out(world: Path) -> TextBatch:
    """The human val split (8 images x 5 captions): pairs no step trained on."""
    data = ImageTextDataset([f"{world / 'human' / 'annotations.json'}:val"])
    return Collator(load_tokenizer(), 32, "a picture of ")([data[i] for i in range(len(data))])


def _losses(model: BlipModel, batch: TextBatch) -> dict[str, float]:
    with torch.no_grad():
        return model.cuda().evaluation_losses(batch.to("cuda")).terms()


def test_bf16_training_on_cuda_falls_and_follows_fp32(tiny_world: Path, tmp_path: Path):
    bf16, bf16_memory = _train(tiny_world, tmp_path / "bf16", "bf16")
    fp32, fp32_memory = _train(tiny_world, tmp_path / "fp32", "fp32")
    assert bf16_memory > 0 and fp32_memory > 0  # the runs trained on the GPU, not on the CPU

    for row in bf16:
        assert all(math.isfinite(row[t]) for t in TERMS), row
    # Step 1: the same initial weights and batch, so the same losses up to bf16 rounding ...
    for t in TERMS:
        assert bf16[0][t] == pytest.approx(fp32[0][t], rel=0.03), (t, bf16[0], fp32[0])
    assert any(bf16[0][t] != fp32[0][t] for t in TERMS)  # ... but really computed in bf16
    # ... and the curves stay together: the last ten steps' mean losses within 15% (the training
    # ITC term grows with the momentum queue's negatives; the held-out losses below fall).
    for t in TERMS:
        a, b = (sum(r[t] for r in h[-10:]) / 10 for h in (bf16, fp32))
        assert a == pytest.approx(b, rel=0.15), (t, a, b)

    # The bf16 model learned: its losses on held-out pairs fell from the initial weights'.
    batch = _held_out(tiny_world)
    torch.manual_seed(SEED)
    before = _losses(BlipModel(model_preset("tiny")), batch)
    after = _losses(load_model(tmp_path / "bf16"), batch)
    for t in TERMS:
        assert after[t] < before[t], (t, before, after)
    assert after["lm"] < 0.6 * before["lm"]  # the decoder learns the caption grammar quickly
    weights = load_file(str(tmp_path / "bf16" / "model.safetensors"))  # autocast, not bf16 weights
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}

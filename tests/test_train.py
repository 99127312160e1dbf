"""CPU smoke runs of the training loop on a small shapes world: losses fall, resume is exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip_core.checkpoint import is_checkpoint, latest_trainer_state, load_model, read_config
from blip_core.config import TrainConfig, model_preset
from blip_core.data.dataset import ImageTextDataset
from blip_core.data.shapes import WorldConfig, generate_world
from blip_core.model import BlipModel, TextBatch
from blip_core.tokenizer import load_tokenizer
from blip_core.train import Collator, main, train


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(out, WorldConfig(n_human_train=60, n_human_val=10, n_human_test=10, n_web=200,
                                    shard_size=100))
    return out


def _cfg(world: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(
        data=(str(world / "web"), f"{world / 'human' / 'annotations.json'}:train"),
        out=str(out), max_steps=12, batch_size=16, lr=1e-3, warmup_steps=3, log_every=1,
        save_every=6, progress=False, seed=3,
    )
    return replace(base, **kw)


def _fixed_batch(world: Path) -> TextBatch:
    """64 held-out pairs (the human val split), 5 captions of each image among them."""
    tok = load_tokenizer()
    data = ImageTextDataset([f"{world / 'human' / 'annotations.json'}:val"])
    return Collator(tok, 32, "a picture of ")([data[i] for i in range(min(len(data), 50))])


@pytest.mark.slow  # 60 steps of pre-training
def test_tiny_pretraining_lowers_all_three_losses(world, tmp_path):
    """With the embedded recipe's precision (bf16 LM projection); the other tests train in fp32."""
    batch = _fixed_batch(world)
    torch.manual_seed(3)
    before = BlipModel(model_preset("tiny")).evaluation_losses(batch).terms()
    result = train(_cfg(world, tmp_path / "run", max_steps=60, log_every=10, save_every=100,
                        precision="bf16-lm"))
    after = load_model(result.checkpoint).evaluation_losses(batch).terms()
    for term in ("itc", "itm", "lm"):
        assert after[term] < before[term], (term, before, after)
    assert after["lm"] < 0.6 * before["lm"]  # the decoder learns the caption grammar quickly
    assert is_checkpoint(result.checkpoint) and result.steps == 60
    cfg, meta = read_config(result.checkpoint)
    assert meta["task"] == "pretrain" and meta["steps"] == 60 and cfg.vision.image_size == 64


def test_same_seed_same_weights_on_two_threads(world, tmp_path):
    """Two runs of one config on 2 threads give bit-identical weights (deterministic kernels; a
    few CPU kernels otherwise reduce in a thread-dependent order), and the caller's setting is
    left as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # 4 steps: a thread-dependent sum differs from the first step on, and Adam carries it
        runs = [load_file(Path(train(_cfg(world, tmp_path / f"r{i}", batch_size=32, max_steps=4,
                                          save_every=100)).checkpoint) / "model.safetensors")
                for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0].keys() == runs[1].keys()
    assert [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])] == []
    assert not torch.are_deterministic_algorithms_enabled()


class _Killed(RuntimeError):
    pass


def test_resume_continues_exactly_where_the_last_checkpoint_left_off(world, tmp_path):
    small = dict(max_steps=6, save_every=3, batch_size=8)  # the same check as 12 steps of 16
    full = train(_cfg(world, tmp_path / "full", **small))

    def die_at_5(step: int, row: dict) -> None:
        if step == 5:
            raise _Killed  # dies after the step-3 checkpoint, before the next one

    with pytest.raises(_Killed):
        train(_cfg(world, tmp_path / "killed", **small), on_log=die_at_5)
    assert latest_trainer_state(tmp_path / "killed").name == "step_0000003"
    assert not is_checkpoint(tmp_path / "killed")  # no final model folder from a dead run

    resumed = train(_cfg(world, tmp_path / "killed", resume=True, **small))
    assert resumed.resumed_from == 3
    assert [r["step"] for r in resumed.history] == list(range(1, 7))  # the dead run's rows kept
    by_step = {r["step"]: r for r in full.history}
    for row in resumed.history:
        if row["step"] > 3:
            for term in ("itc", "itm", "lm", "lr"):
                assert row[term] == pytest.approx(by_step[row["step"]][term], rel=1e-6, abs=1e-7)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].clone(), b[k].clone()
        if k.endswith("key.bias") or k.endswith("qkv.bias"):
            # An attention key bias has a mathematically zero gradient (softmax ignores a shift);
            # Adam normalises its float round-off into lr-sized steps, so only bound it.
            dim = x.shape[0] // 3
            keys = slice(dim, 2 * dim) if k.endswith("qkv.bias") else slice(None)
            torch.testing.assert_close(x[keys], y[keys], rtol=0, atol=1e-4, msg=k)
            x[keys] = y[keys] = 0
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_finetune_from_a_checkpoint_via_the_cli(world, tmp_path, capsys):
    pre = tmp_path / "pre"
    train(_cfg(world, pre, max_steps=4, save_every=100))
    for task in ("captioner", "filter"):
        out = tmp_path / task
        main(["--init-from", str(pre), "--data", f"{world / 'human' / 'annotations.json'}:train",
              "--out", str(out), "--max-steps", "3", "--batch-size", "8", "--no-progress"], task=task)
        assert is_checkpoint(out)
        assert read_config(out)[1]["task"] == task
    printed = capsys.readouterr().out
    assert "captioner: 3 steps" in printed and f"checkpoint: {(tmp_path / 'filter').resolve()}" in printed
    # the filter fine-tune leaves the decoder's own self-attention untouched
    pre_model, filt = load_model(pre), load_model(tmp_path / "filter")
    torch.testing.assert_close(pre_model.text_encoder.layers[0].self_attn_causal.query.weight,
                               filt.text_encoder.layers[0].self_attn_causal.query.weight)
    assert not torch.equal(pre_model.itm_head.weight, filt.itm_head.weight)


def test_a_finetune_without_init_from_is_refused(world, tmp_path):
    with pytest.raises(SystemExit, match="needs --init-from"):
        main(["--data", str(world / "web"), "--out", str(tmp_path / "x")], task="captioner")

"""``blip-core pretrain`` killed with SIGKILL at seeded random moments, resumed until it finishes.

Real subprocesses and real signals: some kills land mid-step, some while a trainer state is being
written, one while the final model folder is being written. Each restart with ``--resume`` must
start from the newest complete trainer state (never a partial one), and the run must end with the
very weights, optimizer state and loss log of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip_core.checkpoint import STATE_DIR, latest_trainer_state, load_trainer_state
from blip_core.config import model_preset
from blip_core.model import BlipModel

SEED = 20240607  # seeds the kill schedule, not the run
MAX_STEPS, SAVE_EVERY = 16, 2  # 80 web pairs in batches of 8: 10 steps an epoch, so one boundary
POLL = 0.002  # seconds between looks at the run folder


def _pretrain(world: Path, out: Path, log: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blip_core.cli", "pretrain", "--data", str(world / "web"),
           "--out", str(out), "--max-steps", str(MAX_STEPS), "--batch-size", "8", "--seed", "7",
           "--no-progress", "warmup_steps=2", f"save_every={SAVE_EVERY}", "log_every=1"]
    # One thread: on a busy shared CPU two spinning OpenMP threads run many times slower. The
    # reference and every trial run alike, so the arithmetic (and its round-off) is the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=f,
                                stderr=subprocess.STDOUT, env=env)


def _steps(out: Path) -> list[int]:
    """Steps of the visible trainer states."""
    return sorted(int(p.name[5:]) for p in (out / STATE_DIR).glob("step_*"))


def _hidden(folder: Path) -> list[str]:
    """What the atomic writers leave while at work (or after being killed): dot-named entries."""
    return sorted(p.name for p in folder.glob(".*")) if folder.is_dir() else []


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float, limit: float = 240.0
               ) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; False if it ended first."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(POLL)
    if proc.poll() is None:  # never reached the moment: stop it, the test fails below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return False


def _assert_complete(folder: Path, model: BlipModel) -> None:
    """A visible trainer state loads in full and is the step its name says."""
    _, progress = load_trainer_state(folder, model)
    assert progress["step"] == int(folder.name[5:]), folder


@pytest.mark.slow  # six training subprocesses, five SIGKILLed: over a minute
def test_sigkill_at_random_moments_resumes_to_the_same_weights(tiny_world, tmp_path):
    start = time.monotonic()
    reference = tmp_path / "reference"
    proc = _pretrain(tiny_world, reference, tmp_path / "reference.log", resume=False)
    assert proc.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()

    rng = random.Random(SEED)
    kinds = ["step", "save", "step", "save"]
    rng.shuffle(kinds)
    kinds += ["final"]  # the last kill lands while the finished model folder is written
    out, probe = tmp_path / "killed", BlipModel(model_preset("tiny"))
    state_root = out / STATE_DIR
    kills, during_save, during_final, resumes, expected = 0, 0, 0, 0, None
    leftovers: list[str] = []  # what the kills left half-written
    for trial, kind in enumerate(kinds + ["none"]):
        log = tmp_path / f"trial{trial}.log"
        proc = _pretrain(tiny_world, out, log, resume=trial > 0)
        last, stale = max(_steps(out), default=0), set(_hidden(state_root))  # stale: the last kill's
        # Targets lie ahead of where the trial resumed (4 kills of at most 2 saves each fit in).
        if kind == "step":  # some time after a trainer state a little ahead of where it resumed
            target = min(last + SAVE_EVERY * rng.randint(1, 2), MAX_STEPS - SAVE_EVERY)
            killed = _kill_when(proc, lambda t=target: max(_steps(out), default=0) >= t,
                                rng.uniform(0.0, 0.6))
        elif kind == "save":  # while the trainer state of a step ahead is being written
            target = min(last + SAVE_EVERY * rng.randint(1, 2), MAX_STEPS)
            prefix = f".step_{target:07d}.tmp-"
            killed = _kill_when(proc, lambda p=prefix, s=stale: any(
                n.startswith(p) and n not in s for n in _hidden(state_root)), rng.uniform(0.0, 0.05))
        elif kind == "final":  # while the model folder's weights / tokenizer / config are written
            killed = _kill_when(proc, lambda: bool(_hidden(out)), rng.uniform(0.0, 0.02))
        else:
            killed = False
            assert proc.wait(timeout=300) == 0, log.read_text()

        printed = log.read_text()
        resumed = re.search(r"resuming .* at step (\d+) from step_(\d+)", printed)
        if expected is None:
            assert resumed is None, printed
        else:  # restarted from the newest complete trainer state the last kill left
            assert resumed and int(resumed.group(1)) == int(resumed.group(2)) == expected, printed
            resumes += 1
        if not killed:
            assert kind == "none", f"trial {trial} ({kind}) ended before its kill: {printed}"
            break
        kills += 1
        visible = _steps(out)
        for step in visible:  # whatever is visible is whole: never half a checkpoint
            _assert_complete(state_root / f"step_{step:07d}", probe)
        partial = [int(m.group(1)) for n in _hidden(state_root)
                   if (m := re.match(r"\.step_(\d+)\.tmp-", n))]
        during_save += bool(partial)
        leftovers += _hidden(out) + _hidden(state_root)
        during_final += kind == "final" and bool(_hidden(out))
        # A partial state is newer than every visible one: resuming must pass it over.
        assert all(p > max(visible, default=0) for p in partial), (partial, visible)
        expected = max(visible) if visible else None
        if visible:
            assert latest_trainer_state(out).name == f"step_{expected:07d}"

    assert kills == len(kinds) and during_save >= 1 and during_final == 1, (kills, during_save)
    assert _hidden(out) == [] and _hidden(state_root) == []  # leftovers of the kills cleaned up
    assert len(_steps(out)) <= 2  # the rotation kept only the newest states

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], differ
    final = f"step_{MAX_STEPS:07d}"
    opt_a, _ = load_trainer_state(reference / STATE_DIR / final, probe)
    opt_b, _ = load_trainer_state(state_root / final, probe)
    for s, t in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values(),
                    strict=True):
        assert all(torch.equal(s[k], t[k]) for k in s)
    meta_a = json.loads((reference / "config.json").read_text())["meta"]
    meta_b = json.loads((out / "config.json").read_text())["meta"]
    assert meta_b["steps"] == MAX_STEPS and meta_b["history"] == meta_a["history"]  # exact floats
    print(f"\nkill/resume: {kills} kills ({during_save} during a trainer-state save, {during_final} "
          f"during the final model write), {resumes} resumes, leftovers cleaned {leftovers}, "
          f"{len(a)} tensors identical, "
          f"{time.monotonic() - start:.0f}s")


ROTATE = textwrap.dedent("""
    import os, shutil, signal, sys
    import blip_core.checkpoint as ck
    from blip_core.config import model_preset
    from blip_core.model import BlipModel

    out, model = sys.argv[1], BlipModel(model_preset("tiny"))
    for step in (2, 4):
        ck.save_trainer_state(out, step, model, {"optimizer": {}}, {"step": step}, keep=2)

    def dies_half_way(path, *args, **kwargs):  # deletes one file under the folder, then SIGKILL
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        os.remove(files[0])
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.rmtree = dies_half_way
    ck.save_trainer_state(out, 6, model, {"optimizer": {}}, {"step": 6}, keep=2)
""")


def test_a_kill_while_old_states_are_pruned_leaves_only_whole_ones(tmp_path):
    """The rotation (keep the newest 2) killed half way through deleting the oldest state."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", ROTATE, str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    probe = BlipModel(model_preset("tiny"))
    for step in _steps(out):
        _assert_complete(out / STATE_DIR / f"step_{step:07d}", probe)
    assert _steps(out) == [4, 6]
    assert latest_trainer_state(out).name == "step_0000006"


def test_a_fresh_run_in_an_old_run_folder_never_resumes_the_old_state(tiny_world, tmp_path):
    """Without ``--resume`` the states of an earlier, longer run in ``out`` are not kept: else the
    rotation would prune the new run's states first and a later ``--resume`` take up the old run."""
    from blip_core.config import TrainConfig
    from blip_core.train import train

    out, threads = tmp_path / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = dict(data=(str(tiny_world / "web"),), out=str(out), batch_size=8, warmup_steps=1,
                    progress=False)
        train(TrainConfig(**base, max_steps=6, save_every=2, seed=1))  # the old run: states 4, 6
        train(TrainConfig(**base, max_steps=2, save_every=1, seed=2))  # a new one: states 1, 2
    finally:
        torch.set_num_threads(threads)
    assert _steps(out) == [1, 2]
    _, progress = load_trainer_state(latest_trainer_state(out), BlipModel(model_preset("tiny")))
    assert progress["config"]["seed"] == 2 and progress["step"] == 2

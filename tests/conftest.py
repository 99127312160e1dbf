"""Shared fixtures: a tiny shapes world, tiny run configs, a local S3 endpoint (moto server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _key, _value in (("DAGSTER_DISABLE_TELEMETRY", "true"), ("GX_ANALYTICS_ENABLED", "false"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1"),
                     ("TRANSFORMERS_OFFLINE", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_key, _value)

TINY_WORLD = dict(n_human_train=40, n_human_val=8, n_human_test=16, n_web=80, shard_size=40)
"""A shapes world of two web shards that trains in seconds."""

_TINY_STEPS = {"max_steps": 2, "batch_size": 8, "warmup_steps": 1}
TINY_RUN_CONFIG: dict[str, Any] = {"ops": {
    "pretrained_med": {"config": _TINY_STEPS},
    "captioner": {"config": _TINY_STEPS},
    "filter": {"config": _TINY_STEPS},
    "bootstrapped_med": {"config": _TINY_STEPS},
    "synthetic_captions": {"config": {"batch_size": 40, "max_length": 8, "min_length": 2}},
    "bootstrapped_corpus": {"config": {"batch_size": 40}},
    # A model trained for 2 steps filters at random: accept any ratio here; the band itself
    # is tested by pushing the ratio out of it.
    "bootstrapped_corpus_checks": {"config": {"web_min": 0.0, "web_max": 1.0,
                                              "synthetic_min": 0.0, "synthetic_max": 1.0}},
    "downstream_evals": {"config": {"k": 4}},
}}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Waits until something listens on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar of ``(name, data)`` members, as any tool may write one."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def leaky_human_world(tmp_path: Path, tiny_world: Path) -> Path:
    """A copy of ``tiny_world`` with a test image copied into train under another name: the
    blocking ``splits_disjoint`` check of ``human_pairs`` fails."""
    import json
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    ann = world / "human" / "annotations.json"
    entries = json.loads(ann.read_text())
    test_image = next(e for e in entries if e["split"] == "test")
    shutil.copy(world / "human" / test_image["image"], world / "human" / "images" / "copy.jpg")
    entries.append({"image": "images/copy.jpg", "caption": ["a copy"], "split": "train", "image_id": "copy"})
    ann.write_text(json.dumps(entries))
    return world


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stops a process we started, by its own PID: SIGINT, then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        if proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated tiny shapes world (human/, web/, truth/, manifest.json)."""
    from blip_core.data.shapes import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(out, WorldConfig(**TINY_WORLD))
    return out


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint on a free 127.0.0.1 port (moto's server mode); yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials and the moto endpoint in the environment (the boto3 chain reads them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server

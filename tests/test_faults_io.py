"""I/O faults, each one real: an asset run SIGKILLed mid-write, an S3 endpoint stopped, cut or slow,
an MLflow tracking server gone during training.

The faults come from real processes and signals (a subprocess killed with SIGKILL, a moto server
stopped and started again on its port) and from :class:`FaultProxy`, a TCP proxy of our own in
front of a real server that refuses, cuts or delays connections (a fault injector, not a mock).
"""

from __future__ import annotations

import collections
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
from conftest import free_port, stop_process, wait_for_port
from dagster import DagsterInstance, asset, materialize
from mlflow.tracking import MlflowClient

from assets import ALL_ASSETS
from blip_core.io import tree_hash
from orchestration.definitions import build_resources
from resources.launcher import LocalLauncher
from resources.mlflow_tracking import MlflowResource
from resources.storage import MARKER, LocalStorage, S3Storage, StorageError, dataset_key

REPO = Path(__file__).resolve().parents[1]
SHARD = "00000.tar"
WEB_KEY = dataset_key(["web_shards"], SHARD)
HUMAN_KEY = dataset_key(["human_pairs"])
MED_KEY = dataset_key(["pretrained_med"])
CAPTIONER_KEY = dataset_key(["captioner"])
TRAIN_CONFIG = {"config": {"max_steps": 3, "batch_size": 8, "warmup_steps": 1}}
SECRET = "s3cret-pw"  # the password in the tracking URI: it must appear in no error message


class FaultProxy:
    """A TCP proxy on a free 127.0.0.1 port in front of a real server: our fault injector.

    ``down()`` stops listening and cuts the open connections (clients get "connection refused",
    as from a stopped server); ``up()`` listens on the same port again; ``slow(n, delay)`` holds
    the server's answer on the next ``n`` connections for ``delay`` seconds.
    """

    live: ClassVar[dict[int, FaultProxy]] = {}  # by port, for resources that name one

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delayed = 0  # connections slowed down so far
        self._slow_left, self._delay = 0, 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        FaultProxy.live[self.port] = self
        self.up()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        if self.is_up:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for conn in self._open:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def slow(self, connections: int, delay: float) -> None:
        with self._lock:
            self._slow_left, self._delay = connections, delay

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                delay = self._delay if self._slow_left > 0 else 0.0
                if delay:
                    self._slow_left -= 1
                    self.delayed += 1
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, delay), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                if delay:  # the first bytes of the answer come late
                    time.sleep(delay)
                    delay = 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)
            src.close()


class MotoServer:
    """A real S3 endpoint (moto's server mode) that can be stopped and started on the same port.

    moto keeps its state in memory (it has no persistence): a restart loses every bucket.
    """

    def __init__(self, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                          "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, 60, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = MotoServer(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    """Proxies a test creates, closed at its end."""
    made: list[FaultProxy] = []
    try:
        yield made
    finally:
        for proxy in made:
            proxy.down()
            FaultProxy.live.pop(proxy.port, None)


def _folder(root: Path, version: str, files: int = 6) -> Path:
    """``files`` text files whose every byte says which version they belong to."""
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"part-{i}.txt").write_text(f"{version} part {i}\n" * 500)
    return root


def _attempts(storage: S3Storage) -> collections.Counter:
    """Counts every HTTP attempt (retries included) of the storage's client: (method, name)."""
    sent: collections.Counter = collections.Counter()

    def count(request: Any, **_: Any) -> None:
        sent[(request.method, request.url.split("?")[0].rsplit("/", 1)[-1])] += 1

    storage.client.meta.events.register("before-send.s3", count)
    return sent


def _on_put(storage: S3Storage, sent: collections.Counter, nth: int, action: Any) -> None:
    """Runs ``action`` just before the ``nth`` PUT of the storage's client goes out."""
    def hook(request: Any, **_: Any) -> None:
        if request.method == "PUT" and sum(n for (m, _), n in sent.items() if m == "PUT") == nth:
            action()

    storage.client.meta.events.register("before-send.s3", hook)  # after the counter


# --- S3 endpoint faults ------------------------------------------------------------------------


def test_s3_endpoint_stopped_mid_publish_is_retried_then_fails_clearly(moto: MotoServer, tmp_path: Path):
    storage = S3Storage(bucket="faults", endpoint_url=moto.url, cache_dir=str(tmp_path / "cache"),
                        max_attempts=4)
    storage.client.create_bucket(Bucket="faults")
    storage.publish_dir(_folder(tmp_path / "v1", "v1"), "assets/x")
    sent = _attempts(storage)
    _on_put(storage, sent, 3, moto.stop)  # the endpoint dies as the third file goes up

    start = time.monotonic()
    with pytest.raises(StorageError, match=r"upload s3://faults/blip-ops/assets/x/part-2.txt failed: "
                                           r"endpoint unreachable or too slow after up to 4 attempts"):
        storage.publish_dir(_folder(tmp_path / "v2", "v2"), "assets/x")
    seconds, attempts = time.monotonic() - start, sent[("PUT", "part-2.txt")]
    assert attempts == 4  # the first attempt and three retries
    assert ("PUT", MARKER) not in sent  # the marker goes last: never reached
    with pytest.raises(StorageError, match="endpoint unreachable"):  # down: an error, not "absent"
        storage.exists("assets/x")

    moto.start()  # same port, empty
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.exists("assets/x")
    storage.client.create_bucket(Bucket="faults")
    assert not storage.exists("assets/x")
    assert storage.publish_dir(tmp_path / "v2", "assets/x") == tree_hash(tmp_path / "v2")
    assert storage.exists("assets/x")
    print(f"endpoint stopped mid-publish: {attempts} attempts, clear error after "
          f"{seconds:.2f}s")


def test_publish_cut_midway_is_never_read_as_complete(moto: MotoServer, proxies: list[FaultProxy],
                                                      tmp_path: Path):
    """The connection dies after two of six files of v2 went up over v1: the bucket holds a mix and
    no marker; every reader sees no dataset (not v1 from its cache, not the mix) until v2 is re-published."""
    proxy = FaultProxy(moto.port)
    proxies.append(proxy)
    via = S3Storage(bucket="faults", endpoint_url=proxy.url(), cache_dir=str(tmp_path / "cache"),
                    max_attempts=3)
    direct = S3Storage(bucket="faults", endpoint_url=moto.url, cache_dir=str(tmp_path / "direct"))
    direct.client.create_bucket(Bucket="faults")
    v1 = via.publish_dir(_folder(tmp_path / "v1", "v1"), "assets/x")
    with via.local_dir("assets/x") as path:  # v1 is now in via's local cache too
        assert (path / "part-5.txt").read_text().startswith("v1")
    sent = _attempts(via)
    _on_put(via, sent, 3, proxy.down)

    with pytest.raises(StorageError, match="part-2.txt failed: endpoint unreachable"):
        via.publish_dir(_folder(tmp_path / "v2", "v2"), "assets/x")
    prefix = "blip-ops/assets/x/"
    listing = direct.client.list_objects_v2(Bucket="faults", Prefix=prefix)["Contents"]
    first = {o["Key"][len(prefix):]: direct.client.get_object(Bucket="faults", Key=o["Key"])["Body"].read(2)
             for o in listing}
    assert first == {"part-0.txt": b"v2", "part-1.txt": b"v2", "part-2.txt": b"v1", "part-3.txt": b"v1",
                     "part-4.txt": b"v1", "part-5.txt": b"v1"}  # half v2, half v1, no marker
    fresh = S3Storage(bucket="faults", endpoint_url=moto.url, cache_dir=str(tmp_path / "fresh"))
    for reader in (direct, fresh):
        assert not reader.exists("assets/x")
        with pytest.raises(StorageError, match="no complete dataset"):
            reader.version("assets/x")
        with pytest.raises(StorageError, match="no complete dataset"), reader.local_dir("assets/x"):
            pass

    proxy.up()
    assert not via.exists("assets/x")
    with pytest.raises(StorageError, match="no complete dataset"), via.local_dir("assets/x"):
        pass  # its cached, complete v1 is not served either
    v2 = via.publish_dir(tmp_path / "v2", "assets/x")
    assert v2 == tree_hash(tmp_path / "v2") != v1
    with fresh.local_dir("assets/x") as path:  # downloaded, hash-checked against the marker
        assert {p.name: p.read_text() for p in path.iterdir() if p.name != MARKER} == \
            {p.name: p.read_text() for p in (tmp_path / "v2").iterdir()}


def test_slow_s3_endpoint_is_retried_and_one_that_stays_slow_fails_clearly(
        moto: MotoServer, proxies: list[FaultProxy], tmp_path: Path):
    proxy = FaultProxy(moto.port)
    proxies.append(proxy)
    S3Storage(bucket="faults", endpoint_url=moto.url).client.create_bucket(Bucket="faults")
    storage = S3Storage(bucket="faults", endpoint_url=proxy.url(), cache_dir=str(tmp_path / "cache"),
                        read_timeout_s=1.0, max_attempts=5)
    sent = _attempts(storage)
    proxy.slow(connections=3, delay=4.0)  # the next three connections answer after 4 s

    version = storage.publish_dir(_folder(tmp_path / "v1", "v1"), "assets/x")
    requests_made = 1 + 6 + 1 + 1  # delete the old marker, six files, list stale objects, the marker
    retries = sum(sent.values()) - requests_made
    assert proxy.delayed == 3
    assert retries >= 3  # every slow connection timed out and was retried on a new one
    assert version == tree_hash(tmp_path / "v1") == storage.version("assets/x")

    proxy.slow(connections=1000, delay=4.0)  # now it stays slow
    patient = S3Storage(bucket="faults", endpoint_url=proxy.url(), cache_dir=str(tmp_path / "cache2"),
                        read_timeout_s=1.0, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"get s3://faults/blip-ops/assets/x/\.complete\.json failed: "
                       r"endpoint unreachable or too slow after up to 2 attempts.*Read timeout"):
        patient.exists("assets/x")
    print(f"slow endpoint: {retries} retries, then published; stays slow: clear error after "
          f"{time.monotonic() - start:.1f}s")


# --- an asset run killed mid-write -------------------------------------------------------------


def _resources(storage: LocalStorage, **overrides: Any) -> dict[str, Any]:
    return {**build_resources(storage, storage.root, launcher=LocalLauncher(), dvc_push=False), **overrides}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory,
             tiny_world: Path) -> tuple[LocalStorage, DagsterInstance]:
    """web_shards[00000.tar] and human_pairs materialized without any fault (checks left out)."""
    storage = LocalStorage(root=str(tmp_path_factory.mktemp("ingested")))
    storage.publish_dir(tiny_world, "landing")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("web_shards", [SHARD])
    for pk, selection in ((SHARD, ["web_shards"]), (None, ["human_pairs"])):
        result = materialize(ALL_ASSETS, selection=selection, partition_key=pk,
                             instance=instance, resources=_resources(storage))
        assert result.success
    return storage, instance


KILLED_CHILD = """
import sys, time
import resources.storage as storage_module
from dagster import DagsterInstance, asset, materialize
from assets import ALL_ASSETS
from orchestration.definitions import build_resources
from resources.launcher import LocalLauncher

write_json = storage_module.atomic_write_json

def stall_before_marker(path, obj):  # the fault point: every output file is written, the marker is next
    if path.name == storage_module.MARKER:
        print("WRITING", flush=True)
        time.sleep(600)
    return write_json(path, obj)

storage_module.atomic_write_json = stall_before_marker
storage = storage_module.LocalStorage(root=sys.argv[1])
instance = DagsterInstance.ephemeral()
instance.add_dynamic_partitions("web_shards", ["00000.tar"])
materialize(ALL_ASSETS, selection=["web_shards"], partition_key="00000.tar",
            instance=instance,
            resources=build_resources(storage, sys.argv[1], launcher=LocalLauncher(), dvc_push=False))
"""


@pytest.mark.slow  # an asset run in a subprocess, SIGKILLed
def test_asset_killed_mid_write_leaves_nothing_visible_and_the_rerun_gives_the_same_version(
        ingested: tuple[LocalStorage, DagsterInstance], tiny_world: Path, tmp_path: Path):
    reference, _ = ingested
    storage = LocalStorage(root=str(tmp_path / "data"))
    storage.publish_dir(tiny_world, "landing")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, storage.root], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail = [*tail[-30:], line]
            if line.strip() == "WRITING":
                break
        assert tail and tail[-1].strip() == "WRITING", "".join(tail)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL

    # What the killed run left: its whole output, in a hidden temporary folder, without a marker,
    # and its staging folder (named after its host and process).
    [leftover] = list(storage.path("assets/web_shards").iterdir())
    assert leftover.name.startswith(f".{SHARD}.tmp-")
    written = sorted(p.name for p in leftover.iterdir())
    assert written == sorted(p.name for p in reference.path(WEB_KEY).iterdir() if p.name != MARKER)
    stages = Path(storage.root) / ".work" / "tmp"
    [stage] = [p.name for p in stages.iterdir()]
    assert stage.startswith(f"stage-{socket.gethostname()}-{proc.pid}-")
    # Downstream assets read inputs through the marker (DatasetIOManager -> version()): nothing there.
    assert not storage.exists(WEB_KEY)
    with pytest.raises(StorageError, match="no complete dataset"):
        storage.version(WEB_KEY)
    with pytest.raises(StorageError, match="no complete dataset"), storage.local_dir(WEB_KEY):
        pass

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("web_shards", [SHARD])
    result = materialize(ALL_ASSETS, selection=["web_shards"], partition_key=SHARD,
                         instance=instance, resources=_resources(storage))
    assert result.success
    [event] = result.get_asset_materialization_events()
    version = event.materialization.tags["dagster/data_version"]
    assert version == storage.version(WEB_KEY) == reference.version(WEB_KEY)  # as if never killed
    assert sorted(p.name for p in storage.path(WEB_KEY).iterdir()) == \
        sorted(p.name for p in reference.path(WEB_KEY).iterdir())
    # The re-run removed what the killed one left (its process is gone).
    assert not [p.name for p in storage.path("assets/web_shards").iterdir() if p.name.startswith(".")]
    assert not list(stages.iterdir())
    print(f"killed before its marker with {len(written)} files written; re-run: {version[:12]} "
          f"== uninterrupted {reference.version(WEB_KEY)[:12]}; leftovers {leftover.name}, {stage} "
          "ignored, then removed")


# --- MLflow tracking store outages ------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real MLflow tracking server (SQLite backend, proxied artefacts); yields its port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            with suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            assert time.monotonic() < deadline, "MLflow server did not start"
            time.sleep(0.5)
        yield port
    finally:
        stop_process(proc)


@pytest.mark.slow  # a real MLflow server (about 10 s to start)
def test_metrics_logged_while_the_store_is_down_reach_it_when_it_is_back(
        mlflow_server: int, proxies: list[FaultProxy]):
    proxy = FaultProxy(mlflow_server)
    proxies.append(proxy)
    tracking = MlflowResource(tracking_uri=proxy.url(), experiment="metrics-kept-back")
    kept_back: list[int] = []

    @asset
    def captioner(context, mlflow: MlflowResource) -> None:  # noqa: ANN001 (dagster: no Any)
        with mlflow.start_run(context) as run:
            run.log_step(1, {"step": 1, "lm": 3.0})
            proxy.down()
            for step in (2, 3):  # training goes on: these return without waiting for the store
                run.log_step(step, {"step": step, "lm": 3.0 - step / 2})
            kept_back.append(len(run.pending))
            threading.Timer(1.0, proxy.up).start()  # back while the run is ending

    result = materialize([captioner], resources={"mlflow": tracking})
    assert kept_back == [2]
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server}")  # straight to the server
    experiment = client.get_experiment_by_name("metrics-kept-back").experiment_id
    [run] = client.search_runs([experiment], f"tags.dagster_run_id = '{result.run_id}' "
                               "and tags.dagster_asset = 'captioner'")
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lm")] == \
        [(1, 3.0), (2, 2.0), (3, 1.5)]


class OutageLauncher(LocalLauncher):
    """In-process training that takes the store behind a :class:`FaultProxy` down right after the
    first logged step, and brings it back ``back_after_s`` seconds after training (never if < 0)."""

    proxy_port: int
    back_after_s: float = -1.0
    steps: ClassVar[dict[int, list[int]]] = {}  # by proxy port: every step trained
    ended: ClassVar[dict[int, float]] = {}  # by proxy port: when the last training ended

    def train(self, context: Any, cfg: Any, on_log: Any = None) -> Any:
        proxy = FaultProxy.live[self.proxy_port]

        def log(step: int, row: dict[str, float]) -> None:
            on_log(step, row)
            OutageLauncher.steps.setdefault(self.proxy_port, []).append(step)
            proxy.down()

        result = super().train(context, cfg, on_log=log)
        OutageLauncher.ended[self.proxy_port] = time.monotonic()
        if self.back_after_s >= 0:
            threading.Timer(self.back_after_s, proxy.up).start()
        return result


def _events(result: Any) -> str:
    """Every event of a run as text: failures with their causes and stacks."""
    return "\n".join(f"{e.message}\n{e.event_specific_data}" for e in result.all_events)


@pytest.mark.slow  # a real MLflow server and three trainings
def test_mlflow_outage_fails_before_training_or_after_it_and_no_training_result_is_lost(
        ingested: tuple[LocalStorage, DagsterInstance], mlflow_server: int, proxies: list[FaultProxy],
        tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    """The captioner, fine-tuned from an untrained tiny model, through a store that goes away:
    1. down when the asset starts: it fails at once, before any training;
    2. down from the first logged step on, for longer than ``outage_wait_s``: it fails clearly
       after training, the checkpoint published;
    3. back: the re-run resumes at the last step (trains nothing again) and logs the whole run."""
    from test_mlflow import tiny_checkpoint

    storage, instance = ingested
    storage.publish_dir(tiny_checkpoint(tmp_path / "med"), MED_KEY, exclude=("trainer_state",))
    proxy = FaultProxy(mlflow_server)
    proxies.append(proxy)
    tracking = MlflowResource(tracking_uri=proxy.url(f"blip:{SECRET}"), experiment="outage-training",
                              outage_wait_s=3.0)
    shown = f"MLflow tracking store http://blip:***@127.0.0.1:{proxy.port}"
    work = Path(storage.root) / ".work" / "train" / "captioner"

    def train(**launcher: Any) -> Any:
        resources = _resources(storage, mlflow=tracking,
                               launcher=OutageLauncher(proxy_port=proxy.port, **launcher))
        return materialize(ALL_ASSETS, selection=["captioner"], instance=instance, resources=resources,
                           run_config={"ops": {"captioner": TRAIN_CONFIG}}, raise_on_error=False)

    proxy.down()
    start = time.monotonic()
    result = train()
    before_training = time.monotonic() - start
    assert not result.success
    assert f"{shown} is not usable" in _events(result) and SECRET not in _events(result)
    assert not work.exists() and not storage.exists(CAPTIONER_KEY)  # nothing trained, nothing written

    proxy.up()
    result = train()  # never back
    assert not result.success
    assert f"{shown} unreachable for" in _events(result) and SECRET not in _events(result)
    after_training = time.monotonic() - OutageLauncher.ended[proxy.port]
    assert OutageLauncher.steps[proxy.port] == [1, 2, 3]
    first = storage.version(CAPTIONER_KEY)  # the trained checkpoint is kept
    with storage.local_dir(CAPTIONER_KEY) as ckpt:
        files = {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
        history = json.loads(files["config.json"])["meta"]["history"]
    assert [row["step"] for row in history] == [1, 2, 3]

    proxy.up()
    result = train(back_after_s=0.0)
    assert result.success, _events(result)[-3000:]
    [mat] = [e.materialization for e in result.get_asset_materialization_events()]
    assert mat.metadata["reused"].value is False  # published, but no finished run: made again ...
    assert OutageLauncher.steps[proxy.port] == [1, 2, 3]  # ... resuming at its last step
    run_id = mat.metadata["mlflow_run_id"].value
    client = MlflowClient(f"http://127.0.0.1:{mlflow_server}")  # straight to the server
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    version = storage.version(CAPTIONER_KEY)
    assert run.data.tags["data_version"] == mat.tags["dagster/data_version"] == version
    with storage.local_dir(CAPTIONER_KEY) as ckpt:  # the same training result
        again = {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert again["model.safetensors"] == files["model.safetensors"]
    assert json.loads(again["config.json"])["meta"]["history"] == history
    for term in ("lm", "lr"):  # the whole loss curve, though the first run's metrics were lost
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, term)] == \
            [(row["step"], row[term]) for row in history], term
    [registered] = client.search_model_versions("name = 'blip-captioner'")
    assert registered.run_id == run_id
    out, err = capfd.readouterr()
    assert SECRET not in out + err  # nor in what the outage printed
    differ = sorted(k for k in files.keys() | again.keys() if files.get(k) != again.get(k) and k != MARKER)
    assert differ == [] and version == first  # the same data version: downstream does not re-run
    print(f"MLflow down at the start: failed {before_training:.1f}s in, before training; down from "
          f"step 1 on: failed {after_training:.1f}s after training, checkpoint {first[:12]} kept; "
          f"re-run: resumed at step 3, run {run_id[:8]} FINISHED with 3 steps and the model; data "
          f"version {version[:12]} == {first[:12]}")

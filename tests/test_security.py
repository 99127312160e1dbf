"""Credentials never leak, and the UI binds to this machine only unless told otherwise.

Secret-looking variables (AWS keys and session token, MLflow password and token, a password
inside the tracking URI) are set to unique random strings, the real paths run (an in-process
materialization of part of the lineage with a Pipes training subprocess and a real MLflow server
on SQLite, a Kubernetes launch whose API alone is faked, the resources built from the
environment), and every text they leave behind is searched for those strings: files under the
test folder (MLflow's database and artefacts, Dagster's event log and captured logs, the data
folder), the captured stdout / stderr, the pod body with its Pipes bootstrap data decoded, the
pod's log, the asset metadata, the MLflow runs, and the resource config Dagster shows in the UI.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import test_mlflow
from conftest import free_port, stop_process, wait_for_port
from dagster import (
    AssetSelection,
    DagsterInstance,
    Definitions,
    MaterializeResult,
    asset,
    instance_for_test,
    materialize,
    serialize_value,
)

from assets import ALL_ASSETS, ALL_CHECKS
from blip_core.config import TrainConfig
from resources.launcher import K8sLauncher, LocalLauncher, TrainingLauncher, launcher_from_env
from resources.mlflow_tracking import MlflowResource
from resources.storage import LocalStorage

empty_store = test_mlflow.empty_store  # a migrated SQLite store to copy (shared fixture)
ROOT = Path(__file__).resolve().parents[1]
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")
TINY = {"max_steps": 2, "batch_size": 8, "warmup_steps": 1}


def plant_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Unique random values for the secret variables (set in this process's environment)."""
    values = {name: f"{name.lower()}-{secrets.token_hex(12)}" for name in SECRET_VARS}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    values["tracking URI password"] = f"uri-pw-{secrets.token_hex(12)}"
    return values


def leaks(planted: Mapping[str, str], texts: Mapping[str, str], roots: Iterable[Path] = ()) -> list[str]:
    """``secret name -> where`` for every planted value found in a text or a file under ``roots``."""
    files = [p for root in roots for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
    contents = {str(p): p.read_bytes() for p in files}
    found = []
    for name, value in planted.items():
        found += [f"{name} in {where}" for where, text in texts.items() if value in text]
        found += [f"{name} in {path}" for path, data in contents.items() if value.encode() in data]
    return found


def run_events(instance: DagsterInstance, *results: Any) -> dict[str, str]:
    """Every event of the runs (logs, metadata, errors), serialized as Dagster stores it."""
    return {f"event log of {r.run_id[:8]}": "\n".join(serialize_value(e) for e in instance.all_logs(r.run_id))
            for r in results}


def dagster_instance(folder: Path) -> Any:
    """A Dagster instance whose event log and captured logs are files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return instance_for_test(temp_dir=str(folder))


def tiny_world(out: Path) -> Path:
    """A world of one web shard (24 pairs) and 16/4/8 human pairs."""
    from blip_core.data.shapes import WorldConfig, generate_world

    generate_world(out, WorldConfig(n_human_train=16, n_human_val=4, n_human_test=8, n_web=24,
                                    shard_size=24))
    return out


class Server:
    """A started process serving on a 127.0.0.1 port; :meth:`url` waits until it listens."""

    def __init__(self, proc: subprocess.Popen, port: int, folder: Path) -> None:
        self.proc, self.port, self.folder = proc, port, folder

    def url(self) -> str:
        wait_for_port(self.port, 180, self.proc)
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Iterator[Server]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artefacts), starting."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(empty_store, folder / "mlflow.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING"))}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    with open(folder / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Server(proc, port, folder)
    finally:
        stop_process(proc)


# --- credentials -----------------------------------------------------------------------------


@pytest.mark.slow  # a Pipes training subprocess and a real MLflow server: about a minute
def test_a_lineage_run_leaks_no_credential(mlflow_server: Server, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capfd: pytest.CaptureFixture[str]):
    """web_shards, human_pairs and pretrained_med (trained in a Pipes subprocess), tracked on a
    real MLflow server reached through ``http://blip:PASSWORD@...``."""
    from mlflow.tracking import MlflowClient

    from orchestration.definitions import build_resources
    from orchestration.main import register_shards

    planted = plant_secrets(monkeypatch)
    storage = LocalStorage(root=str(tmp_path / "data"))
    storage.publish_dir(tiny_world(tmp_path / "world"), "landing")
    resources = build_resources(storage, str(tmp_path / "data"),
                                launcher=LocalLauncher(mode="subprocess", cwd=str(ROOT)), dvc_push=False)
    defs = [*ALL_ASSETS, *ALL_CHECKS]
    with dagster_instance(tmp_path / "dagster") as instance:
        [shard] = register_shards(instance, storage)
        web = materialize(defs, selection=AssetSelection.assets("web_shards"), partition_key=shard,
                          resources=resources, instance=instance)
        url = mlflow_server.url()  # started meanwhile: the web shard does not track anything
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "blip")
        monkeypatch.setenv("MLFLOW_TRACKING_URI",
                           url.replace("http://", f"http://blip:{planted['tracking URI password']}@"))
        trained = materialize(defs, selection=AssetSelection.assets("human_pairs", "pretrained_med"),
                              resources=resources, instance=instance,
                              run_config={"ops": {"pretrained_med": {"config": TINY}}})
        assert web.success and trained.success
        texts = run_events(instance, web, trained)
    meta = trained.asset_materializations_for_node("pretrained_med")[0].metadata
    assert meta["mlflow_tracking_uri"].value == url.replace("http://", "http://blip:***@")

    client = MlflowClient(url)  # what anyone browsing the server sees
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trained_run = next(r for r in runs if r.data.tags.get("dagster_asset") == "pretrained_med")
    assert trained_run.data.params["max_steps"] == "2"  # the config was logged ...
    assert client.list_artifacts(trained_run.info.run_id, "")  # ... with config.json and the model
    texts["MLflow runs"] = json.dumps([r.to_dictionary() for r in runs], default=str)
    texts["MLflow models"] = repr([(m, client.search_model_versions(f"name = '{m.name}'"))
                                   for m in client.search_registered_models()])
    texts["asset metadata"] = serialize_value(
        [m for r in (web, trained) for m in r.get_asset_materialization_events()])
    texts["resources"] = repr(resources) + "".join(r.model_dump_json() for r in resources.values())
    out, err = capfd.readouterr()
    texts["stdout"], texts["stderr"] = out, err
    found = leaks(planted, texts, roots=[tmp_path, mlflow_server.folder])
    assert not found, found
    print(f"lineage run: {len(runs)} MLflow runs, {sum(len(t) for t in texts.values())} characters and "
          f"{sum(1 for p in tmp_path.rglob('*') if p.is_file())} files searched for {len(planted)} secrets: "
          "0 found")


def test_an_unreachable_tracking_server_error_hides_its_password(tmp_path: Path):
    password = f"uri-pw-{secrets.token_hex(12)}"
    store = MlflowResource(tracking_uri=f"http://blip:{password}@127.0.0.1:{free_port()}",
                           connect_timeout_s=2)

    @asset
    def pretrained_med(mlflow: MlflowResource) -> None:
        return None

    with dagster_instance(tmp_path / "dagster") as instance:
        result = materialize([pretrained_med], resources={"mlflow": store}, instance=instance,
                             raise_on_error=False)
        texts = run_events(instance, result)
    assert not result.success and "http://blip:***@127.0.0.1" in texts[next(iter(texts))]
    found = leaks({"password": password}, texts, roots=[tmp_path])
    assert not found, found


def _decoded_pipes_env(pod: dict[str, Any]) -> str:
    """The Pipes bootstrap variables of a pod (base64 + zlib: a plain search would miss them)."""
    from dagster_pipes import decode_env_var

    env = pod["spec"]["containers"][0]["env"]
    return json.dumps([decode_env_var(e["value"]) for e in env if e["name"].startswith("DAGSTER_PIPES_")])


@pytest.mark.slow  # a torchrun training in a (fake) pod
def test_a_k8s_run_carries_credentials_only_by_reference(tmp_path: Path, s3_env: str,
                                                         monkeypatch: pytest.MonkeyPatch):
    """The launcher chosen by the environment runs a pod (fake API, real command) with S3 data.

    Neither the launching process's credentials nor the cluster Secret's values appear in the pod
    body, the pod's log or the run's events: the pod gets them by secretKeyRef only.
    """
    import boto3
    import dagster_k8s.pipes as k8s_pipes
    from kubernetes.client import ApiClient
    from test_launcher import _FakeCoreApi, _FakeK8sClient

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="blip-sec")
    world = tiny_world(tmp_path / "world")
    for path in sorted(world.rglob("*")):
        if path.is_file() and path.relative_to(world).parts[0] in ("web", "human"):
            s3.upload_file(str(path), "blip-sec", path.relative_to(world).as_posix())
    planted = plant_secrets(monkeypatch)  # the launching process's own credentials
    in_cluster = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": f"pod-{secrets.token_hex(12)}",
                  "AWS_SESSION_TOKEN": f"pod-token-{secrets.token_hex(12)}"}
    api = _FakeCoreApi({"blip-s3": in_cluster}, tmp_path)
    monkeypatch.setattr(k8s_pipes.PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(k8s_pipes.DagsterKubernetesClient, "production_client",
                        staticmethod(lambda *a, **k: _FakeK8sClient(api)))
    for key, value in {"BLIP_OPS_LAUNCHER": "k8s", "BLIP_OPS_K8S_IMAGE": "blip-ops:test",
                       "BLIP_OPS_K8S_AWS_SECRET": "blip-s3", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    launcher = launcher_from_env()
    assert isinstance(launcher, K8sLauncher)
    cfg = TrainConfig(data=("s3://blip-sec/web", "s3://blip-sec/human/annotations.json:train"),
                      out="s3://blip-sec/models/pretrained_med", log_every=1, save_every=100, **TINY)

    @asset
    def pretrained_med(context, launcher: TrainingLauncher) -> MaterializeResult:
        return MaterializeResult(metadata=launcher.train(context, cfg).metadata)

    with dagster_instance(tmp_path / "dagster") as instance:
        result = materialize([pretrained_med], resources={"launcher": launcher}, instance=instance)
        texts = run_events(instance, result)
    assert result.success
    [body] = api.pods.values()
    pod = ApiClient().sanitize_for_serialization(body)
    texts["pod body"] = json.dumps(pod)
    texts["pod Pipes bootstrap (decoded)"] = _decoded_pipes_env(pod)
    texts["pod log"] = b"".join(b"".join(lines) for lines in api.logs.values()).decode(errors="replace")
    texts["metadata"] = serialize_value(result.get_asset_materialization_events())
    credentials = {**planted, "cluster secret key": in_cluster["AWS_SECRET_ACCESS_KEY"],
                   "cluster session token": in_cluster["AWS_SESSION_TOKEN"]}
    found = leaks(credentials, texts, roots=[tmp_path / "dagster"])
    assert not found, found
    env = pod["spec"]["containers"][0]["env"]
    by_reference = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert set(by_reference) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert all(ref["name"] == "blip-s3" for ref in by_reference.values())
    from resources.launcher import SECRET_ENV

    assert not [e["name"] for e in env if SECRET_ENV.search(e["name"]) and "value" in e]
    assert "step 2" in texts["pod log"]  # the pod really trained, with the Secret's credentials
    print(f"k8s run: pod env {len(env)} variables, {len(by_reference)} by secretKeyRef, "
          f"{len(credentials)} secrets searched in {len(texts)} texts: 0 found")


def test_launchers_refuse_credentials_in_their_plain_env():
    from resources.launcher import plain_env

    s3_cfg = TrainConfig(data=("s3://b/web",), out="s3://b/out")
    for env in ({"AWS_SECRET_ACCESS_KEY": "x"}, {"HF_TOKEN": "x"}, {"MLFLOW_TRACKING_PASSWORD": "x"},
                {"MLFLOW_TRACKING_URI": "https://blip:hunter2@mlflow.internal"}):
        name = next(iter(env))
        with pytest.raises(ValueError, match=name) as k8s:
            K8sLauncher(image="blip-ops:1", env=env).pod_spec(s3_cfg)
        assert "hunter2" not in str(k8s.value)  # the error names the variable, not its value
        with pytest.raises(ValueError, match=name):
            LocalLauncher(mode="subprocess", env=env).train(None, s3_cfg)
    fine = {"TOKENIZERS_PARALLELISM": "false", "NCCL_DEBUG": "WARN",
            "MLFLOW_TRACKING_URI": "https://mlflow.internal"}
    assert plain_env(fine) == fine
    env = K8sLauncher(image="blip-ops:1", env=fine).pod_spec(s3_cfg)["containers"][0]["env"]
    assert {"name": "TOKENIZERS_PARALLELISM", "value": "false"} in env


def test_resources_from_the_environment_hold_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """S3 storage, MLflow and the Kubernetes launcher built from an environment full of secrets:
    their repr, their config, and the resource config Dagster sends to the UI."""
    from dagster._core.remote_representation.external_data import RepositorySnap

    from orchestration.definitions import build_resources
    from resources.storage import storage_from_env

    planted = plant_secrets(monkeypatch)
    for key, value in {"BLIP_OPS_STORAGE": "s3", "BLIP_OPS_S3_BUCKET": "blip-bucket",
                       "AWS_ACCESS_KEY_ID": "AKIA-not-a-secret", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                       "BLIP_OPS_LAUNCHER": "k8s", "BLIP_OPS_K8S_IMAGE": "blip-ops:1",
                       "BLIP_OPS_K8S_AWS_SECRET": "blip-s3", "MLFLOW_TRACKING_URI":
                       f"http://blip:{planted['tracking URI password']}@mlflow:5000"}.items():
        monkeypatch.setenv(key, value)
    storage = storage_from_env()
    assert storage.client.meta.endpoint_url == "http://127.0.0.1:9"  # the boto3 client holds the keys
    resources = build_resources(storage, str(tmp_path / "data"))  # the deployment's launcher
    assert isinstance(resources["launcher"], K8sLauncher)
    snapshot = serialize_value(RepositorySnap.from_def(
        Definitions(assets=list(ALL_ASSETS), asset_checks=list(ALL_CHECKS), resources=resources)
        .get_repository_def()))
    assert "blip-bucket" in snapshot and "blip-s3" in snapshot  # resource config is in there
    texts = {"repr": repr(resources), "str": str(storage), "UI resource config": snapshot,
             "config": json.dumps({k: r.model_dump() for k, r in resources.items()}, default=str)}
    found = leaks(planted, texts)
    assert not found, found


# --- the UI ----------------------------------------------------------------------------------


def test_ui_command_binds_loopback_unless_configured(monkeypatch: pytest.MonkeyPatch):
    from orchestration.ui import dev_command, parse_args

    def host(argv: list[str]) -> str:
        args = parse_args(argv)
        cmd = dev_command(args.port, args.host)
        return cmd[cmd.index("-h") + 1]

    monkeypatch.delenv("BLIP_OPS_UI_HOST", raising=False)
    # Under `make test` this is a sub-make: no "Entering directory" lines, and the line that runs
    # the UI is picked out of the recipe (set-up lines come first).
    printed = subprocess.run(["make", "--no-print-directory", "-n", "ui", "PORT=3123"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    [make] = [line.split() for line in printed if "orchestration.ui" in line.split()]
    assert make[make.index("orchestration.ui") + 1:] == ["--data", "data", "--port", "3123"]
    assert host(make[make.index("orchestration.ui") + 1:]) == "127.0.0.1"  # `make ui`
    assert host([]) == "127.0.0.1"
    monkeypatch.setenv("BLIP_OPS_UI_HOST", "0.0.0.0")
    assert host([]) == "0.0.0.0"
    assert host(["--host", "10.1.2.3"]) == "10.1.2.3"


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by ``pids`` (from /proc)."""
    import ipaddress

    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc writes the address as host-order 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return out


@pytest.mark.slow
def test_ui_listens_on_loopback_only(tmp_path: Path):
    """``python -m orchestration.ui`` (dagster dev: webserver, daemon, code server) opens no
    TCP port outside loopback."""
    import ipaddress

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP_OPS_", "DAGSTER_HOME"))}
    cmd = ["env", "--default-signal=INT,TERM", sys.executable, "-m", "orchestration.ui", "--no-land",
           "--data", str(tmp_path / "data"), "--port", str(port)]
    with open(tmp_path / "ui.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 240, proc)
        time.sleep(2)  # the daemon and code server start beside the webserver
        sockets = _listening(_descendants(proc.pid))
    finally:
        stop_process(proc, timeout=40)
    assert (("127.0.0.1", port)) in sockets
    assert all(ipaddress.ip_address(a).is_loopback for a, _ in sockets), sockets
    print(f"UI process tree listens on {sockets}")

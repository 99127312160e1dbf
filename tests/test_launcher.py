"""Launchers: the pod spec the Kubernetes launcher builds, and Pipes round trips of a tiny run.

No cluster here: the Kubernetes API is the one thing faked (it runs the pod's container command
as a local process and serves its output as the pod log), everything else is real.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dagster import MaterializeResult, asset, materialize

from blip_core.config import TrainConfig
from blip_core.train import build_parser, config_from_args
from resources.launcher import (
    K8sLauncher,
    LocalLauncher,
    TrainingLauncher,
    build_pod_spec,
    train_argv,
    training_command,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(max_steps=2, batch_size=8, warmup_steps=1, log_every=1, save_every=100)


def _k8s(**kw: Any) -> K8sLauncher:
    base = dict(image="registry.example.com/blip-ops:1.0", namespace="ml", service_account="trainer",
                gpus=4, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                aws_secret="blip-s3", s3_endpoint_url="https://minio.example.com", aws_region="eu-west-1")
    return K8sLauncher(**{**base, **kw})


S3_CFG = TrainConfig(task="captioner", data=("s3://bucket/blip/human_pairs:train",),
                     out="s3://bucket/blip/captioner", init_from="s3://bucket/blip/pretrained_med",
                     max_steps=80, lr=1e-4)


def test_train_argv_round_trips_through_blip_core_parser():
    cfg = replace(S3_CFG, precision="bf16", resume=True, image_size=384)
    back = config_from_args(build_parser().parse_args(train_argv(cfg)))
    assert back == replace(cfg, progress=False)


def test_pod_spec_requests_gpus_shm_and_secrets_by_reference():
    launcher = _k8s()
    spec = launcher.pod_spec(S3_CFG)
    [container] = spec["containers"]
    assert container["image"] == "registry.example.com/blip-ops:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert spec["serviceAccountName"] == "trainer" and spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "blip-s3", "key": key, "optional": False}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.example.com"
    cmd = container["command"]
    assert cmd[:4] == ["torchrun", "--nproc-per-node=4", "-m", "resources.pipes_train"]
    assert cmd[cmd.index("--data") + 1] == "s3://bucket/blip/human_pairs:train"
    assert cmd[cmd.index("--out") + 1] == "s3://bucket/blip/captioner"
    assert "init_from=s3://bucket/blip/pretrained_med" in cmd


def test_pod_spec_is_valid_for_the_kubernetes_client():
    from dagster_k8s.pipes import build_pod_body

    launcher = _k8s(image_pull_secrets=["regcred"])
    pod = build_pod_body("blip-train-abc", None, None, {"DAGSTER_PIPES_CONTEXT": "x"},
                         {"labels": {"app": "blip"}}, launcher.pod_spec(S3_CFG))
    container = pod.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "4"
    assert pod.spec.volumes[0].empty_dir.medium == "Memory"
    assert pod.spec.image_pull_secrets[0].name == "regcred"
    assert any(e.value_from and e.value_from.secret_key_ref.name == "blip-s3" for e in container.env)


def test_pods_cannot_read_local_paths():
    with pytest.raises(ValueError, match="local paths"):
        _k8s().pod_spec(replace(S3_CFG, out="/data/captioner"))


def test_same_command_line_for_every_launcher():
    cfg = replace(S3_CFG, max_steps=3)
    local = LocalLauncher(mode="subprocess").command(cfg)
    k8s = build_pod_spec(training_command(cfg, 4, torchrun=True), _k8s())["containers"][0]["command"]
    module = "resources.pipes_train"
    assert local[local.index(module) + 1:] == k8s[k8s.index(module) + 1:]


def _train_asset(cfg: TrainConfig, seen: list) -> Any:
    @asset
    def pretrained_med(context, launcher: TrainingLauncher) -> MaterializeResult:
        result = launcher.train(context, cfg, on_log=lambda step, row: seen.append((step, row)))
        return MaterializeResult(metadata={**result.metadata, "history_rows": len(result.history)})

    return pretrained_med


@pytest.mark.slow  # a Pipes training subprocess
def test_local_subprocess_pipes_round_trip(tiny_world: Path, tmp_path: Path):
    cfg = TrainConfig(data=(str(tiny_world / "web"),), out=str(tmp_path / "ckpt"), **TINY)
    seen: list = []
    result = materialize([_train_asset(cfg, seen)],
                         resources={"launcher": LocalLauncher(mode="subprocess", cwd=str(ROOT))})
    assert result.success
    assert [step for step, _ in seen] == [1, 2]
    assert {"itc", "itm", "lm", "lr"} <= set(seen[-1][1])
    meta = result.asset_materializations_for_node("pretrained_med")[0].metadata
    assert meta["checkpoint"].value == str(tmp_path / "ckpt") and meta["steps"].value == 2
    assert meta["history_rows"].value == 2 and "final_lm" in meta
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


# --- Kubernetes with a fake API -------------------------------------------------------------


class _FakeCoreApi:
    """The part of CoreV1Api that PipesK8sClient uses; a pod is a local process."""

    def __init__(self, secrets: dict[str, dict[str, str]], workdir: Path) -> None:
        self.secrets, self.workdir = secrets, workdir
        self.pods: dict[str, Any] = {}
        self.logs: dict[str, list[bytes]] = {}
        self.deleted: list[str] = []
        self.returncode: dict[str, int] = {}

    def _env(self, container: Any) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.workdir), "PYTHONPATH": str(ROOT)}
        for var in container.env:
            if var.value_from is not None:
                ref = var.value_from.secret_key_ref
                secret = self.secrets.get(ref.name, {})
                if ref.key not in secret:
                    if ref.optional:
                        continue
                    raise RuntimeError(f"CreateContainerConfigError: secret {ref.name}/{ref.key}")
                env[var.name] = secret[ref.key]
            else:
                env[var.name] = var.value
        return env

    def create_namespaced_pod(self, namespace: str, body: Any) -> None:
        name = body.metadata.name
        self.pods[name] = body
        container = body.spec.containers[0]
        command = list(container.command)
        if command[0] == "torchrun":  # the image's torchrun is this interpreter's
            command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
        env = self._env(container)
        env["BLIP_OPS_STAGE_DIR"] = str(self.workdir / "stage")  # /scratch in the pod
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=600)
        self.returncode[name] = proc.returncode
        start = dt.datetime.now(dt.UTC)
        lines = (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
        self.logs[name] = [  # one distinct timestamp per line, as the kubelet writes them
            f"{(start + dt.timedelta(microseconds=i)).strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {line}\n".encode()
            for i, line in enumerate(lines)]

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> Any:
        return iter(self.logs[name])

    def delete_namespaced_pod(self, name: str, namespace: str) -> None:
        self.deleted.append(name)


class _FakeK8sClient:
    def __init__(self, core_api: _FakeCoreApi) -> None:
        self.core_api = core_api

    def wait_for_pod(self, pod_name: str, namespace: str, wait_for_state: Any, **kw: Any) -> None:
        code = self.core_api.returncode[pod_name]
        if code != 0 and wait_for_state.name == "Terminated":
            raise RuntimeError(f"pod {pod_name} failed with exit code {code}:\n"
                               + b"".join(self.core_api.logs[pod_name][-20:]).decode())


@pytest.mark.slow  # a torchrun training in a (fake) pod
def test_k8s_launcher_pipes_round_trip_with_s3_data(tiny_world: Path, tmp_path: Path, s3_env: str,
                                                    monkeypatch: pytest.MonkeyPatch):
    import boto3
    import dagster_k8s.pipes as k8s_pipes

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="blip-k8s")
    shard = sorted((tiny_world / "web").glob("*.tar"))[0]
    s3.upload_file(str(shard), "blip-k8s", f"web/{shard.name}")
    human = tiny_world / "human"
    for path in human.rglob("*"):  # annotations.json and the images beside it
        if path.is_file():
            s3.upload_file(str(path), "blip-k8s", f"human/{path.relative_to(human).as_posix()}")
    api = _FakeCoreApi({"blip-s3": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}},
                       tmp_path)
    monkeypatch.setattr(k8s_pipes.PipesK8sClient, "_load_k8s_config", lambda self: None)
    monkeypatch.setattr(k8s_pipes.DagsterKubernetesClient, "production_client",
                        staticmethod(lambda *a, **k: _FakeK8sClient(api)))

    cfg = TrainConfig(data=("s3://blip-k8s/web", "s3://blip-k8s/human/annotations.json:train"),
                      out="s3://blip-k8s/models/pretrained_med", **TINY)
    launcher = K8sLauncher(image="blip-ops:test", gpus=1, aws_secret="blip-s3", s3_endpoint_url=s3_env,
                           aws_region="us-east-1", env={"OMP_NUM_THREADS": "1"})
    seen: list = []
    result = materialize([_train_asset(cfg, seen)], resources={"launcher": launcher})
    assert result.success
    [pod] = api.pods.values()
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert api.deleted == [pod.metadata.name]
    assert [step for step, _ in seen] == [1, 2]
    meta = result.asset_materializations_for_node("pretrained_med")[0].metadata
    assert meta["checkpoint"].value == "s3://blip-k8s/models/pretrained_med"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="blip-k8s", Prefix="models/")["Contents"]}
    assert {"models/pretrained_med/model.safetensors", "models/pretrained_med/config.json"} <= keys
    assert not any("trainer_state" in k for k in keys)  # the model, not the optimizer state
    secret_values = json.dumps([e.to_dict() for e in pod.spec.containers[0].env])
    assert "testing" not in secret_values  # credentials reached the pod only by reference


def test_launcher_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from resources.launcher import launcher_from_env

    monkeypatch.delenv("BLIP_OPS_LAUNCHER", raising=False)
    assert isinstance(launcher_from_env(), LocalLauncher) and launcher_from_env().mode == "inprocess"
    monkeypatch.setenv("BLIP_OPS_LAUNCHER", "k8s")
    with pytest.raises(ValueError, match="BLIP_OPS_K8S_IMAGE"):
        launcher_from_env()
    monkeypatch.setenv("BLIP_OPS_K8S_IMAGE", "blip-ops:1")
    monkeypatch.setenv("BLIP_OPS_K8S_GPUS", "8")
    monkeypatch.setenv("BLIP_OPS_K8S_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("BLIP_OPS_K8S_SERVICE_ACCOUNT", "blip-trainer")
    k8s = launcher_from_env()
    assert isinstance(k8s, K8sLauncher) and k8s.gpus == 8 and k8s.node_selector == {"pool": "gpu"}
    # The deployment's resources (what ``defs`` uses) read the same settings, service account included.
    from orchestration.definitions import build_resources
    from resources.storage import LocalStorage

    deployed = build_resources(LocalStorage(root=str(tmp_path)), str(tmp_path))["launcher"]
    assert deployed == k8s and deployed.service_account == "blip-trainer"


def test_multinode_manifest_runs_the_launcher_command():
    import yaml

    manifest = ROOT / "orchestration" / "k8s" / "multinode-indexed-job.yaml"
    docs = list(yaml.safe_load_all(manifest.read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[0] == "torchrun" and "--nnodes=2" in command
    assert job["spec"]["completionMode"] == "Indexed"
    argv = command[command.index("resources.pipes_train") + 1:]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.task == "pretrain" and cfg.out.startswith("s3://") and cfg.precision == "bf16"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert all("value" not in e for e in container["env"] if e["name"].startswith("AWS_"))

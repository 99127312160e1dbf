"""Where training runs: one interface, a local and a Kubernetes implementation.

Every launcher runs the same command line (:func:`training_command`):
``[torchrun --nproc-per-node N] -m resources.pipes_train --task T --data ... --out ... K=V``

- :class:`LocalLauncher` ``mode="inprocess"`` calls :func:`blip_core.train.train` in the step's
  process (the embedded default); ``mode="subprocess"`` runs the command through
  ``dagster.PipesSubprocessClient`` (``torchrun`` when ``nproc_per_node > 1``).
- :class:`K8sLauncher` runs it as a pod through ``dagster_k8s.PipesK8sClient``: GPUs, image,
  namespace, service account, node selector, tolerations, a memory-backed ``/dev/shm``, AWS
  credentials from a Secret (never inlined), ``torchrun`` across the pod's GPUs, data on S3.

Credentials never appear in a launcher's configuration: a local subprocess inherits them from
the environment (the standard chains), a pod reads them from a Secret by reference. ``env``
holds plain settings only; a secret-looking name or a URI with a password in it is refused.

Metrics come back as Pipes messages (per-step rows) and the materialisation as Pipes
materialisation metadata; both land in :class:`LaunchResult`. Per-step rows of a Pipes launch
are replayed into ``on_log`` (so into MLflow, with their step numbers) when the process ends;
they also appear live as Dagster log lines.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dagster import ConfigurableResource, PipesSubprocessClient
from pydantic import Field

from blip_core.config import TrainConfig
from resources.pipes_train import METRICS_MESSAGE
from resources.redaction import redact_uri

LogFn = Callable[[int, dict[str, float]], None]
TRAIN_MODULE = "resources.pipes_train"
SHM_VOLUME = "dshm"
AWS_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_ENV = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIALS?|PRIVATE|ACCESS_KEY|API_KEY)(_|$)",
                        re.IGNORECASE)
"""Names of environment variables that hold credentials (``TOKENIZERS_PARALLELISM`` does not)."""


@dataclass
class LaunchResult:
    """What a launched training run reported."""

    checkpoint: str  # model folder (local path or s3:// URI)
    steps: int  # optimizer steps
    seconds: float  # wall time of the training process
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log step
    metadata: dict[str, Any] = field(default_factory=dict)  # materialisation metadata

    @property
    def final_metrics(self) -> dict[str, float]:
        return dict(self.history[-1]) if self.history else {}


def train_argv(cfg: TrainConfig) -> list[str]:
    """``cfg`` as arguments of ``blip-core pretrain``/``finetune`` (``--task`` first).

    Data, output and checkpoint are flags; every other field that differs from what the command
    starts from (the recipe's stage, :func:`blip_core.train.recipe_train_config`) is a ``key=value``
    override, so the command is short and reproduces ``cfg`` exactly.
    """
    from blip_core.train import recipe_train_config

    argv = ["--task", cfg.task, "--out", cfg.out, "--no-progress"]
    defaults = recipe_train_config(cfg.task)
    for f in fields(TrainConfig):
        if f.name in ("task", "data", "out", "progress"):
            continue
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            argv.append(f"{f.name}={'none' if value is None else value}")
    return argv + (["--data", *cfg.data] if cfg.data else [])  # last: --data takes the rest


def plain_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` if it holds no credentials, else ValueError naming the variable (not its value)."""
    for key, value in env.items():
        if SECRET_ENV.search(key) or redact_uri(value) != value:
            raise ValueError(f"launcher env {key!r} looks like a credential: it would be stored in "
                             "the resource config (and a pod spec) in clear; leave it in the "
                             "environment (local) or reference a Secret (aws_secret, Kubernetes)")
    return dict(env)


def training_command(cfg: TrainConfig, nproc_per_node: int | str = 1, python: str = "python",
                     torchrun: bool | None = None) -> list[str]:
    """The one command every launcher runs.

    Args:
        nproc_per_node: processes (GPUs) per node; ``"gpu"`` lets torchrun count them.
        python: interpreter used when torchrun is not.
        torchrun: force / forbid torchrun; default: only for more than one process.
    """
    use_torchrun = torchrun if torchrun is not None else nproc_per_node != 1
    head = (["torchrun", f"--nproc-per-node={nproc_per_node}", "-m", TRAIN_MODULE] if use_torchrun
            else [python, "-m", TRAIN_MODULE])
    return [*head, *train_argv(cfg)]


def _collect(invocation: Any, cfg: TrainConfig, on_log: LogFn | None) -> LaunchResult:
    history: list[dict[str, float]] = []
    for message in invocation.get_custom_messages():
        if isinstance(message, Mapping) and message.get("kind") == METRICS_MESSAGE:
            row = dict(message["metrics"])
            history.append(row)
            if on_log is not None:
                on_log(int(message["step"]), row)
    results = invocation.get_results()
    if not results:
        raise RuntimeError("the training process reported no materialisation through Pipes")
    metadata = {k: getattr(v, "value", v) for k, v in (results[-1].metadata or {}).items()}
    return LaunchResult(checkpoint=str(metadata.get("checkpoint", cfg.out)),
                        steps=int(metadata.get("steps", 0)),
                        seconds=float(metadata.get("train_seconds", 0.0)),
                        history=history, metadata=metadata)


class TrainingLauncher(ConfigurableResource):
    """Interface of the launchers: ``train(context, cfg, on_log) -> LaunchResult``."""

    def train(self, context: Any, cfg: TrainConfig, on_log: LogFn | None = None) -> LaunchResult:
        raise NotImplementedError


class LocalLauncher(TrainingLauncher):
    """Train on this machine: in the step's process, or as a Pipes subprocess (torchrun)."""

    mode: Literal["inprocess", "subprocess"] = "inprocess"  # subprocess: through Dagster Pipes
    nproc_per_node: int = 1  # processes per node (subprocess mode; >1 uses torchrun)
    python: str = ""  # interpreter of the subprocess ("" -> this one)
    env: dict[str, str] = Field(default_factory=dict)  # extra environment of the subprocess
    cwd: str = ""  # working directory of the subprocess ("" -> the current one)

    def command(self, cfg: TrainConfig) -> list[str]:
        python = self.python or sys.executable
        if self.nproc_per_node > 1:  # torchrun of this interpreter's environment
            return [python, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc_per_node}",
                    "-m", TRAIN_MODULE, *train_argv(cfg)]
        return training_command(cfg, 1, python=python)

    def train(self, context: Any, cfg: TrainConfig, on_log: LogFn | None = None) -> LaunchResult:
        if self.mode == "inprocess":
            from blip_core.train import train

            result = train(cfg, on_log=on_log)
            return LaunchResult(checkpoint=result.checkpoint, steps=result.steps,
                                seconds=result.seconds, history=result.history,
                                metadata={"checkpoint": result.checkpoint, "steps": result.steps})
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **plain_env(self.env)}
        client = PipesSubprocessClient(env=env, cwd=self.cwd or os.getcwd())
        invocation = client.run(context=context, command=self.command(cfg))
        return _collect(invocation, cfg, on_log)


class K8sLauncher(TrainingLauncher):
    """Train as a Kubernetes pod with GPUs, through ``dagster_k8s.PipesK8sClient``."""

    image: str  # container image holding this repository (see orchestration/k8s/Dockerfile)
    namespace: str = "blip"  # where pods run
    service_account: str = "blip-trainer"  # pod identity (e.g. IRSA / workload identity for S3)
    gpus: int = 1  # nvidia.com/gpu limit; torchrun starts one process per GPU
    cpu: str = "8"  # CPU request and limit
    memory: str = "64Gi"  # memory request and limit
    shm_size: str = "16Gi"  # size of the memory-backed /dev/shm (DataLoader workers, NCCL)
    node_selector: dict[str, str] = Field(default_factory=dict)  # e.g. {"nvidia.com/gpu.product": ...}
    tolerations: list[dict[str, str]] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    aws_secret: str = ""  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ("" -> none)
    s3_endpoint_url: str = ""  # S3-compatible endpoint (MinIO); not a secret
    aws_region: str = ""  # AWS_DEFAULT_REGION
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)  # extra plain (non-secret) variables
    kubeconfig_file: str = ""  # "" -> in-cluster config when there, else ~/.kube/config
    pod_wait_timeout_s: float = 86400.0

    def command(self, cfg: TrainConfig) -> list[str]:
        local = [p for p in (*cfg.data, cfg.out, cfg.init_from or "s3://") if not p.startswith("s3://")]
        if local:
            raise ValueError(f"a Kubernetes pod cannot read local paths {local}: use S3 storage "
                             "(s3:// data, --out and --init-from)")
        return training_command(cfg, self.gpus, torchrun=True)

    def pod_spec(self, cfg: TrainConfig) -> dict[str, Any]:
        return build_pod_spec(self.command(cfg), self)

    def train(self, context: Any, cfg: TrainConfig, on_log: LogFn | None = None) -> LaunchResult:
        from dagster_k8s import PipesK8sClient

        client = PipesK8sClient(kubeconfig_file=self.kubeconfig_file or None)
        invocation = client.run(
            context=context,
            namespace=self.namespace,
            base_pod_meta={"labels": {"app.kubernetes.io/name": "blip-train",
                                      "blip-ops/task": cfg.task}},
            base_pod_spec=self.pod_spec(cfg),
            pod_wait_timeout=self.pod_wait_timeout_s,
        )
        return _collect(invocation, cfg, on_log)


def build_pod_spec(command: list[str], cfg: K8sLauncher) -> dict[str, Any]:
    """The pod spec of a training run (camelCase, as in a manifest).

    Secrets are referenced (``secretKeyRef``), never inlined; the Pipes bootstrap variables are
    added to the first container by ``PipesK8sClient``.
    """
    env: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": "1"},
                                 {"name": "BLIP_OPS_STAGE_DIR", "value": "/scratch/stage"},
                                 {"name": "HF_HUB_OFFLINE", "value": "1"},
                                 {"name": "TRANSFORMERS_OFFLINE", "value": "1"}]
    if cfg.aws_secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {
            "name": cfg.aws_secret, "key": key, "optional": key == "AWS_SESSION_TOKEN"}}}
            for key in AWS_SECRET_KEYS]
    if cfg.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cfg.s3_endpoint_url})
    if cfg.aws_region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": cfg.aws_region})
    env += [{"name": k, "value": v} for k, v in sorted(plain_env(cfg.env).items())]
    resources = {"nvidia.com/gpu": str(cfg.gpus), "cpu": cfg.cpu, "memory": cfg.memory}
    container = {
        "name": "train",
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": command,
        "env": env,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"},
                         {"name": "scratch", "mountPath": "/scratch"}],
    }
    spec: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
                    {"name": "scratch", "emptyDir": {}}],
        "nodeSelector": dict(cfg.node_selector),
        "tolerations": [dict(t) for t in cfg.tolerations],
    }
    if cfg.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in cfg.image_pull_secrets]
    return spec


def launcher_from_env() -> TrainingLauncher:
    """The launcher a deployment asks for through the environment.

    ``BLIP_OPS_LAUNCHER``: ``inprocess`` (default), ``subprocess`` (Pipes; ``BLIP_OPS_NPROC``
    processes) or ``k8s`` (``BLIP_OPS_K8S_IMAGE`` required; ``BLIP_OPS_K8S_NAMESPACE``,
    ``BLIP_OPS_K8S_SERVICE_ACCOUNT``, ``BLIP_OPS_K8S_GPUS``, ``BLIP_OPS_K8S_AWS_SECRET``,
    ``AWS_ENDPOINT_URL``, ``AWS_REGION``; node selector and tolerations as JSON in
    ``BLIP_OPS_K8S_NODE_SELECTOR`` / ``BLIP_OPS_K8S_TOLERATIONS``).
    """
    import json

    kind = os.environ.get("BLIP_OPS_LAUNCHER", "inprocess").lower()
    if kind in ("inprocess", "local"):
        return LocalLauncher()
    if kind == "subprocess":
        nproc = int(os.environ.get("BLIP_OPS_NPROC", "1"))
        return LocalLauncher(mode="subprocess", nproc_per_node=nproc)
    if kind != "k8s":
        raise ValueError(f"BLIP_OPS_LAUNCHER={kind!r}: choose inprocess, subprocess or k8s")
    image = os.environ.get("BLIP_OPS_K8S_IMAGE")
    if not image:
        raise ValueError("BLIP_OPS_LAUNCHER=k8s needs BLIP_OPS_K8S_IMAGE (an image of this repository)")
    optional: dict[str, Any] = {
        "namespace": os.environ.get("BLIP_OPS_K8S_NAMESPACE"),
        "service_account": os.environ.get("BLIP_OPS_K8S_SERVICE_ACCOUNT"),
        "aws_secret": os.environ.get("BLIP_OPS_K8S_AWS_SECRET"),
        "s3_endpoint_url": os.environ.get("AWS_ENDPOINT_URL"),
        "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    }
    if os.environ.get("BLIP_OPS_K8S_GPUS"):
        optional["gpus"] = int(os.environ["BLIP_OPS_K8S_GPUS"])
    for key, var in (("node_selector", "BLIP_OPS_K8S_NODE_SELECTOR"),
                     ("tolerations", "BLIP_OPS_K8S_TOLERATIONS")):
        if os.environ.get(var):
            optional[key] = json.loads(os.environ[var])
    return K8sLauncher(image=image, **{k: v for k, v in optional.items() if v is not None})

"""The Dagster definitions: :func:`defs`, which ``dagster dev -m orchestration.definitions`` loads.

Importing the module builds no resource: :func:`defs` (``@dagster.definitions``) reads the
environment when Dagster loads it. Resources are chosen per deployment through the environment
(:func:`resources_from_env`):

- storage (``resources.storage.storage_from_env``): the local ``data/`` folder by default
  (``BLIP_OPS_DATA``), S3 with ``BLIP_OPS_STORAGE=s3`` (``BLIP_OPS_S3_BUCKET``, ``BLIP_OPS_S3_PREFIX``,
  ``AWS_ENDPOINT_URL``; credentials from the standard AWS chain only);
- MLflow: the embedded SQLite store under the data folder, or ``MLFLOW_TRACKING_URI``;
- DVC: the data folder is the DVC repository; its remote is ``DATA/dvc-remote`` locally, or
  ``s3://BUCKET/PREFIX/dvc-remote`` with S3 storage (``BLIP_OPS_DVC_REMOTE`` overrides);
- launcher: in-process training by default; ``BLIP_OPS_LAUNCHER=subprocess`` (Dagster Pipes,
  ``torchrun`` with ``BLIP_OPS_NPROC`` > 1) or ``k8s`` (``BLIP_OPS_K8S_IMAGE``, ``BLIP_OPS_K8S_GPUS``;
  needs S3 storage).

Extend the deployment through :func:`build_resources`, :data:`jobs`, :data:`schedules` and
:data:`sensors`.
"""

import os
from typing import Any

from dagster import AssetSelection, Definitions, define_asset_job, definitions, in_process_executor

from assets import ALL_ASSETS, ALL_CHECKS
from assets.checks import ShardPolicy
from assets.keys import IO_MANAGER_KEY
from orchestration.schedules import retrain_schedule
from orchestration.sensors import landing_sensor
from resources.dvc import DvcResource
from resources.launcher import TrainingLauncher, launcher_from_env
from resources.mlflow_tracking import MlflowResource
from resources.storage import DatasetIOManager, S3Storage, StorageResource, storage_from_env


def build_resources(storage: StorageResource, data_dir: str,
                    launcher: TrainingLauncher | None = None, dvc_push: bool = True) -> dict[str, Any]:
    """Every resource the assets need, over one storage and one data folder.

    Args:
        storage: Where datasets live.
        data_dir: Local data folder: DVC repository, embedded MLflow store.
        launcher: How training runs (default: :func:`launcher_from_env`).
        dvc_push: Push versioned datasets to the DVC remote.
    """
    remote = os.environ.get("BLIP_OPS_DVC_REMOTE", "")
    if not remote and isinstance(storage, S3Storage):
        remote = storage.uri("dvc-remote")
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "") \
        if isinstance(storage, S3Storage) else ""
    return {
        "storage": storage,
        IO_MANAGER_KEY: DatasetIOManager(storage=storage),
        "mlflow": MlflowResource(data_dir=data_dir),
        "dvc": DvcResource(repo_dir=data_dir, remote_url=remote, endpoint_url=endpoint or "", push=dvc_push),
        "launcher": launcher or launcher_from_env(),
        "shard_policy": ShardPolicy(),
    }


def resources_from_env() -> dict[str, Any]:
    """The resources the environment asks for (see the module docstring); the data folder is
    ``$BLIP_OPS_DATA`` (default ``data``)."""
    return build_resources(storage_from_env(), os.environ.get("BLIP_OPS_DATA", "data"))


web_shards_job = define_asset_job(
    "web_shards_job",
    selection=AssetSelection.assets("web_shards"),  # with its checks; one run per partition
    description="Validate one landed web shard (run per partition; the landing sensor starts it).",
)
bootstrap_job = define_asset_job(
    "bootstrap_job",
    selection=AssetSelection.all() - AssetSelection.assets("web_shards"),
    description="Everything downstream of the web shards: pre-train, CapFilt, re-train, evaluate, "
                "promote.",
)

assets: list[Any] = list(ALL_ASSETS)
asset_checks: list[Any] = list(ALL_CHECKS)
jobs: list[Any] = [web_shards_job, bootstrap_job]
schedules: list[Any] = [retrain_schedule]
sensors: list[Any] = [landing_sensor]

@definitions
def defs() -> Definitions:
    """The lineage's assets, checks, jobs, schedules and sensors over :func:`resources_from_env`."""
    return Definitions(
        assets=assets,
        asset_checks=asset_checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources=resources_from_env(),
        executor=in_process_executor,  # one process per run: 2-core machines train one model at a time
    )

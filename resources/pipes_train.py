"""Training behind Dagster Pipes: the process a launcher starts, locally or in a Kubernetes pod.

``python -m resources.pipes_train --task pretrain --data ... --out ... [KEY=VALUE ...]``
takes the arguments of ``blip-core pretrain`` / ``finetune`` (same parser), optionally under
``torchrun``. It calls :func:`blip_core.train.train` (``blip_core`` itself never imports Dagster)
and, on rank 0 of a Pipes session, streams each log row back as a Pipes log line plus a custom
message ``{"step": n, "metrics": {...}}``, then reports the materialisation (checkpoint, steps,
seconds, final losses). Without Pipes it simply trains.

``s3://`` sources, ``--init-from`` and ``--out`` are staged: inputs are downloaded once per node
into ``$BLIP_OPS_STAGE_DIR`` (default ``/tmp/blip-stage``) before training, the checkpoint is uploaded
after it (boto3: credentials from the environment, ``$AWS_ENDPOINT_URL`` for MinIO and the like).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from blip_core.config import TrainConfig
from blip_core.train import TrainResult, build_parser, config_from_args, train

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"
METRICS_MESSAGE = "metrics"


def _split_source(source: str) -> tuple[str, str]:
    """``s3://b/ann.json:train`` -> (``s3://b/ann.json``, ``:train``)."""
    head, sep, tail = source.rpartition(":")
    if sep and head.startswith("s3://") and "/" not in tail:
        return head, f":{tail}"
    return source, ""


def _s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _parse_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def download(uri: str, stage: Path) -> Path:
    """Copy an ``s3://`` object or prefix under ``stage`` once per node; the local path."""
    bucket, key = _parse_s3(uri)
    local = stage / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(key).name
    done = local.parent / ".complete"
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(local.parent / ".lock"):  # one rank downloads, the others wait for it
        if not done.exists():
            s3 = _s3_client()
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{key}/")
            objects = [o["Key"] for page in pages for o in page.get("Contents", [])]
            if objects:  # a prefix ("folder")
                for obj in objects:
                    target = local / obj[len(key) + 1 :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, obj, str(target))
            else:
                s3.download_file(bucket, key, str(local))
            done.touch()
    return local


def upload(folder: Path, uri: str, skip: tuple[str, ...] = ("trainer_state",)) -> None:
    """Copy a local folder to an ``s3://`` prefix (without the ``skip`` sub-folders)."""
    bucket, key = _parse_s3(uri)
    s3 = _s3_client()
    files = [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] not in skip]
    for path in sorted(files):
        s3.upload_file(str(path), bucket, f"{key}/{path.relative_to(folder).as_posix()}")


def stage_in(cfg: TrainConfig, stage: Path) -> tuple[TrainConfig, str | None]:
    """Replace ``s3://`` inputs by local copies and an ``s3://`` output by a local folder.

    Returns:
        The local config and the ``s3://`` URI to upload the checkpoint to (or None).
    """
    data = []
    for source in cfg.data:
        uri, split = _split_source(source)
        if not uri.startswith("s3://"):
            data.append(source)
        elif uri.endswith(".json"):  # annotations: their images sit beside them
            folder, _, name = uri.rpartition("/")
            data.append(f"{download(folder, stage) / name}{split}")
        else:
            data.append(f"{download(uri, stage)}{split}")
    init_from = cfg.init_from
    if init_from and init_from.startswith("s3://"):
        init_from = str(download(init_from, stage))
    upload_to = cfg.out if cfg.out.startswith("s3://") else None
    out = str(stage / "out" / Path(_parse_s3(cfg.out)[1]).name) if upload_to else cfg.out
    return replace(cfg, data=tuple(data), init_from=init_from, out=out), upload_to


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(cfg: TrainConfig, pipes: Any | None = None) -> TrainResult:
    """Stage, train and upload; report through ``pipes`` (a PipesContext) when given."""
    stage = Path(os.environ.get("BLIP_OPS_STAGE_DIR") or Path(tempfile.gettempdir()) / "blip-stage")
    local_cfg, upload_to = stage_in(cfg, stage)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if pipes is None:
            return
        pipes.report_custom_message({"kind": METRICS_MESSAGE, "step": step, "metrics": metrics})
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
        pipes.log.info(f"step {step}: {shown}")

    result = train(local_cfg, on_log=on_log)
    if upload_to and _rank() == 0:
        upload(Path(result.checkpoint), upload_to)
        result = replace(result, checkpoint=upload_to)
    if pipes is not None:
        last = result.history[-1] if result.history else {}
        metadata: dict[str, Any] = {"checkpoint": result.checkpoint, "steps": result.steps,
                                    "train_seconds": round(result.seconds, 3),
                                    "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        metadata.update({f"final_{k}": float(last[k]) for k in ("itc", "itm", "lm", "loss") if k in last})
        if result.resumed_from is not None:
            metadata["resumed_from"] = result.resumed_from
        pipes.report_asset_materialization(metadata=metadata)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``blip-core``'s training arguments and train, inside Pipes when launched by Dagster."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if _rank() != 0 or PIPES_CONTEXT_ENV not in os.environ:
        run(cfg)
        return 0
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        run(cfg, pipes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

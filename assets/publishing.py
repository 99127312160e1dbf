"""How an asset's output is identified, staged, published and reused.

An output's *identity* is what determines it (asset, code version, config, input versions); a
published output made from the same identity is reused instead of made again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from resources.storage import Dataset, StorageResource, dataset_key


@functools.cache
def library_fingerprint() -> str:
    """Content hash of blip_core's Python sources (the code every asset delegates to)."""
    import blip_core

    root = Path(blip_core.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes())
    return h.hexdigest()


def code_version(revision: str) -> str:
    """An asset's code version: its own revision plus blip_core's fingerprint.

    A change to the library the asset wraps then marks it (and what it feeds) stale in Dagster,
    and keeps :func:`reusable` from reusing an output made by other code.
    """
    return f"{revision}+{library_fingerprint()[:12]}"


def publish(storage: StorageResource, asset: str, local: Path, partition: str | None = None,
            exclude: tuple[str, ...] = (), move: bool = True, identity: str | None = None,
            **info: Any) -> Dataset:
    """Publishes a finished local folder as an asset's dataset and returns its reference.

    ``identity`` (see :func:`identity`) and ``info`` go into the completion marker.
    """
    key = dataset_key([asset], partition)
    version = storage.publish_dir(local, key, move=move, exclude=exclude,
                                  info={"identity": identity, **info})
    return Dataset(key=key, uri=storage.uri(key), version=version)


def identity(context: Any, config: Any, inputs: Mapping[str, Dataset | None]) -> str:
    """What determines an asset's output: its key, code version, config and input versions."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    doc = {
        "asset": context.asset_key.to_user_string(),
        "partition": context.partition_key if context.has_partition_key else None,
        "code_version": code_version,
        "config": config.model_dump() if config is not None else None,
        "inputs": {k: (v.version if v is not None else None) for k, v in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def reusable(context: Any, storage: StorageResource, asset: str, ident: str) -> Dataset | None:
    """The asset's published dataset when it was made from exactly ``ident`` (else None).

    Re-materialising with the same code, config and inputs then costs nothing: the output is
    deterministic, so the published one is the answer (and keeps its data version). An asset
    tracked in MLflow (an ``mlflow`` resource) reuses it only if a FINISHED run logged it: one
    published while the store went down is made again (training resumes from its work folder),
    so that its run, metrics and model reach the store.
    """
    key = dataset_key([asset])
    marker = storage.marker(key)
    if marker is None or marker.get("identity") != ident:
        return None
    tracking = getattr(context.resources, "mlflow", None)
    if tracking is not None and not tracking.recorded(asset, str(marker["tree_hash"])):
        context.log.warning(f"{asset}: {storage.uri(key)} has no finished MLflow run (the store was "
                            "unreachable?); materialising it again")
        return None
    context.log.info(f"{asset}: {storage.uri(key)} was made from the same code, config and inputs; "
                     "reusing it")
    return Dataset(key=key, uri=storage.uri(key), version=str(marker["tree_hash"]))


@contextmanager
def staging(storage: StorageResource) -> Iterator[Path]:
    """A temporary local folder (beside the storage's work area) removed afterwards.

    Named after this host and process: those a killed process of this host left are removed here.
    """
    root = storage.scratch_dir("tmp")
    own = f"stage-{socket.gethostname()}-"
    for entry in root.glob(f"{own}*"):
        pid = entry.name[len(own):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{own}{os.getpid()}-", dir=root) as tmp:
        yield Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def read_json(path: Path) -> Any:
    """A JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))

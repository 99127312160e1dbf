"""What every asset shares: storage keys, the landing area, metadata and plot helpers."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import DynamicPartitionsDefinition, MetadataValue

from resources.storage import Dataset, StorageResource, dataset_key

GROUP = "blip"
IO_MANAGER_KEY = "datasets_io"

web_shard_partitions = DynamicPartitionsDefinition(name="web_shards")


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


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)


def dataset_metadata(ds: Dataset, seconds: float) -> dict[str, Any]:
    """Metadata every asset records: where the output is, its content hash, how long it took."""
    location = MetadataValue.url(ds.uri) if ds.uri.startswith("s3://") else MetadataValue.path(ds.uri)
    return {
        "location": location,
        "data_version": MetadataValue.text(ds.version),
        "duration_s": MetadataValue.float(seconds),
    }


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (floats with 4 significant digits)."""
    if not rows:
        return "_(empty)_"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def png_markdown(fig: Any, alt: str) -> str:
    """A matplotlib figure as an inline Markdown image (shown by the Dagster UI)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def png_file_markdown(path: Path, alt: str) -> str:
    """A PNG file as an inline Markdown image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def _figure(width: float = 6.0, height: float = 3.2) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def loss_plot(history: Sequence[Mapping[str, float]], title: str) -> str:
    """Loss curves (every ``itc``/``itm``/``lm`` term logged) as Markdown."""
    fig, ax = _figure()
    steps = [row["step"] for row in history]
    for term in ("loss", "itc", "itm", "lm"):
        if history and term in history[0]:
            marker = "." if len(steps) < 20 else None
            ax.plot(steps, [row[term] for row in history], label=term, marker=marker)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return png_markdown(fig, f"{title} loss")


def bar_plot(values: Mapping[str, float], title: str, ylabel: str, ylim: tuple[float, float] | None = None,
             band: tuple[float, float] | None = None) -> str:
    """A labelled bar chart as Markdown; ``band`` draws the accepted range."""
    fig, ax = _figure(5.0, 3.0)
    names = list(values)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    bars = ax.bar(names, [values[n] for n in names], color=colors[: len(names)])
    ax.bar_label(bars, fmt="%.3g")
    if band is not None:
        ax.axhspan(band[0], band[1], color="green", alpha=0.08, label="accepted band")
        ax.legend(loc="upper right")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return png_markdown(fig, title)


def history_summary(history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """First and last logged value of each loss term."""
    if not history:
        return {}
    terms = [k for k in ("itc", "itm", "lm") if k in history[0]]
    return {
        f"{stage}_{term}": MetadataValue.float(float(row[term]))
        for stage, row in (("first", history[0]), ("final", history[-1]))
        for term in terms
    }


def read_json(path: Path) -> Any:
    """A JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass
class Tools:
    """The resources an asset works with, bundled: storage, MLflow, DVC and the launcher."""

    storage: StorageResource
    mlflow: Any = None  # resources.mlflow_tracking.MlflowResource
    dvc: Any = None  # resources.dvc.DvcResource
    launcher: Any = None  # resources.launcher.TrainingLauncher

    def launcher_is_remote(self) -> bool:
        """Whether training runs elsewhere (a Kubernetes pod) and must read and write S3."""
        from resources.launcher import K8sLauncher
        from resources.storage import S3Storage

        remote = isinstance(self.launcher, K8sLauncher)
        if remote and not isinstance(self.storage, S3Storage):
            raise ValueError("the Kubernetes launcher needs S3 storage (BLIP_OPS_STORAGE=s3)")
        return remote

    def version(self, ds: Dataset) -> dict[str, Any]:
        """Versions a published dataset with DVC; its metadata entries (the DVC hash)."""
        from resources.storage import LocalStorage

        source = self.storage.path(ds.key) if isinstance(self.storage, LocalStorage) else ds.uri
        return self.dvc.version(source, name=ds.key).metadata()

    def dvc_metadata(self, ds: Dataset, reused: bool = False) -> dict[str, Any]:
        """DVC metadata of a dataset: versioned now, or read back when the dataset was reused."""
        if reused and (Path(self.dvc.root) / f"{ds.key}.dvc").is_file():
            return self.dvc.read(f"{ds.key}.dvc", pushed=self.dvc.push).metadata()
        return self.version(ds)

    def dvc_digest(self, ds: Dataset) -> str:
        """The DVC hash recorded for a dataset, else its content hash (models are not in DVC)."""
        dvc_file = Path(self.dvc.root) / f"{ds.key}.dvc"
        if dvc_file.is_file():
            return self.dvc.read(f"{ds.key}.dvc").md5
        return ds.version

"""One asset's MLflow run, :class:`TrackedRun`: parameters, per-step metrics kept back while the
store is unreachable, datasets as run inputs, and checkpoints logged as pyfunc models."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from resources.mlflow_store import health, restored_environ, unavailable_error, unreachable
from resources.redaction import redact, redact_uri

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
MODEL_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
MODEL_REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "transformers", "safetensors",
                      "pillow", "pandas", "numpy", "pyyaml")
FLUSH_RETRY_S = 10.0  # seconds between attempts to send metrics kept back during an outage


def metric_key(name: str) -> str:
    """An MLflow-safe metric / param key: ``tr@1`` -> ``tr_at_1``; other odd characters -> ``_``."""
    return re.sub(r"[^\w.\- :/]", "_", name.replace("@", "_at_"))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested plain data as redacted ``{"a.b": "value"}`` strings (lists comma-joined)."""
    out: dict[str, str] = {}
    for key, value in redact(data).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out[metric_key(name)] = text[:MAX_PARAM_LENGTH]
    return out


def plain(config: Any) -> dict[str, Any]:
    """A dataclass / pydantic config / mapping as JSON-able plain data."""
    if is_dataclass(config) and not isinstance(config, type):
        data = asdict(config)
    elif hasattr(config, "model_dump"):
        data = config.model_dump()
    else:
        data = dict(config)
    return json.loads(json.dumps(data, default=str))


def model_requirements() -> list[str]:
    """Pinned pip requirements of the pyfunc models (pinning skips MLflow's slow inference)."""
    pins = []
    for name in MODEL_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


@dataclass
class TrackedRun:
    """One asset's MLflow run; every method logs to this run by id (no global state needed).

    While the store is unreachable, metrics are kept back (:meth:`log_metrics`) and every other
    call waits for it, with backoff, up to ``outage_wait_s`` (then :class:`MlflowUnavailableError`).
    """

    run_id: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    client: MlflowClient = field(repr=False)
    outage_wait_s: float = 60.0  # how long a call waits for an unreachable store
    pending: list[Metric] = field(default_factory=list, init=False, repr=False)  # not yet sent
    logged_steps: set[int] = field(default_factory=set, init=False, repr=False)  # by log_step
    _next_flush: float = field(default=0.0, init=False, repr=False)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, repeated with backoff while the store is unreachable.

        Raises:
            MlflowUnavailableError: the store stayed unreachable for ``outage_wait_s``.
        """
        start = time.monotonic()
        pause = 1.0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not unreachable(e):
                    raise
                waited = time.monotonic() - start
                if waited + pause > self.outage_wait_s:
                    raise unavailable_error(self.tracking_uri, e, (
                        f"unreachable for {waited:.0f} s; run {self.run_id} is incomplete "
                        f"({len(self.pending)} metric values not logged)")) from None
                time.sleep(pause)
                pause = min(2 * pause, 10.0)

    def answers(self) -> bool:
        """Whether the store answers right now (a tracking server's ``/health``; others: True)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            return health(self.tracking_uri, timeout=2).ok
        except requests.RequestException:
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened, redacted) parameters."""
        items = [Param(k, v) for k, v in flatten(params).items()]
        self.call(self.client.log_batch, self.run_id, params=items)  # sent in MLflow's batch sizes

    def log_config(self, config: Any, name: str = "config.json") -> None:
        """Log a config as parameters and as a JSON artefact."""
        data = plain(config)
        self.log_params(data)
        self.call(self.client.log_dict, self.run_id, redact(data), name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics (non-numbers skipped) at ``step``.

        Never waits for an unreachable store: the values are kept and sent by a later call once
        it answers (tried every :data:`FLUSH_RETRY_S` seconds), at the latest when the run ends.
        """
        now = int(time.time() * 1000)
        self.pending += [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)]
        if time.monotonic() >= self._next_flush:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Sends the metrics kept back.

        Args:
            wait: Wait for an unreachable store (see :meth:`call`); False: try once, and keep
                them when it does not answer.
        """
        if not self.pending:
            return
        if wait:
            self.call(self._send_pending)
            return
        try:
            # Only while the store has been failing is it asked for /health first: when it
            # answers, the send is the check (one request per step, not two).
            if not self._next_flush or self.answers():
                self._send_pending()
                self._next_flush = 0.0
                return
        except Exception as e:
            if not unreachable(e):
                raise
        self._next_flush = time.monotonic() + FLUSH_RETRY_S

    def _send_pending(self) -> None:
        # In MLflow's batch sizes; a batch sent again after a later one failed is stored once.
        self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending.clear()

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """``on_log`` callback of ``blip_core.train.train``: per-step metrics."""
        self.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
        self.logged_steps.add(step)

    def log_history(self, history: Sequence[Mapping[str, float]]) -> None:
        """Logs the rows of a training history (``step`` and its terms) this run has not logged:
        the steps a resumed training ran before a kill, or before an outage failed its first run."""
        for row in history:
            if int(row["step"]) not in self.logged_steps:
                self.log_step(int(row["step"]), row)

    def log_dataset(
        self, name: str, source: str | os.PathLike[str], digest: str, context: str = "training",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Record a dataset the run read, as a run input identified by its DVC hash.

        Args:
            source: local path or ``s3://`` URI of the dataset.
            digest: its DVC md5 (``....dir`` for folders) or another content hash; MLflow keeps
                36 characters, the full value is kept in the ``digest`` input tag.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        uri = str(source)
        if "://" not in uri:
            uri = str(Path(uri).resolve())
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore", UserWarning)
            source_obj = resolve_dataset_source(uri)
        dataset = MetaDataset(source_obj, name=name, digest=digest[:36])
        input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("digest", digest)]
        input_tags += [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        self.call(self.client.log_inputs, self.run_id,
                  datasets=[DatasetInput(dataset._to_mlflow_entity(), input_tags)])

    def log_model(
        self, checkpoint: str | os.PathLike[str], task: str, registered_model_name: str | None = None,
        name: str = "model",
    ) -> ModelInfo:
        """Log a checkpoint folder as a pyfunc model (see :mod:`resources.mlflow_pyfunc`).

        Args:
            task: ``captioner``, ``filter`` or ``med``: which predict() the model offers.
            registered_model_name: also register it as a new version of this registered model.
        """
        from resources.mlflow_pyfunc import signature_for

        sig = signature_for(task)
        with tempfile.TemporaryDirectory(prefix="blip-model-") as tmp:
            weights, code = _stage_model_files(Path(checkpoint), Path(tmp))

            def log() -> ModelInfo:
                with self._active(), _env(MLFLOW_LOG_UV_FILES="false"):  # no repo lock file inside
                    return mlflow.pyfunc.log_model(
                        name=name,
                        python_model=str(MODEL_CODE),
                        artifacts={"checkpoint": str(weights)},
                        code_paths=[str(code)],
                        model_config={"blip_task": task},
                        signature=sig,
                        pip_requirements=model_requirements(),
                        registered_model_name=registered_model_name,
                        tags={"task": task},
                    )

            return self.call(log)

    def _active(self) -> AbstractContextManager[object]:
        """This run as MLflow's active run, for the fluent API."""
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            return nullcontext()
        return mlflow.start_run(run_id=self.run_id, nested=active is not None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text)."""
        self.call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metadata(self) -> dict[str, str]:
        """Asset metadata pointing at this run."""
        return {"mlflow_run_id": self.run_id, "mlflow_parent_run_id": self.parent_run_id,
                "mlflow_experiment_id": self.experiment_id,
                "mlflow_tracking_uri": redact_uri(self.tracking_uri)}


@contextmanager
def _env(**values: str) -> Iterator[None]:
    with restored_environ(*values):
        os.environ.update(values)
        yield


def _stage_model_files(checkpoint: Path, tmp: Path) -> tuple[Path, Path]:
    """Copy what a served model needs: weights, config, tokenizer (never ``trainer_state/``) and
    the ``blip_core`` sources (no bytecode)."""
    import blip_core
    from blip_core.checkpoint import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, is_checkpoint

    if not is_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint folder")
    weights = tmp / "checkpoint"
    weights.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(checkpoint / name, weights / name)
    shutil.copytree(checkpoint / TOKENIZER_DIR, weights / TOKENIZER_DIR)
    code = tmp / "blip_core"
    shutil.copytree(Path(blip_core.__file__).parent, code,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return weights, code

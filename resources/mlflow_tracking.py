"""MLflow tracking as a Dagster resource: one MLflow run per training asset.

Runs are nested: a parent run per Dagster run (tag ``dagster_run_id``) and a child run per
asset materialisation. A child is always ended (FINISHED, FAILED or KILLED), also when the asset
raises, and the parent's status then summarises its children. ``dagster-mlflow`` is not used: it
leaves runs open.

Where runs go: ``tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the embedded default
``sqlite:///DATA/mlflow/mlflow.db`` with artefacts in ``DATA/mlflow/artifacts`` (no server).
The store is checked when the resource starts, before any training, and an unreachable one
fails the step with :class:`MlflowUnavailableError` within seconds (the ``orchestration`` package
keeps the client's HTTP retries short: ``MLFLOW_HTTP_REQUEST_*``). Once a run has started, an
outage loses nothing: per-step metrics are kept in memory and sent when the store answers again
(training never waits for it), and every other call waits for the store, with backoff, up to
``outage_wait_s`` before failing with :class:`MlflowUnavailableError`. Telemetry is switched off
by the ``orchestration`` package before MLflow is imported.

Usage inside an asset::

    with mlflow_res.start_run(context, "captioner") as run:
        run.log_config(train_cfg)
        run.log_dataset("human_pairs", path, digest=dvc_md5)
        result = launcher.train(context, train_cfg, on_log=run.log_step)
        info = run.log_model(result.checkpoint, task="captioner", registered_model_name="blip-captioner")
        metadata = run.metadata()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from dagster import ConfigurableResource, InitResourceContext
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from pydantic import PrivateAttr

ROLE_TAG = "blip_ops.role"  # "dagster_run" (parent) or "asset" (child)
DAGSTER_RUN_TAG = "dagster_run_id"
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.I)
REDACTED = "***"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
MODEL_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
MODEL_REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "transformers", "safetensors",
                      "pillow", "pandas", "numpy", "pyyaml")
FLUSH_RETRY_S = 10.0  # seconds between attempts to send metrics kept back during an outage


class MlflowUnavailableError(RuntimeError):
    """The tracking store cannot be reached or used; raised before any training starts."""


def redact_uri(uri: str) -> str:
    """``uri`` with any password in its network location replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_URI_PASSWORD = re.compile(r"(\w[\w+.-]*://[^\s/:@]+:)[^\s/@]+@")


def redact_text(text: str) -> str:
    """``text`` (an error message) with the password of every URI in it replaced by ``***``."""
    return _URI_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def unreachable(error: BaseException) -> bool:
    """Whether ``error``, or an error it wraps, says the tracking server could not be reached,
    timed out, or kept answering 5xx/429 through the client's retries."""
    import requests

    gone = (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, gone):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _unavailable(uri: str, error: BaseException, what: str, hint: str = "") -> MlflowUnavailableError:
    """The error for a store that ``what``, naming it and the cause with passwords masked (raise it
    ``from None``: the cause's own text shows the URI as given)."""
    cause = redact_text(f"{type(error).__name__}: {error}")[:2000]
    return MlflowUnavailableError(f"MLflow tracking store {redact_uri(uri)} {what} ({cause}).{hint}")


def _health(uri: str, timeout: float) -> Any:
    """A tracking server's answer to ``GET /health`` (raises ``requests``' errors)."""
    import requests

    return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)


def metric_key(name: str) -> str:
    """An MLflow-safe metric / param key: ``tr@1`` -> ``tr_at_1``; other odd characters -> ``_``."""
    return re.sub(r"[^\w.\- :/]", "_", name.replace("@", "_at_"))


def redact(data: Any) -> Any:
    """Plain data with secret-looking keys masked and passwords removed from URIs."""
    if isinstance(data, Mapping):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_uri(data)
    return data


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
                    raise _unavailable(self.tracking_uri, e, (
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
            return _health(self.tracking_uri, timeout=2).ok
        except requests.RequestException:
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened, redacted) parameters."""
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.call(self.client.log_batch, self.run_id, params=items[i : i + 100])

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
        while self.pending:
            batch = self.pending[:1000]  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=batch)
            del self.pending[: len(batch)]

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

    @contextmanager
    def _active(self) -> Iterator[None]:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            yield
            return
        with mlflow.start_run(run_id=self.run_id, nested=active is not None):
            yield

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.call(self.client.set_tag, self.run_id, key, str(value))

    def metadata(self) -> dict[str, str]:
        """Asset metadata pointing at this run."""
        return {"mlflow_run_id": self.run_id, "mlflow_parent_run_id": self.parent_run_id,
                "mlflow_experiment_id": self.experiment_id,
                "mlflow_tracking_uri": redact_uri(self.tracking_uri)}


@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def _set_fluent_uris(tracking_uri: str, registry_uri: str) -> None:
    """Point MLflow's fluent API at the store without leaking it into ``os.environ``.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which every later resource in
    the process would then take for the user's choice (e.g. a stopped server's address).
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    try:
        mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MlflowResource(ConfigurableResource):
    """MLflow tracking and registry for the pipeline (see the module docstring)."""

    data_dir: str = "data"  # the embedded store lives in DATA/mlflow/
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI -> sqlite:///DATA/mlflow/mlflow.db
    registry_uri: str = ""  # "" -> the tracking URI
    artifact_location: str = ""  # new experiment's artefact root ("" -> DATA/mlflow/artifacts)
    experiment: str = "blip-ops"  # experiment holding every run
    connect_timeout_s: float = 10.0  # reachability check of a tracking server
    outage_wait_s: float = 60.0  # how long a started run waits for an unreachable store

    _experiment_id: str | None = PrivateAttr(default=None)

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{Path(self.data_dir).resolve() / 'mlflow' / 'mlflow.db'}"

    def resolved_artifact_location(self) -> str | None:
        if self.artifact_location:
            return self.artifact_location
        if self.resolved_tracking_uri().startswith(("http://", "https://", "databricks")):
            return None  # the server decides
        return (Path(self.data_dir).resolve() / "mlflow" / "artifacts").as_uri()

    def client(self) -> MlflowClient:
        return MlflowClient(self.resolved_tracking_uri(), self.registry_uri or None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self.connect()

    def connect(self) -> str:
        """Point MLflow at the store, check it answers, create the experiment; its id.

        Raises:
            MlflowUnavailableError: the store is unreachable or unusable.
        """
        if self._experiment_id is not None:
            return self._experiment_id
        uri = self.resolved_tracking_uri()
        try:
            if uri.startswith("sqlite:///"):
                Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            elif uri.startswith(("http://", "https://")):
                _health(uri, timeout=self.connect_timeout_s).raise_for_status()
            _set_fluent_uris(uri, self.registry_uri)
            exp_id = self._get_or_create_experiment(self.client())
        except Exception as e:
            raise _unavailable(uri, e, "is not usable", (
                " Start the server (mlflow/start_server.sh), fix MLFLOW_TRACKING_URI, or unset it to "
                "use the embedded SQLite store under the data folder.")) from None
        self._experiment_id = exp_id
        return exp_id

    def _get_or_create_experiment(self, client: MlflowClient) -> str:
        """The experiment's id, created if missing; a step that loses the race to create it reads
        the winner's (parallel steps connect at once to a fresh store)."""
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment,
                                            artifact_location=self.resolved_artifact_location())
        except MlflowException:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs ------------------------------------------------------------------------------

    def _parents(self, client: MlflowClient, exp_id: str, dagster_run_id: str) -> list[Any]:
        query = f"tags.{DAGSTER_RUN_TAG} = '{dagster_run_id}' and tags.`{ROLE_TAG}` = 'dagster_run'"
        return client.search_runs([exp_id], query, max_results=50)

    def parent_run_id(self, dagster_run_id: str, job_name: str = "") -> str:
        """The MLflow run of a Dagster run, created once even when steps race to create it."""
        client, exp_id = self.client(), self.connect()
        runs = self._parents(client, exp_id, dagster_run_id)
        if not runs:
            created = client.create_run(exp_id, run_name=f"dagster-{dagster_run_id[:8]}", tags={
                DAGSTER_RUN_TAG: dagster_run_id, ROLE_TAG: "dagster_run", "dagster_job": job_name})
            runs = self._parents(client, exp_id, dagster_run_id)
            winner = min(runs, key=lambda r: (r.info.start_time, r.info.run_id))
            if winner.info.run_id != created.info.run_id:  # another step won the race
                client.delete_run(created.info.run_id)
            return winner.info.run_id
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id

    @contextmanager
    def start_run(
        self, context: Any, name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> Iterator[TrackedRun]:
        """A child MLflow run for this asset under the Dagster run's parent run.

        Ended FINISHED on success, FAILED on an exception, KILLED on an interrupt (re-raised).

        Raises:
            MlflowUnavailableError: the store is unreachable as the run starts (the asset has not
                started its work yet: nothing is lost).
        """
        client, exp_id = self.client(), self.connect()
        dagster_run_id = _run_id(context)
        job_name = _job_name(context)
        asset = _asset_name(context)
        with self._unreachable_is_clear():
            parent = self.parent_run_id(dagster_run_id, job_name)
            run_tags = {MLFLOW_PARENT_RUN_ID: parent, ROLE_TAG: "asset", DAGSTER_RUN_TAG: dagster_run_id,
                        "dagster_asset": asset, "dagster_job": job_name}
            partition = _partition_key(context)
            if partition:
                run_tags["dagster_partition"] = partition
            run_tags.update(tags or {})
            run = client.create_run(exp_id, run_name=name or asset, tags=run_tags)
            client.update_run(parent, status="RUNNING")
        tracked = TrackedRun(run.info.run_id, parent, exp_id, self.resolved_tracking_uri(), client,
                             outage_wait_s=self.outage_wait_s)
        try:
            yield tracked
        except BaseException as e:  # KILLED: interrupted (Ctrl-C, Dagster termination)
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
            if tracked.answers():  # best effort: the asset's own error must not be masked
                with suppress(Exception):
                    tracked._send_pending()
                    if status == "FAILED":
                        client.set_tag(run.info.run_id, "error",
                                       redact_text(f"{type(e).__name__}: {e}")[:5000])
                    client.set_terminated(run.info.run_id, status)
                    self._summarise_parent(client, exp_id, parent)
            raise
        tracked.flush()  # the run succeeded: wait for the store rather than lose its metrics
        tracked.call(client.set_terminated, run.info.run_id, "FINISHED")
        tracked.call(self._summarise_parent, client, exp_id, parent)

    def recorded(self, asset: str, data_version: str) -> bool:
        """Whether a FINISHED run of ``asset`` logged the output ``data_version`` (tag)."""
        query = (f"tags.dagster_asset = '{asset}' and tags.data_version = '{data_version}' "
                 "and attributes.status = 'FINISHED'")
        exp_id = self.connect()
        with self._unreachable_is_clear():
            return bool(self.client().search_runs([exp_id], query, max_results=1))

    @contextmanager
    def _unreachable_is_clear(self) -> Iterator[None]:
        """An unreachable store raises :class:`MlflowUnavailableError` naming it, password masked
        (the client's own message shows the URI as given)."""
        try:
            yield
        except Exception as e:
            if not unreachable(e):
                raise
            raise _unavailable(self.resolved_tracking_uri(), e, "unreachable") from None

    def _summarise_parent(self, client: MlflowClient, exp_id: str, parent: str) -> None:
        children = client.search_runs([exp_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
        statuses = {r.info.status for r in children}
        if "RUNNING" in statuses:
            return
        worst = next((s for s in ("FAILED", "KILLED") if s in statuses), "FINISHED")
        client.set_terminated(parent, worst)


def _run_id(context: Any) -> str:
    try:
        return context.run.run_id
    except Exception:  # a directly invoked asset: an ephemeral run id
        return context.run_id


def _partition_key(context: Any) -> str:
    try:
        return context.partition_key if context.has_partition_key else ""
    except Exception:
        return ""


def _job_name(context: Any) -> str:
    try:
        return context.run.job_name or ""
    except Exception:  # a directly invoked asset has no run
        return ""


def _asset_name(context: Any) -> str:
    for get in (lambda: context.asset_key.to_user_string(), lambda: context.op.name):
        try:
            return get()
        except Exception:  # an op, or a context not bound to an invocation
            continue
    return "asset"

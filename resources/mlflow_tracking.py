"""MLflow tracking as a Dagster resource: one MLflow run per training asset.

Runs are nested: a parent run per Dagster run (tag ``dagster_run_id``) and a child run per
asset materialisation. A child is always ended (FINISHED, FAILED or KILLED), also when the asset
raises, and the parent's status then summarises its children. ``dagster-mlflow`` is not used: it
leaves runs open.

Where runs go: ``tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the embedded default
``sqlite:///DATA/mlflow/mlflow.db`` with artefacts in ``DATA/mlflow/artifacts`` (no server).
The store is checked when the resource starts, before any training, and an unreachable one
fails the step with :class:`~resources.mlflow_store.MlflowUnavailableError` within seconds (the
``resources`` package keeps the client's HTTP retries short: ``MLFLOW_HTTP_REQUEST_*``). Once a
run has started, an outage loses nothing (:class:`~resources.mlflow_run.TrackedRun`): per-step
metrics are kept in memory and sent when the store answers again (training never waits for it),
and every other call waits for the store, with backoff, up to ``outage_wait_s``. Telemetry is
switched off by the ``resources`` package before MLflow is imported.

Usage inside an asset::

    with mlflow_res.start_run(context, "captioner") as run:
        run.log_config(train_cfg)
        run.log_dataset("human_pairs", path, digest=dvc_md5)
        result = launcher.train(context, train_cfg, on_log=run.log_step)
        info = run.log_model(result.checkpoint, task="captioner", registered_model_name="blip-captioner")
        metadata = run.metadata()
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from pydantic import PrivateAttr

from resources.mlflow_run import TrackedRun
from resources.mlflow_store import health, set_fluent_uris, unavailable_error, unreachable
from resources.redaction import redact_text

ROLE_TAG = "blip_ops.role"  # "dagster_run" (parent) or "asset" (child)
DAGSTER_RUN_TAG = "dagster_run_id"


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
                health(uri, timeout=self.connect_timeout_s).raise_for_status()
            set_fluent_uris(uri, self.registry_uri)
            exp_id = self._get_or_create_experiment(self.client())
        except Exception as e:
            raise unavailable_error(uri, e, "is not usable", (
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
            raise unavailable_error(self.resolved_tracking_uri(), e, "unreachable") from None

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

"""Registry promotion with MLflow aliases (stages are deprecated), and its rollback command.

The ``registered_model`` asset registers the new bootstrapped model as a version of ``blip-med``
and points the alias ``challenger`` at it. It moves ``champion`` to it only when

1. every blocking asset check upstream of it passed on the latest materialisation (read from
   the Dagster instance: a later run must not promote what an earlier run's checks rejected),
2. the evaluation has the configured metric, and
3. the challenger beats the current champion on that metric (by more than ``min_delta``) without
   regressing on the guard metrics; with no champion yet, it must beat the baseline instead.

The decision and its reason are recorded either way: as tags and description of the model
version, in the asset's metadata and in the MLflow run. The previous champion is kept in the
new champion's ``previous_champion`` tag, so rolling back is one command::

    python -m orchestration.promotion rollback --model blip-med [--to VERSION] [--data DATA]
    python -m orchestration.promotion status --model blip-med

A challenger whose evaluation lacks the metric (absent, None, NaN or infinite), or a guard
metric the reference has, is never promoted; neither is a first champion without a baseline.

Concurrent promotions: an alias points at one version, so there is never more than one
champion; a promotion reads the champion, decides and moves the alias under a lock, so none
decides against a champion that another has replaced meanwhile (the lost update that would
leave a worse champion). The lock is taken in two places, for :meth:`Registry.promote` and
:meth:`Registry.rollback`:

- a file lock beside the data folder: promoters on this machine wait without polling the store;
- a lock in the registry itself, the registered model ``<name>.promotion-lock``: MLflow model
  names are unique in the store's database, so creating it is an atomic test-and-set that
  every promoter of the store sees, from any machine (the team server of ``mlflow/README.md``);
  it is deleted when done, and one older than ``lock_stale_s`` (its holder died) is taken over.

The Dagster pool ``mlflow_registry`` also runs one promotion at a time per Dagster instance.
"""


import argparse
import fcntl
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import Field

from assets.checks import PASSED
from resources.mlflow_run import TrackedRun, metric_key
from resources.mlflow_tracking import DAGSTER_RUN_TAG, MlflowResource
from resources.storage import Dataset, StorageResource

MED_MODEL = "blip-med"
CAPTIONER_MODEL = "blip-captioner"
FILTER_MODEL = "blip-filter"
CHAMPION = "champion"
CHALLENGER = "challenger"
REGISTRY_POOL = "mlflow_registry"
LOCK_SUFFIX = ".promotion-lock"
RECALL_KEYS = ("tr@1", "tr@5", "ir@1", "ir@5")


def score(metrics: Mapping[str, Any], metric: str) -> float | None:
    """A metric of an evaluation; ``r_mean`` is the mean of TR/IR@1/5.

    None when absent or not a finite number (None, NaN, infinity, text, a bool).
    """
    if metric == "r_mean":
        values = [score(metrics, k) for k in RECALL_KEYS]
        return None if None in values else sum(values) / len(values)  # type: ignore[arg-type]
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class PromotionRule:
    """How a challenger wins."""

    metric: str = "r_mean"  # compared metric (a report key, or r_mean)
    min_delta: float = 0.0  # the challenger must exceed the reference by more than this
    guard_metrics: tuple[str, ...] = ("cider",)  # must not drop below the reference's ...
    guard_tolerance: float = 0.0  # ... by more than this
    beat_baseline_first: bool = True  # with no champion, the reference is the baseline


@dataclass(frozen=True)
class Decision:
    """The outcome of a promotion and why."""

    promote: bool
    reason: str
    challenger_score: float | None = None
    reference_score: float | None = None
    reference: str = ""  # "champion vN", "baseline" or ""


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None,
           baseline: Mapping[str, Any] | None, check_problems: Sequence[str],
           rule: PromotionRule = PromotionRule(), champion_label: str = "champion") -> Decision:
    """Pure promotion logic: blocking checks, then the metric against champion (or baseline).

    Missing evaluations never win: a challenger without a finite ``rule.metric``, or without a
    guard metric the reference has, and a first champion without a baseline to beat (when
    ``beat_baseline_first``) are rejected. A champion without the metric (recorded under
    another rule) loses to any challenger that has it.
    """
    if check_problems:
        return Decision(False, f"blocking checks did not pass: {'; '.join(check_problems[:5])}")
    mine = score(challenger, rule.metric)
    if mine is None:
        return Decision(False, f"the evaluation has no finite {rule.metric!r} for the challenger")
    if champion is not None:
        reference, label = champion, champion_label
    elif rule.beat_baseline_first:
        if baseline is None or score(baseline, rule.metric) is None:
            return Decision(False, f"no champion yet and the evaluation has no finite baseline "
                                   f"{rule.metric!r} to beat", mine)
        reference, label = baseline, "baseline"
    else:
        return Decision(True, f"first champion ({rule.metric}={mine:.4g})", mine, None, "")
    theirs = score(reference, rule.metric)
    if theirs is None:
        return Decision(True, f"{label} has no {rule.metric!r}; challenger {mine:.4g} wins", mine,
                        None, label)
    if mine <= theirs + rule.min_delta:
        return Decision(False, f"{rule.metric} {mine:.4g} does not beat {label} {theirs:.4g} "
                               f"(+{rule.min_delta:g} needed)", mine, theirs, label)
    for guard in rule.guard_metrics:
        a, b = score(challenger, guard), score(reference, guard)
        if b is not None and a is None:
            return Decision(False, f"{rule.metric} {mine:.4g} beats {label} {theirs:.4g} but the "
                                   f"evaluation has no finite {guard!r} (guard) for the challenger",
                            mine, theirs, label)
        if a is not None and b is not None and a < b - rule.guard_tolerance:
            return Decision(False, f"{rule.metric} {mine:.4g} beats {label} {theirs:.4g} but {guard} "
                                   f"regresses {b:.4g} -> {a:.4g}", mine, theirs, label)
    return Decision(True, f"{rule.metric} {mine:.4g} beats {label} {theirs:.4g}", mine, theirs, label)


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """Aliases, tags and the champion history of registered models (over ``MlflowClient``).

    Args:
        lock_path: file lock of this machine's promoters (None: the registry lock alone).
        lock_timeout_s: how long to wait for another promotion of the same model.
        lock_stale_s: age after which a registry lock is taken for its dead holder's.
    """

    def __init__(self, client: MlflowClient, lock_path: Path | None = None,
                 lock_timeout_s: float = 300.0, lock_stale_s: float = 600.0) -> None:
        self.client = client
        self.lock_path = lock_path
        self.lock_timeout_s = lock_timeout_s
        self.lock_stale_s = lock_stale_s

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive promotion / rollback of ``name``, on this machine and in the registry."""
        with self._file_lock(), self._registry_lock(name):
            yield

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self.lock_path is None:
            yield
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def _registry_lock(self, name: str) -> Iterator[None]:
        """The registered model ``<name>.promotion-lock`` exists while someone holds the lock."""
        lock, owner = f"{name}{LOCK_SUFFIX}", f"{socket.gethostname()}:{os.getpid()}"
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                self.client.create_registered_model(lock, tags={"owner": owner}, description=(
                    f"Held during a promotion or rollback of {name}; delete it if its owner is gone."))
                break
            except MlflowException as e:  # held; or released while the store built that error
                if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            held = self._get_model(lock)
            if held is not None and time.time() * 1000 - held.creation_timestamp > self.lock_stale_s * 1000:
                self._delete_model(lock)  # its holder died without releasing it
                continue
            if time.monotonic() > deadline:
                holder = held.tags.get("owner", "?") if held is not None else "?"
                raise TimeoutError(f"{lock} is held by {holder}; waited {self.lock_timeout_s:g}s "
                                   f"(delete the registered model {lock} if that process is gone)")
            time.sleep(random.uniform(0.02, 0.1))
        try:
            yield
        finally:
            self._delete_model(lock)

    def _get_model(self, name: str) -> Any:
        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            return None

    def _delete_model(self, name: str) -> None:
        try:
            self.client.delete_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def by_alias(self, name: str, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version number an alias points at, as text (None when unset)."""
        version = self.by_alias(name, alias)
        return str(version.version) if version is not None else None

    @staticmethod
    def metrics(version: ModelVersion) -> dict[str, float]:
        return json.loads(version.tags.get("metrics", "{}"))

    def register(self, model_uri: str, name: str, metrics: Mapping[str, float],
                 tags: Mapping[str, str]) -> ModelVersion:
        """A new version of ``name`` from ``model_uri``, tagged with its metrics, as challenger
        (the alias moves only forward: a slower concurrent registration leaves it on the newest)."""
        if self._get_model(name) is None:
            try:
                self.client.create_registered_model(name, description=(
                    "BLIP MED bootstrapped by CapFilt; aliases: champion (serving), challenger (newest)."))
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else a concurrent first registration
                    raise
        run_id = tags.get("mlflow_run_id")
        numbers = {k: v for k, v in metrics.items() if score(metrics, k) is not None}
        version = self.client.create_model_version(name, model_uri, run_id=run_id, tags={
            **tags, "metrics": json.dumps(dict(metrics), sort_keys=True, default=str),
            **{f"metric.{metric_key(k)}": f"{v:.6g}" for k, v in numbers.items()}})
        with self.locked(name):
            newest = self.alias_version(name, CHALLENGER)
            if newest is None or int(newest) < int(version.version):
                self.client.set_registered_model_alias(name, CHALLENGER, version.version)
        return self.client.get_model_version(name, version.version)

    def record(self, name: str, version: str, decision: Decision, promoted: bool) -> None:
        tags = {"promotion.decision": "champion" if promoted else "rejected",
                "promotion.reason": decision.reason, "promotion.time": str(int(time.time()))}
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        self.client.update_model_version(name, version, description=f"Promotion: {decision.reason}")

    def promote(self, name: str, version: str, challenger_metrics: Mapping[str, float],
                baseline: Mapping[str, float] | None, check_problems: Sequence[str],
                rule: PromotionRule) -> tuple[Decision, str | None]:
        """Decide against the champion read under the lock and move the alias if it wins.

        Returns:
            The decision and the previous champion's version (None if there was none).
        """
        with self.locked(name):
            current = self.by_alias(name, CHAMPION)
            if current is not None and str(current.version) == str(version):
                decision = Decision(False, f"version {version} is already the champion")
                return decision, str(current.version)
            decision = decide(challenger_metrics, self.metrics(current) if current else None, baseline,
                              check_problems, rule,
                              champion_label=f"champion v{current.version}" if current else "champion")
            if decision.promote:
                if current is not None:
                    self.client.set_model_version_tag(name, str(version), "previous_champion",
                                                      str(current.version))
                self.client.set_registered_model_alias(name, CHAMPION, str(version))
            self.record(name, str(version), decision, decision.promote)
            return decision, str(current.version) if current else None

    def rollback(self, name: str, to: str | None = None) -> tuple[str, str]:
        """Point ``champion`` back at ``to`` (default: the current champion's previous one).

        Only a version that was champion before can be restored: one the gate rejected never is.

        Returns:
            (version demoted, version now champion).
        """
        with self.locked(name):
            current = self.by_alias(name, CHAMPION)
            if current is None:
                raise ValueError(f"{name} has no champion to roll back")
            target = to or current.tags.get("previous_champion")
            if not target:
                raise ValueError(f"{name} v{current.version} records no previous champion; "
                                 "name one with --to VERSION")
            if str(target) == str(current.version):
                raise ValueError(f"{name} v{target} is already the champion")
            restored = self.client.get_model_version(name, target)  # raises if it does not exist
            if restored.tags.get("promotion.decision") != "champion":
                raise ValueError(f"{name} v{target} was never champion "
                                 f"({restored.tags.get('promotion.reason', 'no promotion recorded')}); "
                                 "only a former champion can be restored")
            self.client.set_registered_model_alias(name, CHAMPION, target)
            stamp = str(int(time.time()))
            self.client.set_model_version_tag(name, current.version, "rolled_back", stamp)
            self.client.set_model_version_tag(name, target, "restored_from", str(current.version))
            # The restored champion's own history stays intact (its previous_champion tag).
            return str(current.version), str(target)

    def status(self, name: str) -> dict[str, Any]:
        model = self.client.get_registered_model(name)
        versions = self.client.search_model_versions(f"name = '{name}'")
        return {
            "model": name,
            "aliases": {alias: str(v) for alias, v in model.aliases.items()},
            "versions": [{"version": v.version, "decision": v.tags.get("promotion.decision", ""),
                          "reason": v.tags.get("promotion.reason", ""),
                          "previous_champion": v.tags.get("previous_champion", ""),
                          "rolled_back": v.tags.get("rolled_back", ""),
                          "restored_from": v.tags.get("restored_from", "")}
                         for v in sorted(versions, key=lambda v: int(v.version))],
        }


def registry_for(mlflow_res: MlflowResource) -> Registry:
    """The registry of a resource, locking beside its data folder."""
    lock = Path(mlflow_res.data_dir).resolve() / "mlflow" / "registry.lock"
    return Registry(mlflow_res.client(), lock)


# --- the asset ---------------------------------------------------------------------------------


def lineage_checks() -> list[str]:
    """The blocking checks of the lineage (web shards, human pairs, bootstrapped corpus)."""
    from assets.checks import CORPUS_CHECKS, HUMAN_CHECKS, WEB_CHECKS

    return ([f"web_shards:{c}" for c in WEB_CHECKS] + [f"human_pairs:{c}" for c in HUMAN_CHECKS]
            + [f"bootstrapped_corpus:{c}" for c in CORPUS_CHECKS])


def blocking_check_problems(context: AssetExecutionContext, required: Sequence[str]) -> list[str]:
    """Every blocking check upstream of this asset (found in the asset graph, plus ``required``)
    that did not pass on its asset's latest materialisation (every partition of a partitioned one).

    ``required`` matters when the run's graph is a subset (a job without the upstream assets,
    or ``materialize``), where upstream checks are not part of the graph.
    """
    try:
        graph = context.repository_def.asset_graph
    except Exception:  # executed in process: no repository, use the job's graph
        graph = context.job_def.asset_layer.asset_graph
    ancestors = graph.get_ancestor_asset_keys(context.asset_key)
    keys = {k for k in graph.asset_check_keys
            if k.asset_key in ancestors and graph.get_check_spec(k).blocking}
    keys |= {AssetCheckKey.from_user_string(name) for name in required}
    return check_problems(context.instance, sorted(keys, key=lambda k: k.to_user_string()))


def check_problems(instance: Any, keys: Sequence[AssetCheckKey]) -> list[str]:
    problems: list[str] = []
    for key in keys:
        partitions = instance.get_materialized_partitions(key.asset_key) or None
        infos = instance.event_log_storage.get_asset_check_partition_info(
            [key], partition_keys=sorted(partitions) if partitions else None)
        by_partition = {i.partition_key: i for i in infos}
        for pk in sorted(partitions) if partitions else [None]:
            where = f"{key.to_user_string()}" + (f"[{pk}]" if pk else "")
            info = by_partition.get(pk)
            if info is None or not info.is_current:
                problems.append(f"{where} did not run on the latest materialization")
            elif info.latest_execution_status.value != PASSED:
                problems.append(f"{where} {info.latest_execution_status.value.lower()}")
    return problems


class PromotionSettings(Config):
    """How the bootstrapped model is promoted."""

    model_name: str = Field(default=MED_MODEL, description="registered model")
    metric: str = Field(default="r_mean", description="compared metric: r_mean (TR/IR@1/5) or a "
                                                      "report key such as tr@1, cider")
    min_delta: float = Field(default=0.0, description="margin the challenger must win by")
    guard_metrics: list[str] = Field(default=["cider"], description="must not regress")
    guard_tolerance: float = Field(default=0.0, description="allowed regression of guard metrics")
    beat_baseline_first: bool = Field(default=True, description="first champion must beat the "
                                                                "baseline pretrained_med")
    required_checks: list[str] = Field(default_factory=lineage_checks,
                                       description="ASSET:CHECK that must have passed, beside the "
                                                   "blocking checks found upstream in the graph")

    def rule(self) -> PromotionRule:
        return PromotionRule(self.metric, self.min_delta, tuple(self.guard_metrics),
                             self.guard_tolerance, self.beat_baseline_first)


def find_logged_model(mlflow_res: MlflowResource, data_version: str) -> tuple[str, str] | None:
    """(model URI, run id) of the model the bootstrapped_med run logged for this data version."""
    client, exp = mlflow_res.client(), mlflow_res.connect()
    runs = client.search_runs([exp], f"tags.dagster_asset = 'bootstrapped_med' and "
                                     f"tags.data_version = '{data_version}'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        outputs = getattr(run, "outputs", None)
        for out in getattr(outputs, "model_outputs", None) or []:
            return f"models:/{out.model_id}", run.info.run_id
    return None


@asset(
    group_name="blip",
    pool=REGISTRY_POOL,
    kinds={"mlflow"},
    description="blip-med in the MLflow registry: the new model as `challenger`, promoted to "
                "`champion` only if every blocking check passed and it beats the champion.",
)
def registered_model(context: AssetExecutionContext, config: PromotionSettings, storage: StorageResource,
                     mlflow: MlflowResource, bootstrapped_med: Dataset,
                     downstream_evals: Dataset) -> MaterializeResult:
    """Register bootstrapped_med, alias it challenger, and maybe champion; record why."""
    with storage.local_dir(downstream_evals.key) as folder:
        report = json.loads((folder / "report.json").read_text())
    challenger, baseline = report.get("bootstrapped") or {}, report.get("baseline")
    problems = blocking_check_problems(context, config.required_checks)
    registry = registry_for(mlflow)
    with mlflow.start_run(context, "registered_model") as run:
        found = find_logged_model(mlflow, bootstrapped_med.version)
        if found is not None:
            model_uri, source_run = found
        else:  # the training run logged no model: log it from the checkpoint here
            with storage.local_dir(bootstrapped_med.key) as ckpt:
                model_uri, source_run = run.log_model(ckpt, task="med").model_uri, run.run_id
        run.log_metrics({f"challenger.{k}": v for k, v in challenger.items()})
        version = registry.register(model_uri, config.model_name, challenger, tags={
            "mlflow_run_id": source_run, DAGSTER_RUN_TAG: context.run_id,
            "data_version": bootstrapped_med.version, "evals_version": downstream_evals.version,
            "blocking_checks": "passed" if not problems else f"{len(problems)} problem(s)"})
        decision, previous = registry.promote(config.model_name, version.version, challenger, baseline,
                                              problems, config.rule())
        _log_decision(run, config.model_name, version.version, decision)
    champion = registry.alias_version(config.model_name, CHAMPION)
    context.log.info(f"{config.model_name} v{version.version}: "
                     f"{'PROMOTED' if decision.promote else 'not promoted'} - {decision.reason}")
    metadata: dict[str, Any] = {
        "model_name": config.model_name,
        "version": MetadataValue.int(int(version.version)),
        "model_uri": f"models:/{config.model_name}/{version.version}",
        "promoted": MetadataValue.bool(decision.promote),
        "reason": decision.reason,
        "champion_version": champion or "",
        "previous_champion": previous or "",
        "metric": config.metric,
        "challenger_metrics": MetadataValue.json(challenger),
        "blocking_check_problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "_none_"),
        "rollback": f"python -m orchestration.promotion rollback --model {config.model_name}",
        **run.metadata(),
    }
    if decision.challenger_score is not None:
        metadata["challenger_score"] = MetadataValue.float(round(decision.challenger_score, 4))
    if decision.reference_score is not None:
        metadata["reference_score"] = MetadataValue.float(round(decision.reference_score, 4))
    return MaterializeResult(metadata=metadata)


def _log_decision(run: TrackedRun, name: str, version: str, decision: Decision) -> None:
    run.set_tags({"promotion.model": name, "promotion.version": version,
                  "promotion.promoted": str(decision.promote), "promotion.reason": decision.reason})


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestration.promotion rollback|status --model NAME``."""
    p = argparse.ArgumentParser(prog="python -m orchestration.promotion",
                                description="Inspect or roll back the champion of a registered model.")
    p.add_argument("command", choices=["rollback", "status"])
    p.add_argument("--model", default=MED_MODEL, help=f"registered model (default {MED_MODEL})")
    p.add_argument("--to", help="rollback: version to make champion (default: the previous champion)")
    p.add_argument("--data", default=os.environ.get("BLIP_OPS_DATA", "data"),
                   help="data folder of the embedded store (default: $BLIP_OPS_DATA or data)")
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else the "
                                                      "embedded SQLite store of --data")
    args = p.parse_args(argv)
    registry = registry_for(MlflowResource(data_dir=args.data, tracking_uri=args.tracking_uri))
    try:
        if args.command == "status":
            print(json.dumps(registry.status(args.model), indent=2))
            return 0
        demoted, champion = registry.rollback(args.model, args.to)
    except (ValueError, MlflowException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model}: champion v{demoted} -> v{champion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MLflow model registry: ``champion`` / ``challenger`` aliases (stages are deprecated), the
promotion rule, and the locks that keep concurrent promotions from losing an update.

:meth:`Registry.register` adds a version tagged with its metrics and points ``challenger`` at
it; :meth:`Registry.promote` moves ``champion`` to it when :func:`decide` says it wins. The
decision and its reason become tags and the description of the version; the new champion keeps
its predecessor in its ``previous_champion`` tag, which :meth:`Registry.rollback` restores.

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

Assets that promote also carry the Dagster pool :data:`REGISTRY_POOL`: one promotion at a time
per Dagster instance.
"""

import json
import math
import os
import random
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from resources.mlflow_run import metric_key
from resources.mlflow_tracking import MlflowResource

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

    def _file_lock(self) -> AbstractContextManager[object]:
        if self.lock_path is None:
            return nullcontext()
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(self.lock_path)

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


def find_logged_model(mlflow_res: MlflowResource, asset: str, data_version: str) -> tuple[str, str] | None:
    """(model URI, run id) of the model a run of ``asset`` logged for its output ``data_version``."""
    client, exp = mlflow_res.client(), mlflow_res.connect()
    runs = client.search_runs([exp], f"tags.dagster_asset = '{asset}' and "
                                     f"tags.data_version = '{data_version}'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        outputs = getattr(run, "outputs", None)
        for out in getattr(outputs, "model_outputs", None) or []:
            return f"models:/{out.model_id}", run.info.run_id
    return None

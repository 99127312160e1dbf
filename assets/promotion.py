"""The ``registered_model`` asset: the bootstrapped model in the MLflow registry, promoted on merit.

It registers ``bootstrapped_med`` as a version of ``blip-med`` and points the alias
``challenger`` at it. It moves ``champion`` to it only when

1. every blocking asset check upstream of it passed on the latest materialisation (read from
   the Dagster instance: a later run must not promote what an earlier run's checks rejected),
2. the evaluation has the configured metric, and
3. the challenger beats the current champion on that metric (by more than ``min_delta``) without
   regressing on the guard metrics; with no champion yet, it must beat the baseline instead
   (:func:`resources.mlflow_registry.decide`).

The decision and its reason are recorded either way: on the model version, in the asset's
metadata and in the MLflow run. ``python -m orchestration.promotion rollback`` restores the
previous champion.
"""

import json
from collections.abc import Sequence
from typing import Any

from dagster import AssetCheckKey, AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from assets.checks import CORPUS_CHECKS, HUMAN_CHECKS, WEB_CHECKS, check_problems
from assets.keys import GROUP
from resources.mlflow_registry import (
    CHAMPION,
    MED_MODEL,
    REGISTRY_POOL,
    Decision,
    PromotionRule,
    find_logged_model,
    registry_for,
)
from resources.mlflow_run import TrackedRun
from resources.mlflow_tracking import DAGSTER_RUN_TAG, MlflowResource
from resources.storage import Dataset, StorageResource


def lineage_checks() -> list[str]:
    """The blocking checks of the lineage (web shards, human pairs, bootstrapped corpus)."""
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
    return [str(p) for p in check_problems(context.instance, sorted(keys, key=lambda k: k.to_user_string()))]


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


@asset(
    group_name=GROUP,
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
        found = find_logged_model(mlflow, "bootstrapped_med", bootstrapped_med.version)
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

"""Promotion: the decision rule, the MLflow registry aliases, the asset and the rollback command."""

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import test_mlflow
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    DagsterInstance,
    Output,
    asset,
    asset_check,
    instance_for_test,
    materialize,
)

from orchestration.mlflow_resource import MlflowResource
from orchestration.promotion import (
    CHALLENGER,
    CHAMPION,
    PromotionRule,
    Registry,
    decide,
    main,
    registered_model,
    registry_for,
)
from orchestration.storage import Dataset, DatasetIOManager, LocalStorage, dataset_key

empty_store, tracking = test_mlflow.empty_store, test_mlflow.tracking  # shared fixtures
tiny_checkpoint = test_mlflow.tiny_checkpoint

BASE = {"tr@1": 40.0, "tr@5": 70.0, "ir@1": 30.0, "ir@5": 60.0, "bleu4": 10.0, "cider": 50.0}


def metrics(delta: float, cider: float | None = None) -> dict[str, float]:
    out = {k: v + delta for k, v in BASE.items()}
    if cider is not None:
        out["cider"] = cider
    return out


# --- the rule ------------------------------------------------------------------------------


def test_failed_checks_block_promotion_whatever_the_metrics():
    d = decide(metrics(10), metrics(0), metrics(0), ["bootstrapped_corpus:no_eval_leak failed"])
    assert not d.promote and "no_eval_leak" in d.reason


def test_first_champion_must_beat_the_baseline():
    assert decide(metrics(1), None, metrics(0), []).promote
    d = decide(metrics(-1), None, metrics(0), [])
    assert not d.promote and "baseline" in d.reason
    assert decide(metrics(-1), None, metrics(0), [], PromotionRule(beat_baseline_first=False)).promote


def test_challenger_must_beat_the_champion_without_regressing_guards():
    assert decide(metrics(2), metrics(1), metrics(0), []).promote
    assert not decide(metrics(1), metrics(1), metrics(0), []).promote  # a tie is no win
    assert not decide(metrics(1.5), metrics(1), None, [], PromotionRule(min_delta=1.0)).promote
    regress = decide(metrics(2, cider=40.0), metrics(1), None, [])
    assert not regress.promote and "cider regresses" in regress.reason
    assert decide(metrics(2, cider=40.0), metrics(1), None, [],
                  PromotionRule(guard_tolerance=15.0)).promote
    assert decide({"cider": 60.0}, {"cider": 50.0}, None, [], PromotionRule(metric="cider")).promote
    missing = decide({"cider": 60.0}, None, None, [])
    assert not missing.promote and "r_mean" in missing.reason


# --- the registry --------------------------------------------------------------------------


def _register(registry: Registry, tmp_path: Path, m: dict[str, float], tag: str) -> str:
    source = tmp_path / "models" / tag
    source.mkdir(parents=True, exist_ok=True)
    return str(registry.register(str(source), "blip-med", m, tags={"data_version": tag}).version)


def test_aliases_previous_champion_and_rollback_command(tracking: MlflowResource, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    registry = registry_for(tracking)
    rule = PromotionRule()
    v1 = _register(registry, tmp_path, metrics(1), "a")
    assert registry.promote("blip-med", v1, metrics(1), metrics(0), [], rule)[0].promote
    v2 = _register(registry, tmp_path, metrics(0.5), "b")
    decision, previous = registry.promote("blip-med", v2, metrics(0.5), metrics(0), [], rule)
    assert not decision.promote and previous == v1
    assert registry.alias_version("blip-med", CHAMPION) == v1
    assert registry.alias_version("blip-med", CHALLENGER) == v2
    rejected = tracking.client().get_model_version("blip-med", v2)
    assert rejected.tags["promotion.decision"] == "rejected"
    assert "does not beat champion v1" in rejected.tags["promotion.reason"] in rejected.description
    v3 = _register(registry, tmp_path, metrics(3), "c")
    assert registry.promote("blip-med", v3, metrics(3), metrics(0), [], rule)[0].promote
    assert tracking.client().get_model_version("blip-med", v3).tags["previous_champion"] == v1

    args = ["--model", "blip-med", "--data", tracking.data_dir]
    assert main(["rollback", *args]) == 0
    assert registry.alias_version("blip-med", CHAMPION) == v1
    assert f"v{v3} -> v{v1}" in capsys.readouterr().out
    assert main(["rollback", *args]) == 1  # v1 was the first champion: nothing before it
    assert "no previous champion" in capsys.readouterr().err
    assert main(["rollback", *args, "--to", v3]) == 0
    assert registry.alias_version("blip-med", CHAMPION) == v3
    assert main(["status", *args]) == 0
    out = capsys.readouterr().out
    status = json.loads(out[out.index("{"):])
    assert status["aliases"] == {CHAMPION: v3, CHALLENGER: v3}


def test_concurrent_promotions_leave_one_champion_the_best(tracking: MlflowResource, tmp_path: Path):
    registry = registry_for(tracking)
    versions = {_register(registry, tmp_path, metrics(d), f"m{d}"): d for d in (1.0, 2.0, 3.0)}
    start = threading.Barrier(len(versions))
    outcomes: dict[str, bool] = {}

    def promote(version: str) -> None:
        start.wait()
        mine = registry_for(tracking)  # its own client, as a second process would have
        outcomes[version] = mine.promote("blip-med", version, metrics(versions[version]), metrics(0), [],
                                         PromotionRule())[0].promote

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    best = max(versions, key=versions.get)
    assert outcomes[best] and registry.alias_version("blip-med", CHAMPION) == best
    model = tracking.client().get_registered_model("blip-med")
    assert list(model.aliases).count(CHAMPION) == 1


# --- the asset -----------------------------------------------------------------------------

CHECK = {"passed": True}
EVALS = {"bootstrapped": metrics(2), "baseline": metrics(0)}


def _lineage(storage: LocalStorage, checkpoint: Path) -> list[Any]:
    def publish(name: str, folder: Path) -> Output[Dataset]:
        key = dataset_key([name])
        version = storage.publish_dir(folder, key)
        return Output(Dataset(key=key, uri=storage.uri(key), version=version))

    @asset(io_manager_key="datasets_io")
    def bootstrapped_corpus(context: AssetExecutionContext) -> Output[Dataset]:
        folder = Path(storage.scratch_dir("corpus"))
        (folder / "part.txt").write_text("corpus")
        return publish("bootstrapped_corpus", folder)

    @asset_check(asset=bootstrapped_corpus, blocking=True)
    def not_empty() -> AssetCheckResult:
        return AssetCheckResult(passed=CHECK["passed"])

    @asset(io_manager_key="datasets_io")
    def bootstrapped_med(context: AssetExecutionContext, mlflow: MlflowResource,
                         bootstrapped_corpus: Dataset) -> Output[Dataset]:
        out = publish("bootstrapped_med", checkpoint)
        with mlflow.start_run(context) as run:  # what the training asset does
            run.log_model(checkpoint, task="med")
            run.set_tags({"data_version": out.value.version})
        return out

    @asset(io_manager_key="datasets_io")
    def downstream_evals(bootstrapped_med: Dataset) -> Output[Dataset]:
        folder = Path(storage.scratch_dir("evals"))
        (folder / "report.json").write_text(json.dumps(EVALS))
        return publish("downstream_evals", folder)

    return [bootstrapped_corpus, not_empty, bootstrapped_med, downstream_evals, registered_model]


def _run(defs: list[Any], resources: dict[str, Any], instance: DagsterInstance,
         selection: list[str] | None = None) -> Any:
    config = {"ops": {"registered_model": {"config": {"required_checks": ["bootstrapped_corpus:not_empty"]}}}}
    return materialize(defs, resources=resources, instance=instance, selection=selection,
                       raise_on_error=False, run_config=config)


def test_promotion_asset_records_the_decision_and_respects_blocking_checks(
        tracking: MlflowResource, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    defs = _lineage(storage, tiny_checkpoint(tmp_path / "ckpt"))
    resources = {"storage": storage, "mlflow": tracking, "datasets_io": DatasetIOManager(storage=storage)}
    registry = registry_for(tracking)
    with instance_for_test() as instance:
        CHECK["passed"] = True
        result = _run(defs, resources, instance)
        assert result.success
        meta = result.asset_materializations_for_node("registered_model")[0].metadata
        assert meta["promoted"].value is True and meta["version"].value == 1
        assert "beats baseline" in meta["reason"].value
        assert meta["rollback"].value == "python -m orchestration.promotion rollback --model blip-med"
        version = tracking.client().get_model_version("blip-med", "1")
        trained = tracking.client().search_runs([tracking.connect()],
                                                "tags.dagster_asset = 'bootstrapped_med'")[0]
        assert version.run_id == trained.info.run_id  # the training run's model, not a copy
        assert registry.alias_version("blip-med", CHAMPION) == "1"

        CHECK["passed"] = False  # the corpus now fails its blocking check ...
        blocked = _run(defs, resources, instance)
        assert not blocked.success or not blocked.asset_materializations_for_node("registered_model")
        EVALS["bootstrapped"] = metrics(5)  # ... so even a better model must not be promoted
        later = _run(defs, resources, instance, selection=["downstream_evals", "registered_model"])
        meta = later.asset_materializations_for_node("registered_model")[0].metadata
        assert meta["promoted"].value is False
        assert "bootstrapped_corpus:not_empty failed" in meta["reason"].value
        assert registry.alias_version("blip-med", CHAMPION) == "1"
        assert registry.alias_version("blip-med", CHALLENGER) == str(meta["version"].value)
    EVALS["bootstrapped"] = metrics(2)

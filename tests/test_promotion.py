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

from assets.promotion import registered_model
from orchestration.promotion import main
from resources.mlflow_registry import CHALLENGER, CHAMPION, PromotionRule, Registry, decide, registry_for
from resources.mlflow_tracking import MlflowResource
from resources.storage import Dataset, DatasetIOManager, LocalStorage, dataset_key

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


# --- missing evaluations, through the asset ---------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _without(key: str) -> dict[str, float]:
    return {k: v for k, v in metrics(5).items() if k != key}


BROKEN_EVALS: dict[str, Any] = {  # each better than the champion on every number it has
    "absent ir@5": ({"bootstrapped": _without("ir@5")}, "no finite 'r_mean'"),
    "NaN tr@1": ({"bootstrapped": {**metrics(5), "tr@1": NAN}}, "no finite 'r_mean'"),
    "None tr@5": ({"bootstrapped": {**metrics(5), "tr@5": None}}, "no finite 'r_mean'"),
    "infinite ir@1": ({"bootstrapped": {**metrics(5), "ir@1": INF}}, "no finite 'r_mean'"),
    "absent guard cider": ({"bootstrapped": _without("cider")}, "no finite 'cider' (guard)"),
    "NaN guard cider": ({"bootstrapped": {**metrics(5), "cider": NAN}}, "no finite 'cider' (guard)"),
    "no bootstrapped section": ({}, "no finite 'r_mean'"),
}


@pytest.mark.slow  # nine materializations via the registry (decide() gets the same cases below)
def test_missing_or_broken_evaluations_are_never_promoted(tracking: MlflowResource, tmp_path: Path):
    """The real report -> asset -> registry path: absent, None, NaN and infinite metrics (and a
    first champion with no baseline) are rejected, recorded, and the champion stays."""
    storage = LocalStorage(root=str(tmp_path / "data"))
    defs = _lineage(storage, tiny_checkpoint(tmp_path / "ckpt"))
    resources = {"storage": storage, "mlflow": tracking, "datasets_io": DatasetIOManager(storage=storage)}
    registry, client = registry_for(tracking), tracking.client()
    saved = dict(EVALS)
    CHECK["passed"] = True
    try:
        with instance_for_test() as instance:
            EVALS.clear()
            EVALS["bootstrapped"] = metrics(2)  # no baseline and no champion yet
            first = _run(defs, resources, instance)
            meta = first.asset_materializations_for_node("registered_model")[0].metadata
            assert meta["promoted"].value is False and "no finite baseline 'r_mean'" in meta["reason"].value
            assert registry.alias_version("blip-med", CHAMPION) is None

            EVALS["baseline"] = metrics(0)
            second = _run(defs, resources, instance, selection=["downstream_evals", "registered_model"])
            assert second.asset_materializations_for_node("registered_model")[0].metadata["promoted"].value
            champion = registry.alias_version("blip-med", CHAMPION)
            assert champion == "2"

            seen = {}
            for case, (report, reason) in BROKEN_EVALS.items():
                EVALS.clear()
                EVALS.update({"baseline": metrics(0), **report})
                run = _run(defs, resources, instance, selection=["downstream_evals", "registered_model"])
                assert run.success, case
                meta = run.asset_materializations_for_node("registered_model")[0].metadata
                version = str(meta["version"].value)
                assert meta["promoted"].value is False, case
                assert reason in meta["reason"].value, (case, meta["reason"].value)
                assert registry.alias_version("blip-med", CHAMPION) == champion, case
                assert registry.alias_version("blip-med", CHALLENGER) == version, case
                tags = client.get_model_version("blip-med", version).tags
                assert tags["promotion.decision"] == "rejected" and reason in tags["promotion.reason"]
                seen[case] = version
            print(f"broken evaluations tried {len(seen)}, promoted 0, champion v{champion} kept: {seen}")
    finally:
        EVALS.clear()
        EVALS.update(saved)


def test_decide_rejects_non_finite_and_missing_guards():
    for bad in (NAN, INF, -INF, None, True, "41"):
        d = decide({**metrics(5), "tr@1": bad}, metrics(0), None, [])
        assert not d.promote and "no finite 'r_mean'" in d.reason, bad
    assert not decide(metrics(5), None, None, []).promote  # a first champion must beat a baseline
    assert not decide(metrics(5), None, {**metrics(0), "ir@5": NAN}, []).promote
    assert decide(metrics(5), None, None, [], PromotionRule(beat_baseline_first=False)).promote
    no_cider = {k: v for k, v in metrics(1).items() if k != "cider"}
    assert decide(_without("cider"), no_cider, None, []).promote  # nothing to guard against
    legacy = decide(metrics(5), {"bleu4": 12.0}, None, [])  # a champion recorded under another rule
    assert legacy.promote and "has no 'r_mean'" in legacy.reason


# --- blocking checks that did not pass on the latest materialization -------------------------


def test_a_check_that_did_not_run_on_the_latest_materialization_blocks(tracking: MlflowResource,
                                                                      tmp_path: Path):
    """The corpus passed its check, then was re-made without it: its pass is stale, so even a
    better model is not promoted."""
    from dagster import AssetSelection

    storage = LocalStorage(root=str(tmp_path / "data"))
    defs = _lineage(storage, tiny_checkpoint(tmp_path / "ckpt"))
    resources = {"storage": storage, "mlflow": tracking, "datasets_io": DatasetIOManager(storage=storage)}
    registry = registry_for(tracking)
    saved = dict(EVALS)
    CHECK["passed"] = True
    try:
        with instance_for_test() as instance:
            assert _run(defs, resources, instance).success
            assert registry.alias_version("blip-med", CHAMPION) == "1"
            remade = materialize(defs, resources=resources, instance=instance,
                                 selection=AssetSelection.assets("bootstrapped_corpus").without_checks())
            assert remade.success and not remade.get_asset_check_evaluations()
            EVALS["bootstrapped"] = metrics(9)
            later = _run(defs, resources, instance, selection=["downstream_evals", "registered_model"])
            meta = later.asset_materializations_for_node("registered_model")[0].metadata
            assert meta["promoted"].value is False
            assert ("bootstrapped_corpus:not_empty did not run on the latest materialization"
                    in meta["reason"].value)
            assert registry.alias_version("blip-med", CHAMPION) == "1"
    finally:
        EVALS.clear()
        EVALS.update(saved)


def test_one_failed_partition_of_a_partitioned_check_blocks(tracking: MlflowResource, tmp_path: Path):
    """check_problems on a real instance: shard b's blocking check failed, a's passed, c never ran."""
    from dagster import (
        AssetCheckExecutionContext,
        AssetCheckKey,
        AssetCheckSpec,
        StaticPartitionsDefinition,
        multi_asset_check,
    )

    from assets.checks import check_problems

    shards = StaticPartitionsDefinition(["a", "b", "c"])

    @asset(partitions_def=shards)
    def shard(context: AssetExecutionContext) -> None:
        return None

    @multi_asset_check(specs=[AssetCheckSpec("decodable", asset="shard", blocking=True,
                                             partitions_def=shards)])
    def decodable(context: AssetCheckExecutionContext) -> Any:
        yield AssetCheckResult(check_name="decodable", asset_key="shard",
                               passed=context.partition_key != "b")

    with instance_for_test() as instance:
        for pk in ("a", "b"):
            materialize([shard, decodable], instance=instance, partition_key=pk, raise_on_error=False)
        materialize([shard], instance=instance, partition_key="c",
                    selection=[shard.key])  # made without its check
        found = check_problems(instance, [AssetCheckKey.from_user_string("shard:decodable")])
    problems = [str(p) for p in found]
    assert problems == ["shard:decodable[b] failed",
                        "shard:decodable[c] did not run on the latest materialization"]
    registry = registry_for(tracking)
    v1 = _register(registry, tmp_path, metrics(1), "a")
    decision, _ = registry.promote("blip-med", v1, metrics(9), metrics(0), problems, PromotionRule())
    assert not decision.promote and "shard:decodable[b] failed" in decision.reason
    assert registry.alias_version("blip-med", CHAMPION) is None


# --- concurrent promotions from several processes --------------------------------------------

RACE_DELTAS = (0.5, 3.0, 1.5, 4.0, 2.0, 0.8)  # the champion is at delta 1.0: two are worse


def _race(uri: str, lock_path: str | None, source: str, delta: float, start: Any, out: Any) -> None:
    """One promoter process: register a model and promote it, at the same moment as the others."""
    import traceback

    from mlflow.tracking import MlflowClient

    registry = Registry(MlflowClient(uri), Path(lock_path) if lock_path else None, lock_timeout_s=120)
    start.wait()
    try:
        version = registry.register(source, "blip-med", metrics(delta), tags={"data_version": str(delta)})
        decision, previous = registry.promote("blip-med", version.version, metrics(delta), metrics(0), [],
                                              PromotionRule())
        out.put((delta, str(version.version), decision.promote, decision.reason, previous))
    except Exception:
        out.put((delta, None, False, traceback.format_exc(), None))


@pytest.mark.slow  # six promoter processes (forkserver, MLflow imports) per case
@pytest.mark.parametrize("machines", ["one machine", "several machines"])
def test_promotions_racing_in_processes_leave_the_best_champion(tracking: MlflowResource, tmp_path: Path,
                                                                 machines: str):
    """Six processes register and promote at once; "several machines" drops the file lock, so
    only the lock in the registry serialises them (as for promoters on different machines)."""
    import multiprocessing as mp
    import queue

    from mlflow.exceptions import MlflowException

    from resources.mlflow_registry import LOCK_SUFFIX

    registry, client = registry_for(tracking), tracking.client()
    v1 = _register(registry, tmp_path, metrics(1.0), "initial")
    assert registry.promote("blip-med", v1, metrics(1.0), metrics(0), [], PromotionRule())[0].promote
    source = tmp_path / "models" / "initial"
    lock_path = str(registry.lock_path) if machines == "one machine" else None

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["resources.mlflow_registry", "test_promotion"])
    start, out = ctx.Barrier(len(RACE_DELTAS)), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tracking.resolved_tracking_uri(), lock_path, str(source), d,
                                             start, out)) for d in RACE_DELTAS]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            delta, version, promoted, reason, previous = out.get(timeout=240)
            assert version is not None, reason  # the promoter's traceback
            results[version] = {"delta": delta, "promoted": promoted, "reason": reason, "previous": previous}
    except queue.Empty:
        pytest.fail(f"only {len(results)} of {len(procs)} promoters reported")
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(procs)

    delta = {v1: 1.0, **{v: r["delta"] for v, r in results.items()}}
    model = client.get_registered_model("blip-med")
    best = max(results, key=lambda v: results[v]["delta"])
    assert str(model.aliases[CHAMPION]) == best  # one alias, one champion: the best
    assert str(model.aliases[CHALLENGER]) == max(results, key=int)  # the newest version
    promoted = {v for v, r in results.items() if r["promoted"]}
    # Each promotion was decided against the champion of its moment: the promoted versions form
    # one chain back to v1 through previous_champion, each better than the one before.
    chain, version = [], best
    while version != v1:
        chain.append(version)
        version = client.get_model_version("blip-med", version).tags["previous_champion"]
    assert set(chain) == promoted and len(chain) == len(promoted)
    for newer, older in zip(chain, [*chain[1:], v1], strict=True):
        assert delta[newer] > delta[older] and results[newer]["previous"] == older
    for v, r in results.items():
        tags = client.get_model_version("blip-med", v).tags
        assert tags["promotion.decision"] == ("champion" if r["promoted"] else "rejected")
        assert tags["promotion.reason"] == r["reason"]
        if not r["promoted"]:  # lost against a champion at least as good
            against = r["reason"].split("does not beat champion v")[1].split()[0]
            assert against == r["previous"] and delta[against] >= r["delta"]
    assert all(not results[v]["promoted"] for v in results if results[v]["delta"] < 1.0)
    with pytest.raises(MlflowException):  # the registry lock was released
        client.get_registered_model(f"blip-med{LOCK_SUFFIX}")
    order = " -> ".join(f"v{v}({delta[v]:+g})" for v in [v1, *reversed(chain)])
    print(f"{machines}: {len(procs)} processes raced, {len(promoted)} promoted, "
          f"{len(results) - len(promoted)} rejected, champions after: {list(model.aliases).count(CHAMPION)} "
          f"(v{best}); chain {order}")


def test_a_dead_holders_registry_lock_is_taken_over_and_a_live_one_waited_for(tracking: MlflowResource,
                                                                               tmp_path: Path):
    from resources.mlflow_registry import LOCK_SUFFIX

    client = tracking.client()
    v1 = _register(registry_for(tracking), tmp_path, metrics(1), "a")
    client.create_registered_model(f"blip-med{LOCK_SUFFIX}", tags={"owner": "elsewhere:1"})
    patient = Registry(client, None, lock_timeout_s=1.0, lock_stale_s=3600.0)
    with pytest.raises(TimeoutError, match="held by elsewhere:1"):
        patient.promote("blip-med", v1, metrics(1), metrics(0), [], PromotionRule())
    assert patient.alias_version("blip-med", CHAMPION) is None
    stale = Registry(client, None, lock_timeout_s=1.0, lock_stale_s=0.0)  # its holder is gone
    assert stale.promote("blip-med", v1, metrics(1), metrics(0), [], PromotionRule())[0].promote
    assert stale.alias_version("blip-med", CHAMPION) == v1


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_walks_back_the_champions_and_refuses_what_never_was_one(
        tracking: MlflowResource, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    registry = registry_for(tracking)
    args = ["--model", "blip-med", "--data", tracking.data_dir]
    assert main(["rollback", *args]) == 1
    assert "has no champion to roll back" in capsys.readouterr().err
    versions = {}
    for d in (1.0, 2.0, 0.5, 3.0):  # v3 (0.5) is rejected
        v = _register(registry, tmp_path, metrics(d), f"m{d}")
        versions[d] = v
        registry.promote("blip-med", v, metrics(d), metrics(0), [], PromotionRule())
    v1, v2, rejected, v4 = versions[1.0], versions[2.0], versions[0.5], versions[3.0]
    assert registry.alias_version("blip-med", CHAMPION) == v4

    assert main(["rollback", *args, "--to", rejected]) == 1  # the gate rejected it: never champion
    assert f"v{rejected} was never champion" in capsys.readouterr().err
    assert main(["rollback", *args, "--to", v4]) == 1
    assert "already the champion" in capsys.readouterr().err
    assert main(["rollback", *args, "--to", "99"]) == 1
    assert registry.alias_version("blip-med", CHAMPION) == v4

    assert main(["rollback", *args]) == 0 and registry.alias_version("blip-med", CHAMPION) == v2
    assert main(["rollback", *args]) == 0 and registry.alias_version("blip-med", CHAMPION) == v1
    assert f"v{v2} -> v{v1}" in capsys.readouterr().out
    assert main(["rollback", *args]) == 1  # v1 was the first champion
    assert "records no previous champion" in capsys.readouterr().err
    assert registry.alias_version("blip-med", CHAMPION) == v1

    assert main(["status", *args]) == 0
    out = capsys.readouterr().out
    history = {str(v["version"]): v for v in json.loads(out[out.index("{"):])["versions"]}
    assert [history[v]["decision"] for v in (v1, v2, rejected, v4)] == ["champion", "champion",
                                                                        "rejected", "champion"]
    assert "does not beat champion v" in history[rejected]["reason"]
    assert history[v4]["rolled_back"] and history[v2]["restored_from"] == v4
    assert history[v2]["rolled_back"] and history[v1]["restored_from"] == v2

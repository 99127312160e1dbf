"""The lineage materialized in-process on a tiny shapes world: data, metadata and checks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_RUN_CONFIG, TINY_WORLD, leaky_human_world
from dagster import AssetKey, DagsterInstance, DagsterInvalidConfigError, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from assets.checks import CORPUS_CHECKS, HUMAN_CHECKS, WEB_CHECKS, ShardPolicy
from blip_core.recipe import load_recipe
from orchestration.definitions import build_resources
from orchestration.main import (
    check_run_config,
    lineage_definitions,
    lineage_run_config,
    materialize_lineage,
    register_shards,
    split_run_config,
    summary,
)
from resources.launcher import LocalLauncher
from resources.storage import LocalStorage, dataset_key

ASSET_KEYS = ["web_shards", "human_pairs", "pretrained_med", "captioner", "filter", "synthetic_captions",
              "bootstrapped_corpus", "bootstrapped_med", "downstream_evals"]


def _setup(root: Path, world: Path) -> tuple[LocalStorage, dict[str, Any], DagsterInstance]:
    storage = LocalStorage(root=str(root))
    storage.publish_dir(world, "landing")
    resources = build_resources(storage, str(root), launcher=LocalLauncher(), dvc_push=False)
    instance = DagsterInstance.ephemeral()
    register_shards(instance, storage)
    return storage, resources, instance


def _materializations(result: Any) -> dict[str, Any]:
    return {e.asset_key.to_user_string(): e.materialization
            for e in result.get_asset_materialization_events()}


def _checks(result: Any) -> dict[str, Any]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e
            for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> dict[str, Any]:
    storage, resources, instance = _setup(tmp_path_factory.mktemp("data"), tiny_world)
    start = time.monotonic()
    result = materialize_lineage(instance, resources, TINY_RUN_CONFIG)
    return {"storage": storage, "resources": resources, "instance": instance, "result": result,
            "seconds": time.monotonic() - start}


def test_defs_load_with_every_asset_and_check():
    from orchestration.definitions import defs

    graph = defs().resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} >= set(ASSET_KEYS)
    checks = {k.to_user_string() for k in graph.asset_check_keys}
    assert checks >= {f"web_shards:{c}" for c in WEB_CHECKS} | {f"human_pairs:{c}" for c in HUMAN_CHECKS} \
        | {f"bootstrapped_corpus:{c}" for c in CORPUS_CHECKS}
    assert all(graph.get_check_spec(k).blocking for k in graph.asset_check_keys
               if k.asset_key.to_user_string() in ("web_shards", "human_pairs", "bootstrapped_corpus"))
    assert {"web_shards_job", "bootstrap_job"} <= {j.name for j in defs().resolve_all_job_defs()}


@pytest.mark.slow  # the `lineage` fixture: a whole (tiny) lineage
def test_web_shards_one_partition_per_shard_with_passing_checks(lineage):
    runs = lineage["result"].shard_runs
    assert sorted(runs) == ["00000.tar", "00001.tar"]
    for pk, run in runs.items():
        assert run.success
        mat = _materializations(run)["web_shards"]
        assert mat.partition == pk
        meta = mat.metadata
        assert meta["kept"].value + meta["quarantined"].value == TINY_WORLD["shard_size"]
        assert meta["quarantine_ratio"].value == 0.0
        key = dataset_key(["web_shards"], pk)
        assert meta["data_version"].value == lineage["storage"].version(key)
        assert mat.tags["dagster/data_version"] == lineage["storage"].version(key)
        checks = _checks(run)
        assert {c.split(":")[1] for c in checks} == set(WEB_CHECKS)
        assert all(c.passed for c in checks.values())
        assert checks["web_shards:quarantine_ratio"].metadata["quarantine_ratio"].value == 0.0
        assert checks["web_shards:decodable_images"].metadata["samples"].value == meta["kept"].value


@pytest.mark.slow  # the `lineage` fixture: a whole (tiny) lineage
def test_lineage_materializes_every_asset_with_metadata(lineage):
    run = lineage["result"].main_run
    assert run is not None and run.success
    mats = _materializations(run)
    assert set(mats) == set(ASSET_KEYS) - {"web_shards"} | {"registered_model"}
    print(f"lineage on the tiny world: {lineage['seconds']:.1f}s")

    human = mats["human_pairs"].metadata
    assert human["images_per_split"].value == {"train": 40, "val": 8, "test": 16}
    for name in ("pretrained_med", "captioner", "filter", "bootstrapped_med"):
        meta = mats[name].metadata
        assert meta["steps"].value == 2
        assert meta["loss_curve"].value.startswith("![")
        assert "data:image/png;base64," in meta["loss_curve"].value
        assert meta["reused"].value is False
        assert lineage["storage"].exists(dataset_key([name]))
        assert meta["mlflow_run_id"].value  # tracked, with its model logged
    assert "final_lm" in mats["captioner"].metadata and "final_itm" in mats["filter"].metadata
    assert "final_lm" not in mats["filter"].metadata  # the filter trains ITC + ITM only

    synthetic = mats["synthetic_captions"].metadata
    assert synthetic["images"].value == TINY_WORLD["n_web"]

    corpus = mats["bootstrapped_corpus"].metadata
    assert corpus["dvc_md5"].value.endswith(".dir")  # versioned with DVC
    counts = corpus["counts"].value
    assert counts["web_kept"] + counts["web_removed"] == TINY_WORLD["n_web"]
    assert counts["human"] == 5 * TINY_WORLD["n_human_train"]
    # the recipe scores the synthetic captions but leaves them out of the corpus (use_synthetic)
    assert corpus["use_synthetic"].value is False and counts["synthetic_kept"] > 0
    assert corpus["samples"].value == counts["human"] + counts["web_kept"]
    # the noise ratio is the share of the web texts the filter removed (known from the counts)
    assert corpus["web_noise_ratio"].value == pytest.approx(counts["web_removed"] / TINY_WORLD["n_web"],
                                                          abs=1e-4)
    assert "filter_precision" in corpus and "data:image/png" in corpus["noise_ratios"].value

    evals = mats["downstream_evals"].metadata
    assert set(evals["baseline"].value) >= {"tr@1", "tr@5", "ir@1", "ir@5", "bleu4", "cider"}
    assert "data:image/png;base64," in evals["comparison_plot"].value
    report = lineage["storage"].read_json(f"{dataset_key(['downstream_evals'])}/report.json")
    assert report["corpus"] == {k: counts[k] for k in ("human", "web_kept", "web_removed", "synthetic_kept",
                                                       "synthetic_removed")} | {"use_synthetic": False}
    assert report["versions"]["baseline"] == \
        lineage["storage"].version(dataset_key(["pretrained_med"]))
    registered = mats["registered_model"].metadata  # promotion ran on top of the lineage
    assert registered["model_name"].value == "blip-med" and registered["version"].value == 1

    text = summary(lineage["storage"], lineage["result"], lineage["seconds"])
    for line in ("| tr@1 |", "noise ratio (share removed by the filter): web", "filter vs the world's truth",
                 "blip-med v1", "checks (15 passed, 0 failed)", "status: SUCCESS"):
        assert line in text, text


@pytest.mark.slow  # the `lineage` fixture: a whole (tiny) lineage
def test_lineage_checks_pass_with_observed_values(lineage):
    checks = _checks(lineage["result"].main_run)
    assert set(checks) == {f"human_pairs:{c}" for c in HUMAN_CHECKS} | \
        {f"bootstrapped_corpus:{c}" for c in CORPUS_CHECKS}
    assert all(c.passed for c in checks.values())
    leak = checks["bootstrapped_corpus:no_eval_leak"].metadata
    assert leak["eval_images"].value == TINY_WORLD["n_human_val"] + TINY_WORLD["n_human_test"]
    assert leak["leaked_samples"].value == 0
    # TINY_RUN_CONFIG widens the band to [0, 1] (a 2-step filter removes texts at random): the
    # check must report that band and the ratio the corpus really has, not a pass on its own.
    web = checks["bootstrapped_corpus:web_noise_ratio_in_band"].metadata
    counts = _materializations(lineage["result"].main_run)["bootstrapped_corpus"].metadata["counts"].value
    assert web["band"].value == [0.0, 1.0]
    assert web["noise_ratio"].value == pytest.approx(counts["web_removed"] / TINY_WORLD["n_web"], abs=1e-4)
    split = checks["human_pairs:splits_disjoint"].metadata
    assert split["images_in_several_splits"].value == 0


@pytest.mark.slow  # the `lineage` fixture: a whole (tiny) lineage
def test_rematerialising_with_same_inputs_reuses_the_output(lineage):
    storage = lineage["storage"]
    before = storage.version(dataset_key(["captioner"]))
    result = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["captioner"], instance=lineage["instance"],
                         resources=lineage["resources"],
                         run_config=split_run_config(TINY_RUN_CONFIG, ["captioner"]))
    meta = _materializations(result)["captioner"].metadata
    assert meta["reused"].value is True and meta["data_version"].value == before
    assert meta["loss_curve"].value.startswith("![")  # rebuilt from the checkpoint's history


@pytest.mark.slow  # the `lineage` fixture: a whole (tiny) lineage
def test_corpus_outside_the_noise_band_stops_downstream(lineage):
    """A filter that removes every text (threshold 1) fails the band; nothing below runs."""
    storage, instance, resources = lineage["storage"], lineage["instance"], lineage["resources"]
    good_med = storage.version(dataset_key(["bootstrapped_med"]))
    config = split_run_config(TINY_RUN_CONFIG, ["bootstrapped_med", "downstream_evals"])
    config["ops"]["bootstrapped_corpus"] = {"config": {"threshold": 1.0, "batch_size": 40}}
    result = materialize([*ALL_ASSETS, *ALL_CHECKS],
                         selection=["bootstrapped_corpus", "bootstrapped_med", "downstream_evals"],
                         instance=instance, resources=resources, run_config=config, raise_on_error=False)
    assert not result.success
    checks = _checks(result)
    band = checks["bootstrapped_corpus:web_noise_ratio_in_band"]
    assert not band.passed and band.metadata["noise_ratio"].value == 1.0
    assert band.metadata["band"].value == [0.15, 0.75]  # the defaults
    assert not checks["bootstrapped_corpus:synthetic_noise_ratio_in_band"].passed
    assert checks["bootstrapped_corpus:not_empty"].passed  # human pairs are still there
    assert set(_materializations(result)) == {"bootstrapped_corpus"}
    assert storage.version(dataset_key(["bootstrapped_med"])) == good_med

    # A later run of the downstream asset alone is refused as well.
    later = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["bootstrapped_med"], instance=instance,
                        resources=resources, raise_on_error=False,
                        run_config=split_run_config(TINY_RUN_CONFIG, ["bootstrapped_med"]))
    assert not later.success
    failure = next(e for e in later.all_events if e.is_step_failure)
    assert "web_noise_ratio_in_band failed" in failure.step_failure_data.error.message
    assert instance.get_latest_materialization_event(AssetKey("bootstrapped_med")).run_id not in \
        {result.run_id, later.run_id}


def _land_failed_shards(storage: LocalStorage) -> None:
    """Beside the good shards: one where every download failed, as img2dataset writes it (an
    empty tar, a parquet of failed rows, its stats), and one that is not a tar at all."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    web = storage.path("landing/web")
    with tarfile.open(web / "00098.tar", "w"):
        pass
    rows = [{"key": f"0009800{i:02d}", "url": f"http://x.invalid/{i}.jpg", "caption": "a red circle",
             "status": "failed_to_download", "error_message": "HTTP Error 404"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), web / "00098.parquet")
    (web / "00098_stats.json").write_text(json.dumps({"count": 5, "successes": 0, "failed_to_download": 5}))
    (web / "00099.tar").write_bytes(b"this is not a tar archive" * 100)
    (web / "00099_stats.json").write_text(json.dumps({"count": 0, "successes": 0}))


@pytest.mark.slow  # a whole (tiny) lineage
def test_failed_shards_are_left_out_with_their_reasons_and_training_goes_on(tmp_path, tiny_world):
    storage, resources, instance = _setup(tmp_path / "data", tiny_world)
    _land_failed_shards(storage)
    assert register_shards(instance, storage) == ["00098.tar", "00099.tar"]
    result = materialize_lineage(instance, resources, TINY_RUN_CONFIG)

    assert result.failed_shards == ["00098.tar", "00099.tar"]
    empty = _checks(result.shard_runs["00098.tar"])
    assert not empty["web_shards:decodable_images"].passed  # nothing to train on
    assert empty["web_shards:decodable_images"].metadata["samples"].value == 0
    assert empty["web_shards:quarantine_ratio"].passed  # nothing was quarantined either
    asset_ratio = _materializations(result.shard_runs["00098.tar"])["web_shards"].metadata["quarantine_ratio"]
    assert asset_ratio.value == empty["web_shards:quarantine_ratio"].metadata["quarantine_ratio"].value == 0.0
    junk = _checks(result.shard_runs["00099.tar"])
    assert junk["web_shards:quarantine_ratio"].metadata["by_reason"].value == {"unreadable_tar": 1}

    assert result.success  # the retraining went on with the two good shards
    meta = _materializations(result.main_run)["pretrained_med"].metadata
    assert meta["web_shards_used"].value == 2 and meta["web_shards_excluded"].value == 2
    excluded = meta["excluded_shards"].value
    assert sorted(excluded) == ["00098.tar", "00099.tar"]
    assert "check decodable_images failed" in excluded["00098.tar"]
    assert "check quarantine_ratio failed" in excluded["00099.tar"]
    assert sorted(meta["inputs"].value) == ["human_pairs", "web_shards[00000.tar]", "web_shards[00001.tar]"]
    text = summary(storage, result, 1.0)
    assert "## web shards left out of training (2)" in text
    assert f"- 00098.tar: {excluded['00098.tar']}" in text and "status: SUCCESS" in text

    strict = {**resources, "shard_policy": ShardPolicy(mode="strict")}
    refused = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["pretrained_med"], instance=instance,
                          resources=strict, raise_on_error=False,
                          run_config=split_run_config(TINY_RUN_CONFIG, ["pretrained_med"]))
    failure = next(e for e in refused.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    assert "strict shard policy" in message and "web_shards[00099.tar]: check" in message
    few = {**resources, "shard_policy": ShardPolicy(min_good_share=0.75)}
    refused = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["pretrained_med"], instance=instance,
                          resources=few, raise_on_error=False,
                          run_config=split_run_config(TINY_RUN_CONFIG, ["pretrained_med"]))
    assert "fewer than 75% of the shards passed" in next(
        e for e in refused.all_events if e.is_step_failure).step_failure_data.error.message


def test_checks_fail_with_their_observed_values(tmp_path, tiny_world):
    """A test image duplicated into train under another name, and captions over a tight bound."""
    storage, resources, instance = _setup(tmp_path / "data", leaky_human_world(tmp_path, tiny_world))
    everything = [*ALL_ASSETS, *ALL_CHECKS]

    human = materialize(everything, selection=["human_pairs"], instance=instance, resources=resources,
                        raise_on_error=False)
    check = _checks(human)["human_pairs:splits_disjoint"]
    assert not check.passed and check.metadata["images_in_several_splits"].value == 1

    config = {"ops": {"web_shard_checks": {"config": {"max_caption_chars": 12}}}}
    shard = materialize(everything, selection=["web_shards"], partition_key="00000.tar", instance=instance,
                        resources=resources, run_config=config, raise_on_error=False)
    checks = _checks(shard)
    length = checks["web_shards:caption_length"]
    assert not length.passed and length.metadata["max_chars"].value > 12
    assert length.metadata["bounds"].value == [1, 12]
    assert all(checks[f"web_shards:{c}"].passed for c in WEB_CHECKS if c != "caption_length")


def test_run_configs_are_checked_before_anything_runs(tmp_path, tiny_world):
    _, resources, instance = _setup(tmp_path / "data", tiny_world)
    defs = lineage_definitions(resources)
    jobs = [defs.resolve_job_def("web_shards_job"), defs.resolve_job_def("bootstrap_job")]
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:  # every shipped recipe, as the main command runs it, is a valid run config
        config = lineage_run_config(load_recipe(recipe))
        shard_part, main_part = check_run_config(config, *jobs)
        assert set(shard_part["ops"]) | set(main_part["ops"]) == set(config["ops"]), recipe.name
    with pytest.raises(ValueError, match=r"unknown ops \['pretrained_mde'\]"):  # a typo was ignored
        materialize_lineage(instance, resources, {"ops": {"pretrained_mde": {"config": {"max_steps": 5}}}})
    with pytest.raises(DagsterInvalidConfigError, match="max_stepz"):
        materialize_lineage(instance, resources, {"ops": {"pretrained_med": {"config": {"max_stepz": 5}}}})
    with pytest.raises(ValueError, match="ops: "):
        materialize_lineage(instance, resources, {"pretrained_med": {"config": {"max_steps": 5}}})
    assert not instance.get_runs()  # each was refused before any run started

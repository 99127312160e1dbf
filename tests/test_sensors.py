"""The landing sensor and the retraining schedule, driven on real files and a real instance."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
)

from orchestration.schedules import RETRAIN_JOB, build_retrain_schedule, retrain_schedule
from orchestration.sensors import WEB_SHARDS_JOB, landing_sensor
from resources.storage import LocalStorage, S3Storage


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:  # a real (temporary) instance, as the daemon's
        yield inst


def _land(world: Path, landing: Path, index: int) -> str:
    """Lands a complete img2dataset shard as ``{index:05d}.tar``: the tar, then its _stats.json."""
    shards = sorted((world / "web").glob("*.tar"))
    src, name = shards[index % len(shards)], f"{index:05d}.tar"
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, landing / name)
    shutil.copy(src.with_name(f"{src.stem}_stats.json"), landing / f"{index:05d}_stats.json")
    return name


def _tick(instance: DagsterInstance, storage: object, cursor: str | None) -> SensorResult:
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage})
    return landing_sensor(context)


def _version(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def test_new_shards_become_partitions_and_ingestion_runs(instance, tiny_world: Path, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    empty = _tick(instance, storage, None)
    assert empty.run_requests == [] and "0 landed" in str(empty.skip_reason)  # nothing landed yet

    first = [_land(tiny_world, landing, i) for i in (0, 1)]
    (landing / "notes.txt").write_text("not a shard")
    result = _tick(instance, storage, None)
    versions = {k: _version(landing / k) for k in first}
    assert [r.partition_key for r in result.run_requests] == first
    assert [r.run_key for r in result.run_requests] == [f"web_shards:{k}:{versions[k]}" for k in first]
    assert [r.tags["blip-ops/source_version"] for r in result.run_requests] == list(versions.values())
    [add] = result.dynamic_partitions_requests
    assert add.partitions_def_name == "web_shards" and list(add.partition_keys) == first
    assert json.loads(result.cursor) == {"requested": versions, "pending": {}}
    instance.add_dynamic_partitions("web_shards", list(add.partition_keys))  # as the daemon does

    again = _tick(instance, storage, result.cursor)  # same files: nothing new
    assert again.run_requests == [] and again.skip_reason is not None
    third = _land(tiny_world, landing, 2)
    result = _tick(instance, storage, result.cursor)
    assert [r.partition_key for r in result.run_requests] == [third]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == [third]


def test_known_partitions_are_not_added_twice(instance, tiny_world: Path, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    name = _land(tiny_world, tmp_path / "data" / "landing" / "web", 0)
    instance.add_dynamic_partitions("web_shards", [name])  # e.g. added by hand in the UI
    result = _tick(instance, storage, None)
    assert [r.partition_key for r in result.run_requests] == [name]
    assert result.dynamic_partitions_requests == []


def test_s3_landing_prefix(instance, tiny_world: Path, s3_env: str):
    import boto3

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="landing-test")
    storage = S3Storage(bucket="landing-test", prefix="team/blip", endpoint_url=s3_env)
    shard = sorted((tiny_world / "web").glob("*.tar"))[0]
    client = boto3.client("s3", endpoint_url=s3_env)
    client.upload_file(str(shard), "landing-test", "team/blip/landing/web/00007.tar")
    client.put_object(Bucket="landing-test", Key="team/blip/landing/web/readme.md", Body=b"x")
    first = _tick(instance, storage, None)  # no _stats.json: ready once seen unchanged twice
    assert first.run_requests == [] and list(json.loads(first.cursor)["pending"]) == ["00007.tar"]
    result = _tick(instance, storage, first.cursor)
    [request] = result.run_requests
    etag = client.head_object(Bucket="landing-test", Key="team/blip/landing/web/00007.tar")["ETag"]
    assert request.partition_key == "00007.tar"
    assert request.run_key == f"web_shards:00007.tar:{shard.stat().st_size}-{etag.strip(chr(34))}"


def test_sensor_targets_the_job_that_ingests_one_web_shard_partition():
    """The job the deployed sensor names exists in ``defs``, materializes ``web_shards`` alone
    (per partition) and is partitioned by the dynamic partitions the sensor adds."""
    from orchestration.definitions import defs

    deployed = defs()
    sensor = deployed.resolve_sensor_def(landing_sensor.name)
    job = deployed.resolve_job_def(sensor.job_name)
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"web_shards"}
    assert job.partitions_def is not None and job.partitions_def.name == "web_shards"
    assert job.name == WEB_SHARDS_JOB  # the name the sensor's run requests and the tests use


# --- retraining schedule ----------------------------------------------------------------------


def _schedule_tick(instance: DagsterInstance) -> RunRequest | SkipReason:
    when = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.UTC)
    return retrain_schedule(build_schedule_context(instance=instance, scheduled_execution_time=when))


def _materialize(instance: DagsterInstance, asset: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(AssetMaterialization(asset_key=asset, partition=partition))


def test_retrain_only_when_new_shards_landed_since_the_last_training(instance):
    skip = _schedule_tick(instance)
    assert isinstance(skip, SkipReason) and "no web shards" in skip.skip_message

    instance.add_dynamic_partitions("web_shards", ["00000.tar", "00001.tar"])
    _materialize(instance, "web_shards", "00000.tar")
    _materialize(instance, "web_shards", "00001.tar")
    request = _schedule_tick(instance)
    assert isinstance(request, RunRequest)
    assert request.tags["blip-ops/new_shards"] == "2"

    _materialize(instance, "bootstrapped_med")
    skip = _schedule_tick(instance)
    assert isinstance(skip, SkipReason)
    assert "no new shards since the last bootstrapped_med materialization" in skip.skip_message

    instance.add_dynamic_partitions("web_shards", ["00002.tar"])
    _materialize(instance, "web_shards", "00002.tar")
    request2 = _schedule_tick(instance)
    assert isinstance(request2, RunRequest) and request2.tags["blip-ops/new_shards"] == "1"
    assert request2.run_key != request.run_key


def test_retrain_skips_while_a_retraining_run_is_in_progress(instance):
    instance.add_dynamic_partitions("web_shards", ["00000.tar"])
    _materialize(instance, "web_shards", "00000.tar")
    instance.add_run(DagsterRun(job_name=RETRAIN_JOB, run_id="a" * 36, status=DagsterRunStatus.STARTED))
    skip = _schedule_tick(instance)
    assert isinstance(skip, SkipReason) and "already in progress" in skip.skip_message


def test_schedule_is_off_by_default_and_its_cron_configurable(monkeypatch: pytest.MonkeyPatch):
    assert retrain_schedule.default_status == DefaultScheduleStatus.STOPPED
    from orchestration.definitions import defs

    deployed = defs()
    retrain = deployed.resolve_job_def(deployed.resolve_schedule_def(retrain_schedule.name).job_name)
    assert retrain.name == RETRAIN_JOB  # the job whose runs the schedule looks for (in progress)
    trained = {k.to_user_string() for k in retrain.asset_layer.executable_asset_keys}
    assert "web_shards" not in trained  # the shards are ingested by the sensor's job, not again
    assert {"pretrained_med", "bootstrapped_corpus", "bootstrapped_med", "downstream_evals"} <= trained
    monkeypatch.setenv("BLIP_OPS_RETRAIN_CRON", "*/30 * * * *")
    assert build_retrain_schedule().cron_schedule == "*/30 * * * *"
    assert build_retrain_schedule("0 4 * * 1", running=True).default_status == DefaultScheduleStatus.RUNNING

"""The landing protocol on real files: shards being written are never read, content versions."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_WORLD
from dagster import DagsterInstance, SensorResult, build_sensor_context, instance_for_test, materialize

from assets.data import web_shards
from blip_core.data.formats import RawSample, iter_shard
from orchestration.definitions import build_resources
from orchestration.main import land_shapes_world, lineage_definitions, register_shards
from orchestration.sensors import landing_sensor
from resources.landing import SOURCE_VERSION, TAR_END, landed_shards
from resources.launcher import LocalLauncher
from resources.storage import LocalStorage, S3Storage, StorageResource


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as inst:
        yield inst


def _tick(instance: DagsterInstance, storage: StorageResource, cursor: str | None) -> SensorResult:
    """One sensor evaluation; its dynamic partitions are added as the daemon would."""
    result = landing_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                 resources={"storage": storage}))
    for add in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    return result


def _shard(world: Path, index: int) -> Path:
    return sorted((world / "web").glob("*.tar"))[index]


def _keys(tar: Path) -> list[str]:
    return [s.key for s in iter_shard(tar) if isinstance(s, RawSample)]


def _ingest(instance: DagsterInstance, storage: StorageResource, root: Path, shard: str,
            tags: dict[str, str] | None = None) -> Any:
    resources = build_resources(storage, str(root), launcher=LocalLauncher(), dvc_push=False)
    return materialize([web_shards], partition_key=shard, resources=resources, instance=instance,
                       tags=tags, raise_on_error=False)


def test_a_shard_being_downloaded_is_requested_once_complete_and_ingested_whole(
        instance, tiny_world: Path, tmp_path: Path):
    """img2dataset's order: the tar under its final name, chunk by chunk, then parquet, then stats."""
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    src = _shard(tiny_world, 0)
    data, chunks = src.read_bytes(), 8
    cursor = None
    with open(landing / "00000.tar", "wb") as f:
        for i in range(chunks):
            f.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            f.flush()
            result = _tick(instance, storage, cursor)
            cursor = result.cursor
            assert result.run_requests == [], f"requested after chunk {i + 1}/{chunks}"
            assert list(json.loads(cursor)["pending"]) == ["00000.tar"]
    shutil.copy(src.with_suffix(".parquet"), landing / "00000.parquet")
    shutil.copy(src.with_name(f"{src.stem}_stats.json"), landing / "00000_stats.json")

    result = _tick(instance, storage, cursor)  # stats.json: complete, no second look needed
    [request] = result.run_requests
    assert request.partition_key == "00000.tar"
    for _ in range(2):
        result = _tick(instance, storage, result.cursor)
        assert result.run_requests == []

    run = _ingest(instance, storage, tmp_path / "data", "00000.tar", dict(request.tags))
    assert run.success
    meta = run.asset_materializations_for_node("web_shards")[0].metadata
    every = _keys(src)
    assert len(every) == TINY_WORLD["shard_size"]
    assert meta["kept"].value + meta["quarantined"].value == len(every)
    with storage.local_dir("assets/web_shards/00000.tar") as out:
        assert _keys(out / "00000.tar") == every
    assert meta[SOURCE_VERSION].value == request.tags["blip-ops/source_version"]


def test_a_shard_without_stats_is_ready_once_closed_and_unchanged_over_two_ticks(
        instance, tiny_world: Path, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    data = _shard(tiny_world, 1).read_bytes()
    half = len(data) // 2
    assert data[half - 1024:half] != TAR_END and data[-1024:] == TAR_END  # only the whole tar is closed
    (landing / "00005.tar").write_bytes(data[:half])
    first = _tick(instance, storage, None)
    assert first.run_requests == [] and "waiting for 1" in str(first.skip_reason)
    stalled = _tick(instance, storage, first.cursor)  # unchanged, but no end-of-archive marker
    assert stalled.run_requests == [] and "waiting for 1" in str(stalled.skip_reason)
    with open(landing / "00005.tar", "ab") as f:  # the download goes on and the tar is closed
        f.write(data[half:])
    grown = _tick(instance, storage, stalled.cursor)
    assert grown.run_requests == []
    ready = _tick(instance, storage, grown.cursor)  # closed and unchanged since the last tick
    assert [r.partition_key for r in ready.run_requests] == ["00005.tar"]
    assert _tick(instance, storage, ready.cursor).run_requests == []


def test_a_relanded_shard_with_new_content_is_a_new_version(instance, tiny_world: Path, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    a, b = _shard(tiny_world, 0), _shard(tiny_world, 1)
    shutil.copy(a, landing / "00000.tar")
    shutil.copy(a.with_name(f"{a.stem}_stats.json"), landing / "00000_stats.json")
    first = _tick(instance, storage, None)
    [v1] = first.run_requests
    cursor = first.cursor
    assert _tick(instance, storage, cursor).run_requests == []  # the same content: not again

    shutil.copyfile(b, landing / "00000.tar")  # re-landed: the old stats.json is now older than it
    stale = landing / "00000_stats.json"
    os.utime(stale, ns=(stale.stat().st_atime_ns, (landing / "00000.tar").stat().st_mtime_ns - 10**9))
    pending = _tick(instance, storage, cursor)
    assert pending.run_requests == [] and "waiting for 1" in str(pending.skip_reason)
    shutil.copyfile(b.with_name(f"{b.stem}_stats.json"), stale)  # img2dataset's last write
    [v2] = _tick(instance, storage, pending.cursor).run_requests
    assert v2.partition_key == "00000.tar" and v2.run_key != v1.run_key
    assert v2.tags["blip-ops/source_version"] == landed_shards(storage)["00000.tar"].version

    late = _ingest(instance, storage, tmp_path / "data", "00000.tar", dict(v1.tags))  # v1's run, late
    assert not late.success  # it reads nothing of v2 under v1's name
    failure = next(e for e in late.all_events if e.is_step_failure)
    assert f"not {v1.tags['blip-ops/source_version']}" in failure.step_failure_data.error.message


def test_s3_same_bytes_same_version_new_bytes_new_version(instance, tiny_world: Path, s3_env: str):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="relanding")
    storage = S3Storage(bucket="relanding", prefix="p", endpoint_url=s3_env)

    def land(src: Path) -> None:
        client.upload_file(str(src), "relanding", "p/landing/web/00000.tar")
        client.upload_file(str(src.with_name(f"{src.stem}_stats.json")), "relanding",
                           "p/landing/web/00000_stats.json")

    land(_shard(tiny_world, 0))
    result = _tick(instance, storage, None)
    [first] = result.run_requests
    cursor = result.cursor
    land(_shard(tiny_world, 0))  # uploaded again, same bytes: same ETag
    assert _tick(instance, storage, cursor).run_requests == []
    land(_shard(tiny_world, 1))
    [second] = _tick(instance, storage, cursor).run_requests
    assert second.run_key != first.run_key


def test_old_list_cursor_adopts_what_is_landed(instance, tiny_world: Path, tmp_path: Path):
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    shutil.copy(_shard(tiny_world, 0), landing / "00000.tar")
    result = _tick(instance, storage, json.dumps(["00000.tar"]))
    assert result.run_requests == []
    version = landed_shards(storage)["00000.tar"].version
    assert json.loads(result.cursor)["requested"] == {"00000.tar": version}


@pytest.mark.slow  # the main command's landing and shard runs first
def test_sensor_after_the_main_command_requests_nothing(instance, tmp_path: Path):
    """``make run`` twice (land, register, ingest each shard), then a sensor tick: nothing to do."""
    storage = LocalStorage(root=str(tmp_path / "data"))
    assert land_shapes_world(storage, **TINY_WORLD).landed
    shards = register_shards(instance, storage)
    assert shards == ["00000.tar", "00001.tar"]
    job = lineage_definitions(build_resources(storage, str(tmp_path / "data"), launcher=LocalLauncher(),
                                              dvc_push=False)).resolve_job_def("web_shards_job")
    for pk in shards:
        assert job.execute_in_process(instance=instance, partition_key=pk, raise_on_error=False).success
    again = land_shapes_world(storage, **TINY_WORLD)
    assert again.landed == [] and len(again.skipped) == 2
    assert register_shards(instance, storage) == []

    result = _tick(instance, storage, None)
    assert result.run_requests == [] and result.dynamic_partitions_requests == []
    versions = {name: s.version for name, s in landed_shards(storage).items()}
    assert json.loads(result.cursor) == {"requested": versions, "pending": {}}


def test_register_shards_waits_for_shards_being_written(instance, tiny_world: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    src = _shard(tiny_world, 0)
    shutil.copy(src, landing / "00000.tar")
    shutil.copy(src.with_name(f"{src.stem}_stats.json"), landing / "00000_stats.json")
    shutil.copy(src, landing / "00001.tar")  # no stats.json, unchanged: settled over settle_s
    data = src.read_bytes()
    (landing / "00002.tar").write_bytes(data[:4096])
    stop = threading.Event()

    def writer() -> None:  # a download in progress: a chunk every 20 ms
        with open(landing / "00002.tar", "ab") as f:
            for offset in range(4096, len(data), 512):
                if stop.wait(0.02):
                    return
                f.write(data[offset:offset + 512])
                f.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert register_shards(instance, storage, settle_s=0.5) == ["00000.tar", "00001.tar"]
    finally:
        stop.set()
        thread.join()
    assert "00002.tar" in capsys.readouterr().out
    assert instance.get_dynamic_partitions("web_shards") == ["00000.tar", "00001.tar"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_land_shapes_world_leaves_what_the_user_placed(backend: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest):
    if backend == "s3":
        import boto3

        endpoint = request.getfixturevalue("s3_env")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="user-landing")
        storage: StorageResource = S3Storage(bucket="user-landing", prefix="p", endpoint_url=endpoint,
                                             cache_dir=str(tmp_path / "cache"))
    else:
        storage = LocalStorage(root=str(tmp_path / "data"))
    mine = tmp_path / "mine"
    (mine / "human").mkdir(parents=True)
    annotations = b'[{"image": "images/mine.jpg", "split": "train", "caption": ["my own"]}]'
    (mine / "human" / "annotations.json").write_bytes(annotations)
    (mine / "manifest.json").write_bytes(b'{"mine": true}')
    assert storage.publish_new_files(mine, "landing")[0] == ["landing/human/annotations.json",
                                                              "landing/manifest.json"]

    landed = land_shapes_world(storage, **TINY_WORLD)
    with storage.local_file("landing/human/annotations.json") as path:
        assert path.read_bytes() == annotations
    with storage.local_file("landing/manifest.json") as path:
        assert path.read_bytes() == b'{"mine": true}'
    assert landed.kept == ["landing/manifest.json"]
    assert any("human pairs" in s for s in landed.skipped)
    assert "landing/web/00000.tar" in landed.landed and "landing/truth/web_truth.jsonl" in landed.landed
    assert not [k for k in landed.landed if k.startswith("landing/human/")]
    assert "landing/truth/human_scenes.jsonl" not in landed.landed
    assert storage.list_files("landing/human") == ["annotations.json"]
    assert sorted(landed_shards(storage)) == ["00000.tar", "00001.tar"]
    assert all(s.complete for s in landed_shards(storage).values())

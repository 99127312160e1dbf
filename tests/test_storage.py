"""The storage resource on local disk and on a real S3 endpoint (moto's server mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import TINY_RUN_CONFIG
from dagster import DagsterInstance, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from orchestration.definitions import build_resources
from orchestration.main import materialize_lineage, register_shards
from resources.launcher import LocalLauncher
from resources.storage import (
    MARKER,
    LocalStorage,
    S3Storage,
    StorageError,
    StorageResource,
    dataset_key,
    storage_from_env,
)


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return root


@pytest.fixture
def bucket(s3_env: str, request: pytest.FixtureRequest) -> str:
    name = f"blip-{request.node.name.replace('_', '-')[:40].lower()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(bucket: str, tmp_path: Path) -> S3Storage:
    return S3Storage(bucket=bucket, prefix="team/blip", cache_dir=str(tmp_path / "cache"))


def _objects(storage: S3Storage) -> list[str]:
    listing = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_local_and_s3_publish_the_same_content_hash(s3: S3Storage, tmp_path: Path):
    src = _folder(tmp_path / "src")
    local = LocalStorage(root=str(tmp_path / "data"))
    assert local.publish_dir(src, "assets/x") == s3.publish_dir(src, "assets/x")
    assert _objects(s3) == ["team/blip/assets/x/.complete.json", "team/blip/assets/x/a.txt",
                            "team/blip/assets/x/sub/b.bin"]
    assert s3.uri("assets/x") == f"s3://{s3.bucket}/team/blip/assets/x"
    assert s3.exists("assets/x") and s3.marker("assets/x")["files"] == 2


def test_s3_download_is_verified_and_cached(s3: S3Storage, tmp_path: Path, bucket: str):
    s3.publish_dir(_folder(tmp_path / "src"), "assets/x")
    fresh = S3Storage(bucket=bucket, prefix="team/blip", cache_dir=str(tmp_path / "other-cache"))
    with fresh.local_dir("assets/x") as path:
        assert (path / "sub" / "b.bin").read_bytes() == bytes(range(256))
        first = path
    with fresh.local_dir("assets/x") as path:  # same marker: served from the cache
        assert path == first and (path / MARKER).is_file()


def test_republishing_removes_stale_objects(s3: S3Storage, tmp_path: Path):
    s3.publish_dir(_folder(tmp_path / "v1"), "assets/x")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "only.txt").write_text("new")
    version = s3.publish_dir(v2, "assets/x")
    assert _objects(s3) == ["team/blip/assets/x/.complete.json", "team/blip/assets/x/only.txt"]
    assert s3.version("assets/x") == version


def test_half_uploaded_dataset_is_not_complete(s3: S3Storage, tmp_path: Path, monkeypatch: Any):
    src = _folder(tmp_path / "src")
    real_upload = s3.client.upload_file
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> None:  # the connection dies after the first file
        calls.append(args)
        if len(calls) > 1:
            raise ConnectionError("network gone")
        real_upload(*args, **kwargs)

    monkeypatch.setattr(s3.client, "upload_file", flaky)
    with pytest.raises(ConnectionError):
        s3.publish_dir(src, "assets/x")
    assert _objects(s3) == ["team/blip/assets/x/a.txt"]  # data, but no marker
    assert not s3.exists("assets/x")
    with pytest.raises(StorageError, match="no complete dataset"):
        with s3.local_dir("assets/x"):
            pass


def test_files_json_and_listing(s3: S3Storage, tmp_path: Path):
    landing = tmp_path / "landing"
    (landing / "web").mkdir(parents=True)
    for name in ("00001.tar", "00000.tar", "00000.parquet", ".hidden.tar"):
        (landing / "web" / name).write_bytes(name.encode())
    s3.publish_dir(landing, "landing")
    assert s3.list_files("landing/web", suffix=".tar") == ["00000.tar", "00001.tar"]
    with s3.local_file("landing/web/00001.tar") as path:
        assert path.read_bytes() == b"00001.tar"
    s3.write_json("reports/r.json", {"a": [1, 2]})
    assert s3.read_json("reports/r.json") == {"a": [1, 2]}
    with pytest.raises(StorageError, match="no such file"):
        with s3.local_file("landing/web/missing.tar"):
            pass


def test_clear_error_for_a_missing_bucket(s3_env: str, tmp_path: Path):
    storage = S3Storage(bucket="no-such-bucket", cache_dir=str(tmp_path), max_attempts=1)
    with pytest.raises(StorageError, match="s3://no-such-bucket/blip-ops/assets/x.*NoSuchBucket"):
        storage.marker("assets/x")


def test_keys_cannot_climb_out(tmp_path: Path):
    local = LocalStorage(root=str(tmp_path))
    for bad in ("../x", "/abs", "a/../../b", ""):
        with pytest.raises(ValueError):
            local.path(bad)


def test_s3_object_keys_and_prefixes_cannot_climb_out_of_the_cache(s3: S3Storage, bucket: str,
                                                                   tmp_path: Path):
    """Object names come from the bucket (anyone with write access): a download never writes
    outside the dataset's cache folder, and a prefix with '..' is refused."""
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="team/blip/assets/x/ok.txt", Body=b"ok")
    for evil in ("team/blip/assets/x/sub/../../../../../../escaped.txt",
                 "team/blip/assets/x//" + str(tmp_path / "abs-escaped.txt").lstrip("/")):
        client.put_object(Bucket=bucket, Key=evil, Body=b"evil")
    client.put_object(Bucket=bucket, Key="team/blip/assets/y/" + "/" + str(tmp_path / "abs.txt"),
                      Body=b"evil")
    before = {p for p in tmp_path.rglob("*")}
    for key in ("assets/x", "assets/y"):
        with pytest.raises(StorageError, match="leaves the dataset folder"):
            with s3.local_dir(key, complete_only=False):
                pass
    new = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in new if p.is_file() and p.read_bytes() == b"evil"]
    assert not any("escaped" in p.name or p.name == "abs.txt" for p in new)
    climbing = S3Storage(bucket=bucket, prefix="../../outside", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError):
        with climbing.local_file("landing/a.tar"):
            pass


def test_storage_from_env_selects_the_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("BLIP_OPS_DATA", str(tmp_path))
    monkeypatch.delenv("BLIP_OPS_STORAGE", raising=False)
    assert isinstance(storage_from_env(), LocalStorage)
    monkeypatch.setenv("BLIP_OPS_STORAGE", "s3")
    monkeypatch.delenv("BLIP_OPS_S3_BUCKET", raising=False)
    with pytest.raises(StorageError, match="BLIP_OPS_S3_BUCKET"):
        storage_from_env()
    monkeypatch.setenv("BLIP_OPS_S3_BUCKET", "b")
    monkeypatch.setenv("BLIP_OPS_S3_PREFIX", "p")
    s3 = storage_from_env()
    assert isinstance(s3, S3Storage) and s3.uri("k") == "s3://b/p/k"


def _resources(storage: StorageResource, data: Path) -> dict[str, Any]:
    return build_resources(storage, str(data), launcher=LocalLauncher(), dvc_push=False)


def _ingest_on(storage: StorageResource, world: Path, data: Path) -> dict[str, Any]:
    """Materializes the data assets (with their checks) and returns their data versions."""
    storage.publish_dir(world, "landing")
    resources = _resources(storage, data)
    instance = DagsterInstance.ephemeral()
    register_shards(instance, storage)
    versions = {}
    for pk, selection in (("00000.tar", ["web_shards"]), (None, ["human_pairs"])):
        result = materialize([*ALL_ASSETS, *ALL_CHECKS], selection=selection, partition_key=pk,
                             instance=instance, resources=resources)
        assert result.success and all(e.passed for e in result.get_asset_check_evaluations())
        (event,) = result.get_asset_materialization_events()
        versions[selection[0]] = event.materialization.tags["dagster/data_version"]
        assert versions[selection[0]] == storage.version(dataset_key(selection, pk))
    return versions


@pytest.mark.slow  # four asset materializations (ingest on local disk and on S3)
def test_same_assets_on_s3_and_local_give_the_same_data_versions(s3: S3Storage, tmp_path: Path,
                                                                 tiny_world: Path):
    on_local = _ingest_on(LocalStorage(root=str(tmp_path / "data")), tiny_world, tmp_path / "data")
    on_s3 = _ingest_on(s3, tiny_world, tmp_path / "s3-data")
    assert on_s3 == on_local
    assert f"team/blip/{dataset_key(['web_shards'], '00000.tar')}/{MARKER}" in _objects(s3)


@pytest.mark.slow  # the whole lineage through a local S3 endpoint: a few minutes on 2 cores
def test_whole_lineage_runs_on_s3(s3: S3Storage, tiny_world: Path, tmp_path: Path):
    s3.publish_dir(tiny_world, "landing")
    resources = _resources(s3, tmp_path / "data")
    instance = DagsterInstance.ephemeral()
    register_shards(instance, s3)
    result = materialize_lineage(instance, resources, TINY_RUN_CONFIG)
    assert result.success
    for name in ("human_pairs", "pretrained_med", "captioner", "filter", "synthetic_captions",
                 "bootstrapped_corpus", "bootstrapped_med", "downstream_evals"):
        assert s3.exists(dataset_key([name])), name
    report = s3.read_json(f"{dataset_key(['downstream_evals'])}/report.json")
    assert report["checkpoints"]["baseline"] == s3.uri(dataset_key(["pretrained_med"]))
    # Checkpoints are published without their resumable trainer state.
    assert not [k for k in _objects(s3) if "trainer_state" in k]

"""The real img2dataset writes shards from images served on 127.0.0.1; ingest keeps them as they are.

img2dataset (a test tool, installed in its own environment by ``make setup``) downloads a list of
ordinary images of every common kind (JPEG, PNG with alpha, palette GIF, WebP, CMYK, grayscale,
16-bit, 3000x2000, 1x1), one URL that 404s and one file that is not an image, with its default
settings and two variants. What its shards hold is the known answer: every sample with a valid
image and caption is kept (same keys, captions byte for byte, every column and ``.json`` field of
img2dataset with its type), only what is really bad is quarantined, nothing is lost.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import free_port, stop_process, wait_for_port
from PIL import Image

from blip_core.data.formats import iter_shard, list_shards
from blip_core.data.ingest import ingest
from blip_core.io import sha256_bytes

pytestmark = pytest.mark.slow  # three img2dataset runs (~10 s each) and a Dagster materialization

CAPTIONS = {  # index -> caption (the rest: "a photo number {i}")
    3: "une photo déjà vue — 中文 ✓",
    11: "",  # img2dataset keeps an empty caption: really bad, quarantined
    12: "  two  spaces\tand a tab ",  # whitespace is normalised in our .txt, not in their parquet
}
EMPTY_CAPTION, SPACED = 11, 12
ONE_PIXEL, NOT_AN_IMAGE, MISSING = 8, 9, 10


def _images(rng: np.random.Generator) -> dict[int, tuple[str, bytes]]:
    """Index -> (file name, bytes) of the served files."""

    def noise(w: int, h: int) -> Image.Image:
        return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))

    def enc(im: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    files = {
        0: ("rgb.jpg", enc(noise(200, 150), "JPEG")),
        1: ("alpha.png", enc(noise(120, 90).convert("RGBA"), "PNG")),
        2: ("palette.gif", enc(noise(100, 100).convert("P"), "GIF")),
        3: ("photo.webp", enc(noise(160, 120), "WEBP")),
        4: ("cmyk.jpg", enc(noise(140, 100).convert("CMYK"), "JPEG")),
        5: ("gray.png", enc(noise(90, 130).convert("L"), "PNG")),
        6: ("deep.png", enc(Image.fromarray((rng.random((64, 80)) * 65535).astype(np.uint16)), "PNG")),
        7: ("large.jpg", enc(noise(3000, 2000), "JPEG", quality=80)),
        ONE_PIXEL: ("pixel.png", enc(noise(1, 1), "PNG")),
        NOT_AN_IMAGE: ("broken.jpg", b"<html><body>not an image</body></html>"),
    }
    for i in range(EMPTY_CAPTION, 20):
        files[i] = (f"plain{i}.jpg", enc(noise(64 + i, 48 + i), "JPEG"))
    return files


def _img2dataset() -> str:
    exe = shutil.which("img2dataset") or str(Path.home() / ".local/bin/img2dataset")
    if not os.access(exe, os.X_OK):
        pytest.fail("img2dataset is not installed: run `make setup` (it installs img2dataset 1.47 "
                    "in its own tool environment)")
    return exe


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The files on a local HTTP server and the URL list img2dataset reads."""
    root = tmp_path_factory.mktemp("i2d")
    www = root / "www"
    www.mkdir()
    files = _images(np.random.default_rng(0))
    for name, data in files.values():
        (www / name).write_bytes(data)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=www, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, 30, proc)
    urls = root / "urls.csv"
    with open(urls, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "license"])
        for i in range(20):
            name = files[i][0] if i != MISSING else "missing.jpg"
            w.writerow([f"http://127.0.0.1:{port}/{name}", CAPTIONS.get(i, f"a photo number {i}"), f"cc-{i}"])
    yield {"root": root, "urls": urls}
    stop_process(proc)


def _run(served: dict[str, Any], name: str, *flags: str) -> Path:
    out = served["root"] / name
    cmd = [_img2dataset(), "--url_list", str(served["urls"]), "--input_format", "csv",
           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
           "--output_folder", str(out), "--processes_count", "1", "--thread_count", "4",
           "--enable_wandb", "False", *flags]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


VARIANTS = {
    "defaults": (),  # resize_mode border, 256 px, re-encoded as JPEG, compute_hash sha256
    "keep_ratio_384": ("--resize_mode", "keep_ratio", "--image_size", "384", "--compute_hash", "md5",
                       "--save_additional_columns", '["license"]'),
    "no_resize_no_reencode": ("--resize_mode", "no", "--skip_reencode", "True", "--compute_hash", "None",
                              "--save_additional_columns", '["license"]'),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def shards(request: pytest.FixtureRequest, served: dict[str, Any]) -> tuple[str, Path]:
    return request.param, _run(served, request.param, *VARIANTS[request.param])


def _key(i: int) -> str:
    return f"{i:09d}"  # img2dataset: shard 0, 10,000 samples per shard


def _written(folder: Path) -> dict[str, dict[str, bytes]]:
    """What img2dataset put in its tars: key -> members."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in list_shards(folder):
        for item in iter_shard(shard):
            out[item.key] = dict(item.files)
    return out


def test_ingest_keeps_every_valid_sample_with_img2dataset_columns_and_fields(
    shards: tuple[str, Path], tmp_path: Path
) -> None:
    variant, folder = shards
    written = _written(folder)
    producer = pq.read_table(folder / "00000.parquet")
    status = {r["key"]: r["status"] for r in producer.to_pylist()}
    # img2dataset's own outcome: the 404 and the HTML page are failures of its own, not samples
    assert status[_key(MISSING)] == "failed_to_download"
    assert status[_key(NOT_AN_IMAGE)] != "success" and _key(NOT_AN_IMAGE) not in written
    expected_bad = {_key(EMPTY_CAPTION): "empty_caption"}
    if variant == "no_resize_no_reencode":  # stored as downloaded: 1x1 stays 1x1
        expected_bad[_key(ONE_PIXEL)] = "image_too_small"
    assert set(expected_bad) <= set(written)

    stats = ingest(folder, tmp_path / "out")

    out = tmp_path / "out"
    kept = _written(out)
    assert set(kept) == set(written) - set(expected_bad)
    records = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in records} == expected_bad
    assert (stats.kept, stats.quarantined) == (len(kept), len(expected_bad))
    assert stats.producer_status == dict(Counter(status.values()))
    print(f"\nimg2dataset {variant}: written {len(written)}, kept {stats.kept}, quarantined "
          f"{stats.quarantined} {stats.by_reason}, lost {len(written) - stats.kept - stats.quarantined}, "
          f"producer {stats.producer_status}")

    rows_in = {r["key"]: r for r in producer.to_pylist()}
    table_out = pq.read_table(out / "00000.parquet")
    for f in producer.schema:  # every column of img2dataset, with its type
        assert table_out.schema.field(f.name).type == f.type, f.name
    rows_out = table_out.to_pylist()
    assert [r["key"] for r in rows_out] == list(kept)
    for row in rows_out:
        key = row["key"]
        txt = written[key]["txt"]
        assert kept[key]["txt"] == (b" ".join(txt.split()) if key == _key(SPACED) else txt)
        assert {k: v for k, v in row.items() if k in producer.schema.names} == \
            {**rows_in[key], "caption": kept[key]["txt"].decode()}
        meta_in, meta_out = json.loads(written[key]["json"]), json.loads(kept[key]["json"])
        assert {k: v for k, v in meta_out.items() if k not in ("caption", "stored_sha256")} == \
            {k: v for k, v in meta_in.items() if k != "caption"}
        assert row["stored_sha256"] == meta_out["stored_sha256"] == sha256_bytes(kept[key]["jpg"])
    hash_column = {"defaults": "sha256", "keep_ratio_384": "md5"}.get(variant)
    if hash_column is not None:  # the producer's hash of the downloaded bytes, kept as theirs
        assert all(len(r[hash_column]) == {"sha256": 64, "md5": 32}[hash_column] for r in rows_out)
    if variant == "no_resize_no_reencode":  # the stored bytes are what was downloaded
        assert Image.open(io.BytesIO(kept[_key(7)]["jpg"])).size == (3000, 2000)
        assert "license" in table_out.schema.names
    with Image.open(io.BytesIO(kept[_key(4)]["jpg"])) as im:  # CMYK re-encoded as RGB JPEG
        assert (im.format, im.mode) == ("JPEG", "RGB")


def test_webdataset_reads_what_ingest_wrote(shards: tuple[str, Path], tmp_path: Path) -> None:
    import webdataset as wds

    _, folder = shards
    ingest(folder, tmp_path / "out")
    samples = list(wds.WebDataset([str(p) for p in list_shards(tmp_path / "out")], shardshuffle=False,
                                  empty_check=False))
    assert [s["__key__"] for s in samples] == list(_written(tmp_path / "out"))
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)


def test_web_shards_partition_of_an_img2dataset_shard_passes_its_checks(
    served: dict[str, Any], tmp_path: Path
) -> None:
    from dagster import DagsterInstance, materialize

    from assets.checks import WEB_CHECKS, web_shard_checks
    from assets.data import web_shards
    from orchestration.definitions import build_resources
    from resources.launcher import LocalLauncher
    from resources.storage import LocalStorage

    folder = _run(served, "for_dagster")
    storage = LocalStorage(root=str(tmp_path / "data"))
    landing = tmp_path / "data" / "landing" / "web"
    landing.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, landing / f.name)
    resources = build_resources(storage, str(tmp_path / "data"), launcher=LocalLauncher(), dvc_push=False)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("web_shards", ["00000.tar"])
    result = materialize([web_shards, web_shard_checks], partition_key="00000.tar", instance=instance,
                         resources=resources)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {name: True for name in WEB_CHECKS}
    (mat,) = [e.materialization for e in result.get_asset_materialization_events()]
    written = _written(folder)
    assert mat.metadata["kept"].value == len(written) - 1  # the empty caption
    assert mat.metadata["quarantined"].value == 1

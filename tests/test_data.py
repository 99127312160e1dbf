"""Data layer: shapes world, shard formats, ingest/quarantine and datasets, on known answers."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import write_tar
from PIL import Image

from blip_core.data import formats, ingest, shapes
from blip_core.data.formats import RawSample, Rejection, Sample, iter_shard, list_shards, write_shards
from blip_core.data.ingest import REASONS, IngestConfig, ingest_human
from blip_core.data.shapes import Scene, Shape, WorldConfig, generate_world, is_correct
from blip_core.io import (
    atomic_dir,
    atomic_file,
    atomic_path,
    atomic_write_json,
    delete_dir,
    safe_member_path,
    sha256_bytes,
    tree_hash,
)

SMALL = WorldConfig(seed=0, n_human_train=12, n_human_val=4, n_human_test=6, n_web=100, shard_size=40)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(out, SMALL)
    return out


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (32, 32), color: object = None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if color is not None else (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _pair(key: str, image: bytes, caption: bytes = b"a red square") -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "url": f"https://x.invalid/{key}.jpg"}).encode()
    return [(f"{key}.jpg", image), (f"{key}.txt", caption), (f"{key}.json", meta)]


# --- io -------------------------------------------------------------------------------------


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        atomic_write_json(tmp / "a.json", {"v": 1})
    assert json.loads((final / "a.json").read_text()) == {"v": 1}
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["a.json"]  # old version intact
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp siblings left


@pytest.mark.timeout(60)  # opening the fifo to fsync it would block
def test_atomic_dir_with_a_fifo_inside_completes(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        os.mkfifo(tmp / "pipe")
        (tmp / "link").symlink_to("a.txt")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "link", "pipe"]


def test_atomic_file_and_path_replace_the_file_or_leave_it_and_delete_dir_hides_first(
    tmp_path: Path,
) -> None:
    target = tmp_path / "w.bin"
    with atomic_file(target) as f:
        f.write(b"one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.bin.tmp-")
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"one"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"two")  # a writer that wants a file name
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]  # no temp siblings left
    (tmp_path / "old" / "sub").mkdir(parents=True)
    (tmp_path / "old" / "sub" / "x").write_text("x")
    delete_dir(tmp_path / "old")
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_tree_hash_and_safe_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    h = tree_hash(tmp_path)
    (tmp_path / ".x.tmp-123").write_text("temp")
    assert tree_hash(tmp_path) == h
    (tmp_path / "d" / "x.txt").write_text("y")
    assert tree_hash(tmp_path) != h
    h = tree_hash(tmp_path)
    with open(os.path.join(os.fsencode(tmp_path), b"d", b"caf\xe9.txt"), "wb") as f:  # not UTF-8
        f.write(b"z")
    assert tree_hash(tmp_path) != h
    assert safe_member_path(tmp_path, "d/x.txt") == tmp_path / "d" / "x.txt"
    for bad in ("/etc/passwd", "../x", "d/../../x", "a\\b", ""):
        with pytest.raises(ValueError):
            safe_member_path(tmp_path, bad)


# --- shapes world ---------------------------------------------------------------------------


def test_world_is_deterministic_per_seed(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    manifest = generate_world(again, SMALL)
    assert tree_hash(again) == tree_hash(world)
    assert manifest == json.loads((world / "manifest.json").read_text())
    other = generate_world(tmp_path / "other", replace(SMALL, seed=1))
    assert other["hashes"]["web"] != manifest["hashes"]["web"]
    assert other["hashes"]["human"] != manifest["hashes"]["human"]


def test_world_counts_and_noise_are_exact(world: Path) -> None:
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["counts"]["human"]["images"] == {"train": 12, "val": 4, "test": 6}
    ann = json.loads((world / "human" / "annotations.json").read_text())
    assert Counter(a["split"] for a in ann) == {"train": 12, "val": 4, "test": 6}
    assert all(len(set(a["caption"])) == 5 for a in ann)
    assert all((world / "human" / a["image"]).is_file() for a in ann)

    truth = [json.loads(line) for line in (world / "truth" / "web_truth.jsonl").open()]
    assert len(truth) == 100
    assert sum(t["noisy"] for t in truth) == 40  # web_noise 0.4, exactly
    assert Counter(t["kind"] for t in truth) == {
        "mismatched": 20,
        "boilerplate": 20,
        "correct": 30,
        "terse": 30,
    }
    assert manifest["counts"]["web"]["noise_ratio"] == 0.4
    # The noise is real: every noisy text is wrong for its image, every clean one right.
    for t in truth:
        assert is_correct(t["caption"], Scene.from_json(t["scene"])) != t["noisy"], t
    # Human captions are all correct; eval-split images all have distinct descriptions.
    scenes = [json.loads(line) for line in (world / "truth" / "human_scenes.jsonl").open()]
    for s, a in zip(scenes, ann, strict=True):
        assert all(is_correct(c, Scene.from_json(s["scene"])) for c in a["caption"])
    test = [s["true_caption"] for s in scenes if s["split"] == "test"]
    assert len(set(test)) == len(test)


def test_grammar(tmp_path: Path) -> None:
    scene = Scene((Shape("red", "circle", "large", "left"), Shape("blue", "square", "small", "right")), 0)
    assert is_correct("a large red circle to the left of a small blue square", scene)
    assert is_correct("a small blue square on the right and a red circle on the left", scene)
    assert is_correct("red circle and blue square", scene)
    assert not is_correct("a red circle to the right of a blue square", scene)
    assert not is_correct("a small red circle", scene)
    assert not is_correct("a red circle above a blue square", scene)
    assert not is_correct("IMG_2034.jpg", scene)
    from blip_core.tokenizer import bundled_vocab

    vocab = set(bundled_vocab().read_text().split())
    assert shapes.grammar_words() <= vocab


# --- formats --------------------------------------------------------------------------------


def test_shards_are_img2dataset_webdataset(world: Path) -> None:
    import webdataset as wds

    tars = list_shards(world / "web")
    assert [p.name for p in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    urls = [str(p) for p in tars]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 100
    assert {"__key__", "jpg", "txt", "json"} <= set(samples[0])
    assert samples[0]["__key__"] == "000000000" and samples[40]["__key__"] == "000010000"
    rows = [r for p in tars for r in formats.read_parquet_rows(p.with_suffix(".parquet"))]
    for sample, row in zip(samples, rows, strict=True):
        meta = json.loads(sample["json"])
        assert row["key"] == meta["key"] == sample["__key__"]
        assert row["caption"] == meta["caption"] == sample["txt"].decode()
        assert row["sha256"] == meta["sha256"] == sha256_bytes(sample["jpg"])  # img2dataset's
        assert row["stored_sha256"] == meta["stored_sha256"] == sha256_bytes(sample["jpg"])  # ours
        assert (row["width"], row["height"], row["status"]) == (64, 64, "success")
        assert row["url"] == f"https://shapes.invalid/{row['key']}.jpg"


def test_write_shards_rejects_unsafe_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_shards([Sample("../x", _jpeg(), "c")], tmp_path, 10)
    assert list(tmp_path.iterdir()) == []  # the half-written shard did not appear


def test_iter_shard_truncated_and_unreadable(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "t.tar", _pair("a", _jpeg()) + _pair("b", _jpeg()))
    data = tar.read_bytes()
    cut = data.index(b"b.jpg") + 512 + 100  # inside b.jpg's data
    tar.write_bytes(data[:cut])
    items = list(iter_shard(tar))
    assert [type(i).__name__ for i in items] == ["RawSample", "Rejection"]
    assert (items[1].key, items[1].reason) == ("b", "truncated_tar")
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"not a tar" * 100)
    assert [r.reason for r in iter_shard(garbage)] == ["unreadable_tar"]  # type: ignore[union-attr]


# --- ingest ---------------------------------------------------------------------------------


@pytest.fixture()
def bad_shards(tmp_path: Path) -> Path:
    src = tmp_path / "landing"
    src.mkdir()
    good = _jpeg()
    palette = Image.new("P", (32, 32))
    palette.putpalette([255, 0, 0] * 256)
    big = bytes(70_000)  # above the test's max_member_bytes
    write_tar(
        src / "00000.tar",
        [
            *_pair("good1", good),
            *_pair("cmyk", _jpeg("CMYK", color=(0, 255, 255, 0))),
            *_pair("palette", _png(palette)),
            *_pair("rgba", _png(Image.new("RGBA", (32, 32), (0, 0, 255, 128)))),
            *_pair("gray16", _png(Image.new("I;16", (32, 32), 40000))),
            *_pair("rtl", good, "دائرة حمراء على اليسار".encode()),
            *_pair("zero", b""),
            *_pair("truncjpg", good[: len(good) // 2]),
            *_pair("nonutf8", good, b"\xff\xfe caption"),
            *_pair("emptycap", good, b"  \n\t "),
            *_pair("control", good, b"red \x1b[31m square"),
            *_pair("toolong", good, b"a" * 1500),
            *_pair("bomb", _png_declaring(50_000, 50_000)),
            *_pair("tiny", _jpeg(size=(4, 4))),
            [m for m in _pair("notxt", good) if not m[0].endswith(".txt")][0],
            ("noimg.txt", b"a caption without image"),
            ("badjson.jpg", good),
            ("badjson.txt", b"ok"),
            ("badjson.json", b"{not json"),
            ("../../etc/x.jpg", good),
            ("../../etc/x.txt", b"evil"),
            ("huge.jpg", big),
            ("huge.txt", b"big"),
        ],
    )
    write_tar(src / "00001.tar", [*_pair("good2", good), *_pair("good1", good)])  # duplicate
    shard = write_tar(src / "00002.tar", [*_pair("good3", good), *_pair("lost", good)])
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(b"lost.jpg") + 700])  # truncated inside lost.jpg
    return src


EXPECTED_REASONS = {
    "empty_image": 1,
    "undecodable_image": 1,
    "non_utf8_caption": 1,
    "empty_caption": 1,
    "control_characters": 1,
    "caption_too_long": 1,
    "image_too_large": 1,
    "image_too_small": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "bad_json": 1,
    "unsafe_member_name": 1,
    "member_too_large": 1,
    "duplicate_key": 1,
    "truncated_tar": 1,
}
EXPECTED_KEPT = {"good1", "cmyk", "palette", "rgba", "gray16", "rtl", "good2", "good3"}


def test_ingest_quarantines_every_bad_sample(bad_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean"
    stats = ingest.ingest(bad_shards, out, IngestConfig(max_member_bytes=60_000))
    assert stats.by_reason == EXPECTED_REASONS
    assert (stats.kept, stats.quarantined) == (8, 15)
    written = json.loads((out / "stats.json").read_text())
    assert {k: written[k] for k in ("kept", "quarantined", "by_reason")} == {
        "kept": 8,
        "quarantined": 15,
        "by_reason": EXPECTED_REASONS,
    }
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and set(REASONS) >= {x["reason"] for x in lines}
    assert all({"key", "source", "reason", "detail"} <= set(x) for x in lines)
    dup = next(x for x in lines if x["reason"] == "duplicate_key")
    assert (dup["key"], dup["source"]) == ("good1", "00001.tar:good1.jpg")

    kept = [s for p in list_shards(out) for s in iter_shard(p)]
    assert {s.key for s in kept} == EXPECTED_KEPT
    by_key = {s.key: s for s in kept if not isinstance(s, Rejection)}
    assert by_key["good1"].files["jpg"] == _jpeg()  # RGB JPEG bytes kept as they were
    for key in ("cmyk", "palette", "rgba", "gray16"):
        im = Image.open(io.BytesIO(by_key[key].files["jpg"]))
        assert (im.format, im.mode) == ("JPEG", "RGB")
    assert by_key["rtl"].files["txt"].decode() == "دائرة حمراء على اليسار"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_ingest_is_atomic_on_failure(
    bad_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def crash(raw: RawSample, cfg: IngestConfig) -> Rejection:
        calls.append(raw.key)
        if len(calls) == 3:
            raise RuntimeError("killed mid-run")
        return Rejection(raw.key, raw.source(), "empty_image", "")

    monkeypatch.setattr(ingest, "validate_sample", crash)
    with pytest.raises(RuntimeError):
        ingest.ingest(bad_shards, tmp_path / "clean")
    assert list(tmp_path.iterdir()) == [bad_shards]


def test_ingest_clean_world_keeps_everything(world: Path, tmp_path: Path) -> None:
    stats = ingest.ingest(world / "web", tmp_path / "clean")
    assert (stats.kept, stats.quarantined) == (100, 0)
    assert [p.name for p in list_shards(tmp_path / "clean")] == ["00000.tar", "00001.tar", "00002.tar"]


def test_ingest_human(world: Path, tmp_path: Path) -> None:
    root = tmp_path / "landing"
    shutil.copytree(world / "human", root)
    ann = json.loads((root / "annotations.json").read_text())
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ann[0]["image"] = "images/missing.jpg"
    del ann[1]["split"]
    ann[2]["split"] = "dev"
    ann[3]["caption"] = ["", "  "]
    ann[4]["caption"][1] = "\t"  # dropped, the image stays
    ann[5]["image"] = "../../etc/passwd"
    ann[6]["image"] = "images/broken.jpg"
    ann.append(dict(ann[7], split="test", image_id="copy"))  # same image in train and test
    src = root / "annotations.json"
    src.write_text(json.dumps(ann))
    stats = ingest_human(src, None, tmp_path / "human")
    assert stats.by_reason == {
        "missing_image": 1,
        "missing_field": 1,
        "invalid_split": 1,
        "empty_caption": 1,
        "unsafe_member_name": 1,
        "undecodable_image": 1,
        "duplicate_key": 1,
    }
    assert stats.kept == 22 - 6 and stats.captions_dropped == {"empty_caption": 1}
    kept = formats.read_karpathy(tmp_path / "human" / "annotations.json")
    assert len(kept) == 16 and all((tmp_path / "human" / k.image).is_file() for k in kept)
    assert next(k for k in kept if k.image_id == ann[4]["image_id"]).captions == tuple(
        c for c in ann[4]["caption"] if c.strip()
    )


# --- datasets -------------------------------------------------------------------------------


def test_datasets(world: Path, bad_shards: Path) -> None:
    from blip_core.data.dataset import ImageCaptionsSplit, ImageOnlyDataset, ImageTextDataset

    ann = world / "human" / "annotations.json"
    ds = ImageTextDataset([world / "web", f"{ann}:train"], image_size=32, train=True)
    assert len(ds) == 100 + 12 * 5 and len(ds.images) == 112
    image, caption, index = ds[len(ds) - 1]
    assert image.shape == (3, 32, 32) and isinstance(caption, str) and index == 111
    assert Counter(ds.pair_image)[100] == 5  # one image, five captions

    test = ImageCaptionsSplit(ann, "test")
    assert len(test) == 6 and len(test.texts) == 30
    assert all(test.txt2img[t] == i for i, ts in enumerate(test.img2txt) for t in ts)
    assert test[0][0].shape == (3, 64, 64)

    web = ImageOnlyDataset(world / "web")
    assert len(web) == 100 and web[0][1] == "000000000"

    dirty = ImageTextDataset(bad_shards)  # same checks as ingest
    assert sorted(dirty.image_ids) == sorted(EXPECTED_KEPT)
    # Under the default member limit "huge" is read, then found undecodable.
    expected = Counter(EXPECTED_REASONS) - Counter(member_too_large=1) + Counter(undecodable_image=1)
    assert dirty.skipped == expected

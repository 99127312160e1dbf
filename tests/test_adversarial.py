"""Bad input: a generated adversarial corpus whose answers are known, ingested by the
function and by the CLI. Every good sample kept, every bad one quarantined with its reason,
nothing written outside the output, memory bounded, the data-quality check reporting the ratio;
the same for human pairs; reading annotations stays confined to the image root."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blip_core.data.adversarial import (
    WEB_BAD_CASES,
    AdversarialConfig,
    AdversarialTruth,
    generate_adversarial,
)
from blip_core.data.formats import RawSample, iter_shard, list_shards, read_karpathy, read_parquet_rows
from blip_core.data.ingest import REASONS, IngestStats, ingest
from blip_core.io import sha256_bytes, tree_hash

CLI = Path(sys.executable).with_name("blip-core")

MAX_RSS = 512 << 20
"""Peak RSS allowed to the CLI ingesting the corpus. Measured: about 140 MiB (the interpreter with
PIL, numpy and pyarrow is about 70 MiB; then one sample at a time, the largest member being the
1 MB caption, plus one shard's parquet rows). Decoding the PNG that declares 50,000 x 50,000
pixels would take 7.5 GB, the JPEG declaring 65,000 x 65,000 12.7 GB: any decode of them, or
holding a whole shard or corpus in memory, breaks the bound."""


def _tree(root: Path) -> set[str]:
    """Every entry (file, folder, link, fifo) under ``root``, relative, links not followed."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]


# Starts the command from a small process and reports the peak RSS of that command alone: a child
# forked from the (large) pytest process would count pytest's resident pages in its ru_maxrss,
# since Linux carries the pre-exec high-water mark over exec.
_MEASURED = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))  # Linux reports KiB
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_cli(args: list[str], cwd: Path, log: Path) -> tuple[int, int]:
    """Runs ``blip-core ARGS``; returns (exit code, peak RSS in bytes of that process alone)."""
    with tempfile.TemporaryDirectory() as tmp, open(log, "w") as f:  # outside the watched tree
        rss = Path(tmp) / "rss"
        proc = subprocess.run([sys.executable, "-S", "-c", _MEASURED, str(rss), str(CLI), *args],
                              cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        return proc.returncode, int(rss.read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AdversarialTruth]:
    base = tmp_path_factory.mktemp("adversarial")
    return base, generate_adversarial(base / "corpus")


@pytest.fixture(scope="module")
def web_out(corpus: tuple[Path, AdversarialTruth]) -> tuple[Path, IngestStats]:
    base, _ = corpus
    out = base / "runs" / "function" / "out"
    return out, ingest(base / "corpus" / "web", out)


def test_corpus_mixes_every_case(corpus: tuple[Path, AdversarialTruth]) -> None:
    """The corpus the other tests rely on: >= 2,000 samples, 10-20 % bad, every case present."""
    base, truth = corpus
    web = truth.web
    assert web.tried >= 2000 and 0.10 <= len(web.bad) / web.tried <= 0.20
    assert set(WEB_BAD_CASES) <= set(web.cases)
    assert {"truncated_tar:member", "truncated_tar:header", "unreadable_tar:gzip"} <= set(web.cases)
    assert {r for _, r in web.bad + truth.human.bad + truth.human.dropped} <= set(REASONS)
    assert ("../../etc/x", "unsafe_member_name") in web.bad
    assert {c for c in truth.human.cases if not c.startswith("good:")} >= {
        "no_image_field", "no_caption_field", "caption_int", "split_dev", "missing_file",
        "garbage_file", "path_symlink_outside", "image_is_fifo", "file_too_large"}
    assert list(base.joinpath("corpus").iterdir()) != []


def test_generator_is_deterministic(tmp_path: Path) -> None:
    small = AdversarialConfig(n_samples=300, shard_size=100, n_human=10, seed=3)
    out = tmp_path / "c"

    def written() -> tuple[str, bytes, bytes]:
        return (tree_hash(out / "web"), (out / "truth.json").read_bytes(),
                (out / "human" / "annotations.json").read_bytes())

    generate_adversarial(out, small)
    first = written()
    generate_adversarial(out, small)
    assert written() == first


def test_ingest_keeps_every_good_sample_and_quarantines_every_bad_one(
    corpus: tuple[Path, AdversarialTruth], web_out: tuple[Path, IngestStats]
) -> None:
    _, truth = corpus
    out, stats = web_out
    good, bad = truth.web.good, truth.web.bad
    assert (stats.kept, stats.quarantined, stats.by_reason) == (len(good), len(bad), truth.web.by_reason())
    written = json.loads((out / "stats.json").read_text())
    assert (written["kept"], written["quarantined"], written["by_reason"]) == (
        len(good), len(bad), truth.web.by_reason())
    assert sum(s["kept"] for s in written["sources"].values()) == len(good)
    assert sum(s["quarantined"] for s in written["sources"].values()) == len(bad)

    records = _records(out)
    assert Counter((r["key"], r["reason"]) for r in records) == Counter(bad)  # by key, not by count
    assert all({"key", "source", "reason", "detail"} <= set(r) and r["source"] for r in records)

    kept = [item for shard in list_shards(out) for item in iter_shard(shard)]
    assert all(isinstance(item, RawSample) for item in kept)
    keys = [item.key for item in kept]
    assert len(keys) == len(set(keys)) and set(keys) == set(good)  # lost: 0
    rows = [r["key"] for shard in list_shards(out) for r in read_parquet_rows(shard.with_suffix(".parquet"))]
    assert rows == keys
    for item in kept:
        want = good[item.key]
        caption = item.files["txt"].decode("utf-8")
        assert caption == want["caption"]  # right-to-left text and direction marks kept as written
        with Image.open(io.BytesIO(item.files["jpg"])) as im:
            assert (im.format, im.mode, list(im.size)) == ("JPEG", "RGB", want["size"])
        if want["sha256"] is not None:  # RGB JPEGs are stored byte for byte
            assert sha256_bytes(item.files["jpg"]) == want["sha256"]
        meta = json.loads(item.files["json"])
        assert (meta["key"], meta["caption"], meta["stored_sha256"]) == (item.key, caption,
                                                                   sha256_bytes(item.files["jpg"]))
    print(f"\nweb: tried {truth.web.tried}, good {len(good)}, bad {len(bad)}, kept {stats.kept}, "
          f"quarantined {stats.quarantined}, lost {len(set(good) - set(keys))}, by reason {stats.by_reason}")


def test_cli_same_output_bounded_memory_nothing_written_outside(
    corpus: tuple[Path, AdversarialTruth], web_out: tuple[Path, IngestStats]
) -> None:
    """``blip-core ingest`` run from deep inside the tree (so ``../../etc/x`` relative to the
    working or output folder lands inside it) writes nothing but its output folder."""
    base, truth = corpus
    cwd = base / "runs" / "cli" / "a" / "b"
    cwd.mkdir(parents=True)
    out = cwd / "out"
    before = _tree(base)
    rc, peak = _run_cli(["ingest", str(base / "corpus" / "web"), "--out", str(out)], cwd, base / "cli.log")
    assert rc == 0, (base / "cli.log").read_text()[-2000:]
    assert _tree(base) - before == {"cli.log", *(str(Path("runs/cli/a/b/out", p)) for p in _tree(out)),
                                    "runs/cli/a/b/out"}
    assert not any(Path(p).exists() for p in truth.escape_paths)  # absolute member names
    assert not Path("/etc/x.jpg").exists() and not Path("/etc/x.txt").exists()
    fn_out, _ = web_out
    assert tree_hash(out) == tree_hash(fn_out)  # the CLI writes exactly what the function writes
    assert (out / "quarantine.jsonl").read_bytes() == (fn_out / "quarantine.jsonl").read_bytes()
    print(f"\nCLI peak RSS {peak / 2**20:.0f} MiB (bound {MAX_RSS >> 20} MiB)")
    assert peak < MAX_RSS


def test_data_quality_check_reports_the_quarantine_ratio(
    corpus: tuple[Path, AdversarialTruth], web_out: tuple[Path, IngestStats], tmp_path: Path
) -> None:
    from dagster import build_op_context

    from assets.checks import WebShardCheckConfig, web_shard_checks
    from resources.storage import Dataset, LocalStorage

    _, truth = corpus
    out, _ = web_out
    storage = LocalStorage(root=str(tmp_path / "store"))
    key = "assets/web_shards/adversarial"
    ds = Dataset(key, storage.uri(key), storage.publish_dir(out, key))
    results = {r.check_name: r for r in web_shard_checks(
        build_op_context(), config=WebShardCheckConfig(), storage=storage, web_shards={"adversarial": ds})}
    meta = {k: v.value for k, v in results["quarantine_ratio"].metadata.items()}
    ratio = len(truth.web.bad) / truth.web.tried
    assert meta["quarantine_ratio"] == round(ratio, 4)
    assert (meta["kept"], meta["quarantined"]) == (len(truth.web.good), len(truth.web.bad))
    assert meta["by_reason"] == truth.web.by_reason()
    assert results["quarantine_ratio"].passed == (ratio <= meta["limit"])
    # What ingest kept passes every other invariant: decodable, img2dataset schema, caption
    # lengths, unique keys (within and across shards).
    assert all(results[name].passed for name in ("decodable_images", "schema", "caption_length",
                                                 "unique_keys"))


@pytest.mark.timeout(120)  # the corpus has a fifo among its images: reading it would block
def test_human_pairs_good_kept_bad_quarantined(corpus: tuple[Path, AdversarialTruth]) -> None:
    base, truth = corpus
    human = truth.human
    src = base / "corpus" / "human"
    out = base / "runs" / "human" / "out"
    out.parent.mkdir(parents=True)
    before = _tree(base)
    rc, _ = _run_cli(["ingest", str(src / "annotations.json"), "--out", str(out)], out.parent,
                     base / "human.log")
    assert rc == 0, (base / "human.log").read_text()[-2000:]
    created = {"human.log", "runs/human/out", *(f"runs/human/out/{p}" for p in _tree(out))}
    assert _tree(base) - before == created

    stats = json.loads((out / "stats.json").read_text())
    assert (stats["kept"], stats["quarantined"]) == (len(human.good), len(human.bad))
    assert stats["by_reason"] == human.by_reason()
    assert stats["captions_dropped"] == dict(sorted(Counter(r for _, r in human.dropped).items()))
    records = _records(out)
    counted = [(r["key"], r["reason"]) for r in records if "caption_index" not in r]
    dropped = [(r["key"], r["reason"]) for r in records if "caption_index" in r]
    assert Counter(counted) == Counter(human.bad) and Counter(dropped) == Counter(human.dropped)

    kept = {im.image_id: im for im in read_karpathy(out / "annotations.json")}
    assert set(kept) == set(human.good)  # lost: 0
    for image_id, want in human.good.items():
        assert (list(kept[image_id].captions), kept[image_id].split) == (want["captions"], want["split"])
        with Image.open(out / kept[image_id].image) as im:
            im.load()
    files = _tree(out)
    assert not any(os.path.islink(out / p) for p in files)  # the symlink to outside/ was not followed
    assert "images/huge.jpg" not in files and "images/link.jpg" not in files
    print(f"\nhuman: entries tried {human.tried}, good {len(human.good)}, bad {len(human.bad)}, "
          f"captions dropped {len(human.dropped)}, by reason {stats['by_reason']}")


@pytest.mark.timeout(120)  # a fifo read would block: fail instead of hanging
def test_dataset_reads_annotated_images_confined(corpus: tuple[Path, AdversarialTruth]) -> None:
    """Training datasets read Karpathy JSON directly: their image paths stay inside the root,
    and a fifo or a file above the size limit is skipped unread."""
    from blip_core.data.dataset import ImageTextDataset

    base, _ = corpus
    src = base / "corpus" / "human"
    entries = json.loads((src / "annotations.json").read_text())
    good = next(e for e in entries if isinstance(e, dict) and e.get("image_id") == "good008")
    probes = {"images/link.jpg": "unsafe_member_name", "/etc/hostname": "unsafe_member_name",
              "images/../../outside/secret.jpg": "unsafe_member_name", "images/fifo.jpg": "missing_image",
              "images/huge.jpg": "member_too_large", "images/nowhere.jpg": "missing_image"}
    ann = src / "probe.json"
    ann.write_text(json.dumps([good] + [{"image": p, "caption": ["a red circle"], "split": "train",
                                         "image_id": f"p{i}"} for i, p in enumerate(probes)]))
    try:
        ds = ImageTextDataset([f"{ann}:train"], image_size=16)
    finally:
        ann.unlink()
    assert ds.image_ids == ["good008"]
    assert ds.skipped == Counter(probes.values())

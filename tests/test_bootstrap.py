"""The whole lineage without orchestration, on a small world with a few steps per stage.

Quality (bootstrapped beats baseline) needs the full recipe; here the bookkeeping is checked
against what the world is known to contain.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from blip_core.bootstrap import main
from blip_core.checkpoint import is_checkpoint
from blip_core.data.formats import list_shards
from blip_core.data.ingest import iter_valid

N_WEB, N_HUMAN_TRAIN, N_HUMAN_TEST, CAPTIONS = 120, 40, 10, 5

OVERRIDES = [
    f"world.n_web={N_WEB}", f"world.n_human_train={N_HUMAN_TRAIN}", "world.n_human_val=8",
    f"world.n_human_test={N_HUMAN_TEST}", "world.shard_size=50",
    "pretrain.max_steps=4", "pretrain.batch_size=16", "pretrain.warmup_steps=1",
    "captioner.max_steps=2", "captioner.batch_size=16", "captioner.warmup_steps=1",
    "filter.max_steps=2", "filter.batch_size=16", "filter.warmup_steps=1",
    "capfilt.num_captions=2", "capfilt.batch_size=32", "capfilt.use_synthetic=true", "eval.k=4",
    "capfilt.calibration=human",
]  # use_synthetic=true: the paper's C + F, every path of the corpus (the CPU recipe leaves it off);
# calibration=human: the 4-step filter's web scores may or may not show two modes (the web
# calibration and its fallback are checked on known scores in test_generate.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("bootstrap")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--out", str(out), "--no-progress", *OVERRIDES]) == 0
    return out, json.loads((out / "report.json").read_text()), buf.getvalue()


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_report_has_the_documented_keys(run):
    out, report, printed = run
    metrics = {"tr@1", "tr@5", "ir@1", "ir@5", "bleu4", "cider"}
    assert set(report["baseline"]) == metrics and set(report["bootstrapped"]) == metrics
    assert set(report["filter"]) == {"precision", "recall", "threshold", "calibration"}
    assert {"web_kept", "web_removed", "synthetic_kept", "synthetic_removed"} <= set(report["corpus"])
    assert set(report["checkpoints"]) == {"pretrained", "captioner", "filter", "corpus", "bootstrapped"}
    for name, path in report["checkpoints"].items():
        assert name == "corpus" or is_checkpoint(path)
    # The report's numbers are the evaluation's, and on the test split's 10 images (50 captions)
    # a recall in percent is a whole number of queries: a multiple of 10 (TR) or of 2 (IR).
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    for name in ("baseline", "bootstrapped"):
        m = report[name]
        assert m == {k: evaluated[name][k] for k in metrics}, name
        for key, queries in (("tr@1", N_HUMAN_TEST), ("tr@5", N_HUMAN_TEST),
                             ("ir@1", N_HUMAN_TEST * CAPTIONS), ("ir@5", N_HUMAN_TEST * CAPTIONS)):
            hits = m[key] * queries / 100
            assert 0 <= hits <= queries and hits == pytest.approx(round(hits), abs=1e-6), (name, key, m)
        assert m["tr@1"] <= m["tr@5"] and m["ir@1"] <= m["ir@5"], (name, m)
        assert 0.0 <= m["bleu4"] <= 100.0 and 0.0 <= m["cider"] <= 1000.0, (name, m)  # CIDEr-D <= 10, x100
        assert evaluated[name]["n_images"] == N_HUMAN_TEST, name
    assert report["seconds"] > 0 and "| tr@1 |" in printed and "report.json" in printed


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_every_web_text_and_synthetic_caption_is_scored_once_and_counted(run):
    out, report, _ = run
    c = report["corpus"]
    assert c["web_kept"] + c["web_removed"] == N_WEB
    assert c["synthetic_kept"] + c["synthetic_removed"] == 2 * N_WEB  # two captions per image
    assert c["human"] == N_HUMAN_TRAIN * CAPTIONS
    scores = [json.loads(line) for line in (out / "corpus" / "scores.jsonl").read_text().splitlines()]
    assert sum(s["source"] == "web" for s in scores) == N_WEB
    assert sum(s["kept"] for s in scores) == c["web_kept"] + c["synthetic_kept"]
    assert all((s["prob"] >= report["filter"]["threshold"]) == s["kept"] for s in scores)


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_threshold_is_calibrated_on_the_human_val_split(run):
    """8 val images x 5 captions: 40 own captions (positives), 40 of other images (negatives)."""
    out, report, _ = run
    calibration = report["filter"]["calibration"]
    assert calibration["method"] == "human" and calibration["split"].endswith("annotations.json:val")
    assert (calibration["positives"], calibration["negatives"]) == (8 * CAPTIONS, 8 * CAPTIONS)
    assert calibration["threshold"] == report["filter"]["threshold"]
    # Youden's J is TPR - FPR at the threshold, each a share of the 40 positives / negatives
    tpr, fpr = calibration["tpr"], calibration["fpr"]
    assert calibration["youden_j"] == pytest.approx(tpr - fpr)
    for rate in (tpr, fpr):
        assert rate * 8 * CAPTIONS == pytest.approx(round(rate * 8 * CAPTIONS), abs=1e-6)
    assert calibration["youden_j"] >= 0.0  # the lowest cut keeps everything (J = 0): the best is no worse
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    assert manifest["calibration"] == calibration and manifest["config"]["threshold"] is None


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_corpus_shards_hold_human_pairs_and_exactly_the_kept_texts(run):
    out, report, _ = run
    c = report["corpus"]
    samples = [s for s in iter_valid(list_shards(out / "corpus")) if hasattr(s, "caption")]
    assert len(samples) == c["human"] + c["web_kept"] + c["synthetic_kept"]
    by_source: dict[str, int] = {}
    for s in samples:
        by_source[s.meta["source"]] = by_source.get(s.meta["source"], 0) + 1
    assert by_source.get("human", 0) == c["human"]
    assert by_source.get("web", 0) == c["web_kept"]
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    removed, kept = c["web_removed"], c["web_kept"]
    assert manifest["noise_ratio"]["web"] == pytest.approx(removed / (removed + kept))
    # no val/test human image is in the corpus: only train images were copied
    test_ids = {e["image_id"] for e in json.loads((out / "human" / "annotations.json").read_text())
                if e["split"] != "train"}
    assert not {s.meta["image_id"].split("/", 1)[1] for s in samples
                if s.meta["source"] == "human"} & test_ids


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_corpus_without_synthetic_captions_scores_them_but_keeps_only_web_and_human(run, tmp_path):
    from blip_core.capfilt import CapfiltConfig, build_corpus

    out, report, _ = run
    manifest = build_corpus([str(out / "filter")], [str(out / "web")], out / "synthetic",
                            out / "human" / "annotations.json", tmp_path / "corpus",
                            CapfiltConfig(threshold=report["filter"]["threshold"], use_synthetic=False),
                            progress=False)
    c = report["corpus"]
    assert manifest["counts"] == {k: c[k] for k in ("human", "web_kept", "web_removed",
                                                     "synthetic_kept", "synthetic_removed")}
    assert manifest["use_synthetic"] is False and manifest["total"] == c["human"] + c["web_kept"]
    samples = iter_valid(list_shards(tmp_path / "corpus"))
    sources = [s.meta["source"] for s in samples if hasattr(s, "caption")]
    assert sources.count("synthetic") == 0 and len(sources) == c["human"] + c["web_kept"]
    assert (tmp_path / "corpus" / "scores.jsonl").read_text() == (out / "corpus" / "scores.jsonl").read_text()


def _removed_web_truth(out: Path, corpus: str) -> tuple[list[bool], int]:
    """Whether each web text the filter removed from ``corpus`` is noisy; the noisy total."""
    truth = {}
    for line in (out / "world" / "truth" / "web_truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth[row["key"]] = row["noisy"]
    scores = [json.loads(line) for line in (out / corpus / "scores.jsonl").read_text().splitlines()]
    return [truth[s["key"]] for s in scores if s["source"] == "web" and not s["kept"]], sum(truth.values())


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_filter_quality_matches_the_stored_truth(run):
    out, report, _ = run
    removed, noisy_total = _removed_web_truth(out, "corpus")
    assert noisy_total == round(0.4 * N_WEB)
    if removed:
        assert report["filter"]["precision"] == pytest.approx(sum(removed) / len(removed))
    assert report["filter"]["recall"] == pytest.approx(sum(removed) / noisy_total)


@pytest.mark.slow  # the `run` fixture: the whole lineage, a few steps per stage
def test_a_second_run_skips_every_completed_stage(run):
    out, report, _ = run
    import contextlib
    import io

    before = {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")}
    with contextlib.redirect_stdout(io.StringIO()):
        main(["--out", str(out), "--no-progress", *OVERRIDES])
    again = json.loads((out / "report.json").read_text())
    assert again["baseline"] == report["baseline"] and again["bootstrapped"] == report["bootstrapped"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model.safetensors")} == before
    assert all(stage.get("skipped") for stage in again["stages"].values())


def test_a_partial_yaml_recipe_keeps_the_other_recipe_defaults(tmp_path):
    """``pretrain: {max_steps: 100}`` changes the steps only: lr stays the recipe's 1e-3 (not
    ``Stage``'s class default), and the capfilt section keeps the recipe's use_synthetic."""
    from blip_core.config import load_yaml
    from blip_core.recipe import Recipe, Stage

    recipe = Recipe()
    assert recipe.pretrain.lr != Stage.__dataclass_fields__["lr"].default  # the case that matters
    (tmp_path / "r.yaml").write_text("pretrain: {max_steps: 100}\ncapfilt: {threshold: 0.4}\n")
    cfg = load_yaml(Recipe, tmp_path / "r.yaml")
    assert cfg.pretrain == replace(recipe.pretrain, max_steps=100)
    assert cfg.capfilt == replace(recipe.capfilt, threshold=0.4)
    assert cfg.filter == recipe.filter and cfg.world == recipe.world


@pytest.mark.slow  # the `run` fixture, then a second round
def test_a_second_round_is_what_the_report_scores(run, tmp_path):
    """rounds=2 continues from the first round's folders and reports the second round's corpus,
    filter quality and models."""
    import contextlib
    import io
    import shutil

    out = tmp_path / "two-rounds"
    shutil.copytree(run[0], out)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--out", str(out), "--no-progress", *OVERRIDES, "rounds=2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rounds"] == 2
    assert {k: Path(v).name for k, v in report["checkpoints"].items()} == {
        "pretrained": "pretrained", "captioner": "captioner_r2", "filter": "filter_r2",
        "corpus": "corpus_r2", "bootstrapped": "bootstrapped_r2"}
    manifest = json.loads((out / "corpus_r2" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert {k: report["corpus"][k] for k in ("web_kept", "web_removed")} == \
        {k: counts[k] for k in ("web_kept", "web_removed")}
    removed, noisy_total = _removed_web_truth(out, "corpus_r2")
    assert report["filter"]["recall"] == pytest.approx(sum(removed) / noisy_total)
    assert report["filter"]["threshold"] == manifest["threshold"]

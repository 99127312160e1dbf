"""Retrieval and captioning metrics on hand-made cases, and an end-to-end evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from blip_core.config import model_preset
from blip_core.evaluate import (
    RETRIEVAL_KEYS,
    caption_metrics,
    caption_tokens,
    compare_table,
    gt_ranks,
    recall_metrics,
    retrieval_scores,
)
from blip_core.model import BlipModel


def _tiny() -> BlipModel:
    torch.manual_seed(0)
    return BlipModel(model_preset("tiny")).eval()


# --- ranking -------------------------------------------------------------------------------


def test_rank_of_the_best_ground_truth_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],   # gt {2}: only 0.9 above -> rank 1
                           [0.2, 0.8, 0.7, 0.1],   # gt {2, 3}: best gt 0.7, one above -> 1
                           [0.4, 0.4, 0.1, 0.0],   # gt {0}: a non-gt ties with it -> 1
                           [0.1, 0.2, 0.3, 0.9]])  # gt {3}: on top -> 0
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[0, 2] = gt[1, 2] = gt[1, 3] = gt[2, 0] = gt[3, 3] = True
    assert gt_ranks(scores, gt).tolist() == [1, 1, 1, 0]


def _scores_with_ranks(ranks: list[int], n_cand: int, gts: list[list[int]]) -> torch.Tensor:
    """A score matrix where the best ground truth of row q sits at 0-based rank ``ranks[q]``."""
    rows = []
    for rank, gt in zip(ranks, gts, strict=True):
        others = [c for c in range(n_cand) if c not in gt]
        order = others[:rank] + gt + others[rank:]  # other gts right below the best one
        row = torch.empty(n_cand)
        row[torch.tensor(order)] = torch.linspace(1.0, 0.0, n_cand)
        rows.append(row)
    return torch.stack(rows)


def test_recall_at_k_on_a_matrix_with_known_ranks():
    n_img, per = 12, 2  # 12 images, 2 captions each
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    tr_ranks = [0, 0, 0, 1, 2, 4, 5, 7, 9, 10, 15, 21]
    ir_ranks = [0] * 6 + [1] * 6 + [4] * 4 + [6] * 4 + [11] * 4
    i2t = _scores_with_ranks(tr_ranks, n_img * per, img2txt)
    t2i = _scores_with_ranks(ir_ranks, n_img, [[i] for i in txt2img])
    m = recall_metrics(i2t, t2i, img2txt, txt2img)
    assert m["tr@1"] == pytest.approx(100 * 3 / 12)
    assert m["tr@5"] == pytest.approx(100 * 6 / 12)
    assert m["tr@10"] == pytest.approx(100 * 9 / 12)
    assert m["ir@1"] == pytest.approx(100 * 6 / 24)
    assert m["ir@5"] == pytest.approx(100 * 16 / 24)
    assert m["ir@10"] == pytest.approx(100 * 20 / 24)
    assert m["r_mean"] == pytest.approx((25 + 50 + 75 + 25 + 100 * 16 / 24 + 100 * 20 / 24) / 6)


def _blip_itm_eval(i2t: np.ndarray, t2i: np.ndarray, img2txt, txt2img) -> dict[str, float]:
    """BLIP's argsort formulation, written out for comparison (valid without ties)."""
    tr = [min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in img2txt[i])
          for i, row in enumerate(i2t)]
    ir = [np.where(np.argsort(row)[::-1] == txt2img[t])[0][0] for t, row in enumerate(t2i)]
    out = {f"tr@{k}": 100 * float(np.mean(np.array(tr) < k)) for k in (1, 5, 10)}
    out |= {f"ir@{k}": 100 * float(np.mean(np.array(ir) < k)) for k in (1, 5, 10)}
    return out


def test_recall_matches_blips_argsort_formulation_on_random_scores():
    g = torch.Generator().manual_seed(0)
    img2txt = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(20)]
    txt2img = [t // 3 for t in range(60)]
    i2t, t2i = torch.rand(20, 60, generator=g), torch.rand(60, 20, generator=g)
    ours = recall_metrics(i2t, t2i, img2txt, txt2img)
    theirs = _blip_itm_eval(i2t.numpy(), t2i.numpy(), img2txt, txt2img)
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs)


def test_itm_reranks_only_the_top_k_pairs_each_once(tokenizer):
    from blip_core.filtering import tokenize_texts

    model = _tiny()
    texts = ["a red circle", "a blue square", "a green star on the left", "click here",
             "a small yellow triangle", "two shapes", "a purple star", "a white circle at the top"]
    ids, mask = tokenize_texts(tokenizer, texts, model.cfg.max_text_len)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    itm_rows: list[int] = []
    hook = model.itm_head.register_forward_hook(lambda m, a, o: itm_rows.append(a[0].shape[0]))
    with torch.inference_mode():
        embeds = model.encode_image(images)
        i2t, t2i = retrieval_scores(model, embeds, ids, mask, k=2, batch_size=5)
        hook.remove()
        sims = model.image_features(embeds) @ model.text_features(ids, mask).t()
        top_t, top_i = sims.topk(2, dim=1).indices, sims.t().topk(2, dim=1).indices
        pairs = {(i, int(t)) for i in range(4) for t in top_t[i]}
        pairs |= {(int(i), t) for t in range(8) for i in top_i[t]}
        assert sum(itm_rows) == len(pairs) < 4 * 8  # each distinct top-k pair once, not all 32
        assert torch.isfinite(i2t).sum(1).tolist() == [2] * 4
        assert torch.isfinite(t2i).sum(1).tolist() == [2] * 8
        for i, t in pairs:  # score = ITM match logit + ITC similarity, pair by pair
            itm = model.itm_logits(embeds[i : i + 1], ids[t : t + 1], mask[t : t + 1])[0, 1]
            expected = itm + sims[i, t]
            if t in top_t[i]:
                assert_close(i2t[i, t], expected, atol=1e-4, rtol=1e-4)
            if i in top_i[t]:
                assert_close(t2i[t, i], expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    from blip_core.tokenizer import load_tokenizer

    return load_tokenizer()


# --- captioning metrics --------------------------------------------------------------------


def test_caption_tokens_lower_case_without_punctuation():
    assert caption_tokens("A Red, circle -- on the LEFT.") == "a red circle on the left"


def test_bleu4_known_cases():
    refs = {"a": ["the cat sat on a mat"], "b": ["a dog runs in the park today"]}
    same = caption_metrics({k: v[0] for k, v in refs.items()}, refs)
    assert same["bleu4"] == pytest.approx(100.0, abs=1e-4)
    # unigram 5/6, bigram 3/5, trigram 2/4, 4-gram 1/3, equal lengths (no brevity penalty)
    one = caption_metrics({"a": "The cat sat on the mat."}, {"a": refs["a"]})
    assert one["bleu4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
    none = caption_metrics({"a": "purple elephants dancing"}, {"a": refs["a"]})
    assert none["bleu4"] < 1e-3 and none["cider"] == 0.0


def test_cider_known_case():
    # Two images, one reference each: every n-gram's document frequency is 1 of 2 images.
    refs = {"a": ["a b c d e"], "b": ["x y q"]}
    m = caption_metrics({"a": "a b c d e", "b": "x y z"}, refs)
    # image a: identical -> cosine 1 for n = 1..4, times 10; image b: n=1 2/3, n=2 1/2, else 0
    expected = (10.0 + 10.0 * (2 / 3 + 1 / 2) / 4) / 2
    assert m["cider"] == pytest.approx(100 * expected, rel=1e-6)  # reported x100


def test_caption_metrics_need_the_same_images():
    with pytest.raises(ValueError):
        caption_metrics({"a": "x"}, {"b": ["x"]})


# --- comparison ----------------------------------------------------------------------------


def test_compare_table_puts_models_side_by_side_with_deltas():
    table = compare_table({"baseline": {"tr@1": 10.0, "cider": 100.0, "seconds": 3.0},
                           "bootstrapped": {"tr@1": 12.5, "cider": 90.0}})
    lines = table.splitlines()
    assert lines[0] == "| metric | baseline | bootstrapped | Δ bootstrapped − baseline |"
    assert "| tr@1 | 10.00 | 12.50 | +2.50 |" in lines
    assert "| cider | 100.00 | 90.00 | -10.00 |" in lines
    assert len(lines) == 4  # header, rule, the two metrics both have (no timings)


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    from blip_core.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("eval_ckpts")
    a = save_checkpoint(root / "a", _tiny(), tokenizer, meta={})
    torch.manual_seed(1)
    b = save_checkpoint(root / "b", BlipModel(model_preset("tiny")), tokenizer, meta={})
    return a, b


def test_evaluate_checkpoint_end_to_end(tiny_world, checkpoints):
    from blip_core.evaluate import evaluate_checkpoint

    ann = str(tiny_world / "human" / "annotations.json")
    m = evaluate_checkpoint(checkpoints[0], ann, split="test", k=8, batch_size=32,
                            caption_kwargs={"max_length": 8, "min_length": 2})
    assert m["n_images"] == 16 and m["n_texts"] == 80
    for key in RETRIEVAL_KEYS[:-1]:  # a share of the 16 image (TR) or 80 text (IR) queries, in %
        queries = 16 if key.startswith("tr") else 80
        hits = m[key] * queries / 100
        assert 0 <= hits <= queries and hits == pytest.approx(round(hits), abs=1e-6), (key, m[key])
    assert 0.0 <= m["bleu4"] <= 100.0 and 0.0 <= m["cider"] <= 1000.0  # CIDEr-D is at most 10, x100
    assert m["seconds"] > 0
    assert m["r_mean"] == pytest.approx(sum(m[k] for k in RETRIEVAL_KEYS[:-1]) / 6)
    # recall is monotone in K
    assert m["tr@1"] <= m["tr@5"] <= m["tr@10"] and m["ir@1"] <= m["ir@5"] <= m["ir@10"]


def test_split_suffix_overrides_the_split_argument(tiny_world):
    from blip_core.evaluate import _split_spec

    ann = str(tiny_world / "human" / "annotations.json")
    assert _split_spec(f"{ann}:val", "test") == (ann, "val")
    assert _split_spec(ann, "test") == (ann, "test")


def test_eval_command_writes_metrics_table_and_plot(tiny_world, checkpoints, tmp_path, capsys):
    from blip_core.evaluate import main

    out = tmp_path / "eval"
    argv = ["--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]),
            "--name", "baseline", "--name", "bootstrapped",
            "--data", f"{tiny_world / 'human' / 'annotations.json'}:test", "--out", str(out),
            "--k", "4", "--caption-method", "greedy", "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["metrics"]) == ["baseline", "bootstrapped"]
    assert all(not math.isnan(v) for m in metrics["metrics"].values() for v in m.values())
    table = (out / "comparison.md").read_text()
    assert table in capsys.readouterr().out
    assert "Δ bootstrapped − baseline" in table and "| cider |" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

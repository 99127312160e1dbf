"""Captioning (greedy, nucleus, beam with a KV cache) and the CapFilt filter on known answers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.testing import assert_close

from blip_core.config import DEC_TOKEN_ID, SEP_TOKEN_ID, model_preset
from blip_core.filtering import filter_decisions, itm_probabilities, score_dataset
from blip_core.generate import (
    apply_repetition_penalty,
    generate_captions,
    generate_token_ids,
    inference,
    prompt_token_ids,
    sample_top_p,
)
from blip_core.model import BlipModel

MAX_LEN, MIN_LEN = 12, 2
# The lengths count generated tokens and beams are normalised as transformers 5 does: the
# references below are written that way (tests/test_decoding_blip.py pins BLIP's rules).
HF5 = {"lengths": "new_tokens", "beam_norm": "transformers"}


@pytest.fixture(scope="module")
def tokenizer():
    from blip_core.tokenizer import load_tokenizer

    return load_tokenizer()


def _tiny(seed: int = 0) -> BlipModel:
    torch.manual_seed(seed)
    return BlipModel(model_preset("tiny")).eval()


@pytest.fixture(scope="module")
def peaked() -> BlipModel:
    """A random tiny model made opinionated: sharper next-token distributions, [SEP] likely
    enough that captions of different images end at different lengths, images that matter."""
    model = _tiny()
    with torch.no_grad():
        model.lm_head.norm.weight.fill_(12.0)
        model.lm_head.bias[SEP_TOKEN_ID] = 9.0
        for layer in model.text_encoder.layers:
            layer.cross_attn.value.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def prompt(tokenizer) -> torch.Tensor:
    return prompt_token_ids(tokenizer, "a picture of ")


def _ids(model, images, prompt, **kw) -> list[list[list[int]]]:
    with inference(model):
        embeds = model.encode_image(images)
        return generate_token_ids(model, embeds, prompt, max_length=MAX_LEN, min_length=MIN_LEN,
                                  **HF5, **kw).tokens


@contextmanager
def _count_calls(module: torch.nn.Module, record: list) -> Iterator[list]:
    handle = module.register_forward_hook(lambda m, args, out: record.append(tuple(args[0].shape)))
    try:
        yield record
    finally:
        handle.remove()


def _reference_greedy(model, images, prompt, penalty: float = 1.0) -> list[list[int]]:
    """Argmax decoding without a cache: the whole prefix is run again at every step."""
    out = []
    with torch.no_grad():
        embeds = model.encode_image(images)
        for b in range(images.shape[0]):
            seq = prompt[None].clone()
            generated: list[int] = []
            for t in range(MAX_LEN):
                logits = model.lm_logits(embeds[b : b + 1], seq, torch.ones_like(seq))[0, -1:]
                logits = apply_repetition_penalty(logits, seq, penalty)[0]
                if t < MIN_LEN:
                    logits[SEP_TOKEN_ID] = float("-inf")
                token = int(logits.argmax())
                generated.append(token)
                if token == SEP_TOKEN_ID:
                    break
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            out.append(generated)
    return out


def _normalised_logprob(model, image_embeds, prompt, tokens: list[int]) -> float:
    """Teacher-forced sum of log p(token) / number of tokens (beam search's objective)."""
    seq = torch.cat([prompt, torch.tensor(tokens[:-1], dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model.lm_logits(image_embeds, seq, torch.ones_like(seq))
    logp = logits[0, len(prompt) - 1 :].log_softmax(-1)  # predictions of the generated tokens
    return float(logp.gather(1, torch.tensor(tokens)[:, None]).sum()) / len(tokens)


# --- building blocks -----------------------------------------------------------------------


def test_prompt_is_dec_then_words_without_sep(tokenizer):
    assert prompt_token_ids(tokenizer, "a picture of ").tolist() == [DEC_TOKEN_ID, 1037, 3861, 1997]
    assert prompt_token_ids(tokenizer, "").tolist() == [DEC_TOKEN_ID]


def test_repetition_penalty_as_hf_defines_it():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(scores, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # seen: positive halved, negative doubled


def _frequencies(logits: torch.Tensor, top_p: float, n: int = 20000) -> torch.Tensor:
    draws = sample_top_p(logits.expand(n, -1), top_p, torch.Generator().manual_seed(0))
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / n


def test_nucleus_samples_from_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log()
    assert_close(_frequencies(logits, 0.75), torch.tensor([0.625, 0, 0.375, 0]), atol=0.015, rtol=0)
    assert_close(_frequencies(logits, 0.9), torch.tensor([0.5, 0, 0.3, 0.15]) / 0.95,
                 atol=0.015, rtol=0)
    assert _frequencies(logits, 1e-9).tolist() == [1.0, 0.0, 0.0, 0.0]  # never empty


def test_nucleus_wider_than_the_first_candidates():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 0.3  # flat-ish
    ordered = logits[0].softmax(-1).sort(descending=True)
    nucleus = ordered.indices[ordered.values.cumsum(0) - ordered.values < 0.5]
    assert len(nucleus) > 64  # more than the first topk holds
    seen = set(torch.nonzero(_frequencies(logits, 0.5))[:, 0].tolist())
    assert seen <= set(nucleus.tolist()) and len(seen) > 0.9 * len(nucleus)


def test_nucleus_rows_of_one_batch_each_use_their_own_set():
    """A peaked row next to a flat one (whose set needs more than the first 1024 candidates):
    each samples from its own nucleus, in one call."""
    peaked = torch.tensor([[0.5, 0.05, 0.3, 0.15] + [1e-9] * 2000]).log()
    flat = torch.randn(1, 2004, generator=torch.Generator().manual_seed(0)) * 0.3
    draws = sample_top_p(torch.cat([peaked, flat]).repeat(20000, 1), 0.75,
                         torch.Generator().manual_seed(1))
    freq = torch.bincount(draws[0::2], minlength=4)[:4].float() / 20000
    assert_close(freq, torch.tensor([0.625, 0, 0.375, 0]), atol=0.015, rtol=0)
    ordered = flat[0].softmax(-1).sort(descending=True)
    nucleus = set(ordered.indices[ordered.values.cumsum(0) - ordered.values < 0.75].tolist())
    assert len(nucleus) > 1024 and set(draws[1::2].tolist()) <= nucleus


# --- decoding ------------------------------------------------------------------------------


def test_greedy_with_kv_cache_equals_recomputing_the_prefix(peaked, images, prompt):
    cached = [caps[0] for caps in _ids(peaked, images, prompt, method="greedy")]
    reference = _reference_greedy(peaked, images, prompt)
    assert cached == reference
    lengths = {len(c) for c in cached}
    assert len(lengths) > 1  # rows finished at different steps: the cache was pruned mid-way
    assert any(c[-1] == SEP_TOKEN_ID for c in cached) and MAX_LEN in lengths


def test_repetition_penalty_reaches_greedy_decoding(peaked, images, prompt):
    cached = _ids(peaked, images[:3], prompt, method="greedy", repetition_penalty=1.5)
    assert [c[0] for c in cached] == _reference_greedy(peaked, images[:3], prompt, penalty=1.5)


@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_image_encoded_once_prompt_fed_once_then_one_token_per_step(
    peaked, tokenizer, images, method
):
    vit, text, cross_key = [], [], []
    with (_count_calls(peaked.visual_encoder.patch_embed, vit),
          _count_calls(peaked.text_encoder.embeddings, text),
          _count_calls(peaked.text_encoder.layers[0].cross_attn.key, cross_key)):
        generate_captions(peaked, tokenizer, images[:4], method=method, num_captions=2,
                          max_length=MAX_LEN, min_length=MIN_LEN, **HF5,
                          generator=torch.Generator().manual_seed(0))
    assert len(vit) == 1 and vit[0][0] == 4  # one ViT forward for the batch
    assert len(cross_key) == 1  # image keys/values computed once, then read from the cache
    assert text[0] == (4, 4)  # [DEC] a picture of, once per image
    assert all(shape[1] == 1 for shape in text[1:]) and 1 < len(text) <= MAX_LEN
    rows = 4 * (3 if method == "beam" else 2)  # beams or captions per image
    assert all(shape[0] <= rows for shape in text[1:])


def test_beams_of_an_image_share_its_cross_attention_keys_and_values(peaked, images, prompt):
    seen: list[tuple[int, int]] = []  # (query rows, key/value rows) of each cached step
    cross = peaked.text_encoder.layers[0].cross_attn
    handle = cross.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0].shape[0], kwargs["past"][0].shape[0]))
        if kwargs.get("past") is not None else None, with_kwargs=True)
    try:
        with inference(peaked):
            embeds = peaked.encode_image(images)
            kw = dict(method="beam", num_beams=3, num_captions=3, max_length=MAX_LEN,
                      min_length=MIN_LEN, **HF5)
            batched = generate_token_ids(peaked, embeds, prompt, **kw)
            n_batched = len(seen)
            alone = [generate_token_ids(peaked, embeds[i : i + 1], prompt, **kw)
                     for i in range(len(images))]
    finally:
        handle.remove()
    assert seen and all(rows == 3 * images_ for rows, images_ in seen)  # 3 beams, 1 copy
    assert len({images_ for _, images_ in seen[:n_batched]}) > 2  # images left mid-search
    # the images that stay keep their own image keys: the batch gives each image's own result
    assert batched.tokens == [a.tokens[0] for a in alone]
    assert_close(torch.tensor(batched.scores), torch.tensor([a.scores[0] for a in alone]))


@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_min_and_max_length_are_respected(method, images, prompt):
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.bias[SEP_TOKEN_ID] = 100.0  # [SEP] wins whenever it is allowed
    eager = _ids(model, images[:2], prompt, method=method, generator=g)
    assert all(ids == ids[:MIN_LEN] + [SEP_TOKEN_ID] and SEP_TOKEN_ID not in ids[:MIN_LEN]
               for caps in eager for ids in caps)
    with torch.no_grad():
        model.lm_head.bias[SEP_TOKEN_ID] = -100.0  # [SEP] never wins
    endless = _ids(model, images[:2], prompt, method=method, generator=g)
    assert all(len(ids) == MAX_LEN and SEP_TOKEN_ID not in ids for caps in endless for ids in caps)


def test_beam_search_with_one_beam_is_greedy(peaked, images, prompt):
    assert _ids(peaked, images, prompt, method="beam", num_beams=1) == \
        _ids(peaked, images, prompt, method="greedy")


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(peaked, images, prompt):
    with inference(peaked):
        embeds = peaked.encode_image(images)
        beam = generate_token_ids(peaked, embeds, prompt, method="beam", num_beams=3,
                                  num_captions=3, max_length=MAX_LEN, min_length=MIN_LEN, **HF5)
    greedy = _ids(peaked, images, prompt, method="greedy")
    better = as_good = 0
    for b in range(images.shape[0]):
        # the reported scores are the model's length-normalised log-probabilities, best first
        recomputed = [_normalised_logprob(peaked, embeds[b : b + 1], prompt, ids)
                      for ids in beam.tokens[b]]
        assert_close(torch.tensor(beam.scores[b]), torch.tensor(recomputed), atol=1e-4, rtol=0)
        assert beam.scores[b] == sorted(beam.scores[b], reverse=True)
        assert len({tuple(ids) for ids in beam.tokens[b]}) == 3
        greedy_score = _normalised_logprob(peaked, embeds[b : b + 1], prompt, greedy[b][0])
        as_good += beam.scores[b][0] >= greedy_score - 1e-5
        better += beam.scores[b][0] > greedy_score + 1e-3
    # Beam search is not guaranteed to beat greedy on every input (greedy's prefix can fall out
    # of the beam), but a working one rarely loses and often wins.
    assert as_good >= 7 and better >= 2, (as_good, better)


def test_nucleus_with_a_tiny_top_p_is_greedy(peaked, images, prompt):
    g = torch.Generator().manual_seed(0)
    sampled = _ids(peaked, images, prompt, method="nucleus", top_p=1e-6, generator=g)
    assert sampled == _ids(peaked, images, prompt, method="greedy", repetition_penalty=1.1)


def test_nucleus_gives_several_different_reproducible_captions(peaked, tokenizer, images):
    def run(seed: int) -> list[list[str]]:
        return generate_captions(peaked, tokenizer, images[:2], method="nucleus", num_captions=4,
                                 max_length=MAX_LEN, min_length=MIN_LEN, **HF5,
                                 generator=torch.Generator().manual_seed(seed))

    captions = run(0)
    assert [len(c) for c in captions] == [4, 4]
    assert all(len(set(caps)) > 1 for caps in captions)
    assert run(0) == captions and run(1) != captions


def test_captions_are_decoded_without_the_prompt(tokenizer, images):
    model = _tiny()
    red = tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad():
        model.lm_head.bias[red] = 100.0
    captions = generate_captions(model, tokenizer, images[:2], method="greedy", max_length=5,
                                 min_length=0, prompt="A Picture of ", **HF5)
    assert captions == [["red red red red red"]] * 2
    assert model.training is False


# --- the filter ----------------------------------------------------------------------------


def test_itm_probabilities_encode_each_image_once_and_match_pairwise(tokenizer, images):
    from blip_core.filtering import tokenize_texts

    model = _tiny()
    texts = [["a red circle", "Click here!", "a blue square on the left"], [], ["a green star"]]
    vit: list = []
    with _count_calls(model.visual_encoder.patch_embed, vit):
        probs = itm_probabilities(model, tokenizer, images[:3], texts)
    assert vit == [(2, 3, 64, 64)]  # the two images with texts, in one forward
    assert [p.shape[0] for p in probs] == [3, 0, 1]
    with torch.no_grad():
        for b, group in enumerate(texts):
            for j, text in enumerate(group):
                ids, mask = tokenize_texts(tokenizer, [text], model.cfg.max_text_len)
                logits = model.itm_logits(model.encode_image(images[b : b + 1]), ids, mask)
                assert_close(probs[b][j], logits.softmax(-1)[0, 1], atol=1e-5, rtol=1e-5)


def test_filter_decisions_mark_low_probabilities_noisy():
    keep = filter_decisions([0.2, 0.5, 0.7, 0.49], threshold=0.5)
    assert keep.tolist() == [False, True, True, False]
    assert filter_decisions(torch.tensor([0.3]), threshold=0.25).tolist() == [True]



def test_youden_threshold_on_hand_checked_scores():
    from blip_core.capfilt import youden_threshold

    # Cuts from the top: 0.9 -> J 1/3; 0.4 -> TPR 2/3, FPR 0, J 2/3; 0.35 -> J 1/3; 0.3 -> TPR 1,
    # FPR 1/3, J 2/3 (a tie: the higher cut wins); the threshold sits halfway from 0.4 to 0.35.
    best = youden_threshold([0.3, 0.4, 0.9], [0.01, 0.05, 0.35])
    assert best["threshold"] == pytest.approx(0.375)
    assert (best["tpr"], best["fpr"], best["youden_j"]) == pytest.approx((2 / 3, 0.0, 2 / 3))
    # Separable scores: the cut between the lowest positive (0.2) and the highest negative (0.1).
    assert youden_threshold([0.2, 0.9], [0.01, 0.1])["threshold"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="positive and negative"):
        youden_threshold([0.5], [])


def _sigmoid(logits):
    return [1.0 / (1.0 + math.exp(-z)) for z in logits]


def test_otsu_threshold_on_hand_checked_scores():
    from blip_core.capfilt import otsu_threshold

    # Logits: 10 at -6, 10 at -4, 20 at 2 (mean -1.5, variance 12.75). Cut above -4: groups of
    # means -5 and 2, between-group variance 0.25 * 49 = 12.25 (above -6 only: 6.75), so the cut
    # is halfway between -4 and 2, at logit -1, with η = 12.25 / 12.75.
    fit = otsu_threshold(_sigmoid([-6.0] * 10 + [-4.0] * 10 + [2.0] * 20))
    assert fit["threshold"] == pytest.approx(1.0 / (1.0 + math.e))
    assert fit["separability"] == pytest.approx(12.25 / 12.75)
    assert (fit["noise_share"], fit["texts"]) == (0.5, 40)


def test_otsu_threshold_refuses_one_mode_and_too_few_scores():
    from blip_core.capfilt import otsu_threshold

    one_mode = torch.randn(3000, generator=torch.Generator().manual_seed(0)).tolist()
    with pytest.raises(ValueError, match="two clear modes"):
        otsu_threshold(_sigmoid(one_mode))  # η of one Gaussian: 2/π ≈ 0.64
    with pytest.raises(ValueError, match="too few"):
        otsu_threshold([0.01] * 5 + [0.9] * 5)


def test_choose_threshold_web_then_human_fallback_then_fixed():
    from blip_core.capfilt import CapfiltConfig, choose_threshold, otsu_threshold

    two_modes = _sigmoid([-6.0] * 10 + [-4.0] * 10 + [2.0] * 20)
    rows = [{"source": "web", "prob": p} for p in two_modes]
    rows += [{"source": "synthetic", "prob": 0.999}] * 40  # synthetic scores do not calibrate
    human = {"threshold": 0.3, "youden_j": 0.9, "tpr": 0.95, "fpr": 0.05, "split": "x.json:val"}
    asked: list[int] = []

    def calibrate_human():
        asked.append(1)
        return human

    threshold, how = choose_threshold(rows, CapfiltConfig(), calibrate_human)
    assert threshold == otsu_threshold(two_modes)["threshold"] and how["method"] == "web"
    assert asked == []  # the human split is not scored when the web calibration works
    flat = [{"source": "web", "prob": 0.5}] * 40
    threshold, how = choose_threshold(flat, CapfiltConfig(), calibrate_human)
    assert threshold == 0.3 and how["method"] == "human" and "two clear modes" in how["fallback_reason"]
    threshold, how = choose_threshold(rows, CapfiltConfig(calibration="human"), calibrate_human)
    assert threshold == 0.3 and "fallback_reason" not in how and len(asked) == 2
    assert choose_threshold(rows, CapfiltConfig(threshold=0.5), calibrate_human) == (0.5, None)


def test_filter_quality_counts_web_decisions_and_synthetic_correctness(tmp_path):
    from blip_core.capfilt import filter_quality

    circle = {"shapes": [{"color": "red", "kind": "circle", "size": "large", "position": "left"}],
              "seed": 1}
    star = {"shapes": [{"color": "blue", "kind": "star", "size": "small", "position": "top"}],
            "seed": 2}
    truth = [{"key": "a", "noisy": False, "scene": circle}, {"key": "b", "noisy": True, "scene": star},
             {"key": "c", "noisy": True, "scene": circle}]
    (tmp_path / "truth.jsonl").write_text("\n".join(json.dumps(r) for r in truth) + "\n")
    rows = [  # web: a (clean) removed, b (noisy) removed, c (noisy) kept -> P 1/2, R 1/2
        ("a", "web", "a large red circle on the left", False),
        ("b", "web", "click here", False),
        ("c", "web", "a blue star", True),
        # synthetic: true of the image or not, kept or not
        ("a", "synthetic", "a large red circle on the left", True),  # kept, correct
        ("a", "synthetic", "a large red square on the left", True),  # kept, wrong kind
        ("b", "synthetic", "a small blue star at the top", False),  # removed, correct
        ("b", "synthetic", "a small green star at the top", True),  # kept, wrong colour
        ("c", "synthetic", "a red circle", False),  # removed, correct (partial)
    ]
    (tmp_path / "scores.jsonl").write_text("\n".join(
        json.dumps({"key": k, "source": s, "text": t, "prob": 0.5, "kept": kept})
        for k, s, t, kept in rows) + "\n")
    q = filter_quality(tmp_path / "scores.jsonl", tmp_path / "truth.jsonl")
    assert (q["precision"], q["recall"]) == (0.5, 0.5)
    assert (q["removed_noisy"], q["removed_clean"], q["kept_noisy"]) == (1, 1, 1)
    assert (q["synthetic_kept_correct"], q["synthetic_kept_wrong"]) == (1, 2)
    assert (q["synthetic_removed_correct"], q["synthetic_removed_wrong"]) == (2, 0)
    assert q["synthetic_kept_wrong_ratio"] == pytest.approx(2 / 3)


def test_score_dataset_scores_the_texts_of_each_key(tokenizer, images):
    model = _tiny()
    dataset = [(images[i], f"k{i}") for i in range(5)]
    texts = {"k0": ["a red circle"], "k3": ["a star", "click here"], "nope": ["x"]}
    scores = score_dataset(model, tokenizer, dataset, texts, batch_size=2, progress=False)
    assert set(scores) == {"k0", "k3"} and len(scores["k3"]) == 2
    direct = itm_probabilities(model, tokenizer, images[3:4], [texts["k3"]])[0]
    assert_close(torch.tensor(scores["k3"]), direct, atol=1e-5, rtol=1e-5)


# --- command lines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    from blip_core.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", _tiny(), tokenizer, meta={})


def test_caption_and_filter_commands(tiny_world, checkpoint, tmp_path, capsys):
    from blip_core import filtering, generate
    from blip_core.data.dataset import ImageOnlyDataset

    shard = tiny_world / "web" / "00000.tar"
    captions = tmp_path / "captions.jsonl"
    assert generate.main(["--checkpoint", str(checkpoint), "--data", str(shard), "--out",
                          str(captions), "--method", "beam", "--num-beams", "2",
                          "--num-captions", "2", "--max-length", "6",
                          "--min-length", "2", "--batch-size", "16", "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    keys = ImageOnlyDataset(shard).keys
    lines = [json.loads(line) for line in captions.read_text().splitlines()]
    assert [r["key"] for r in lines] == keys
    assert all(len(r["captions"]) == 2 and all(isinstance(c, str) for c in r["captions"])
               for r in lines)

    scores = tmp_path / "scores.jsonl"
    assert filtering.main(["--checkpoint", str(checkpoint), "--data", str(shard), "--texts",
                           str(captions), "--out", str(scores), "--threshold", "0.5",
                           "--no-progress"]) == 0
    assert "pairs/s" in capsys.readouterr().out
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["key"] for r in rows] == keys
    for row, cap in zip(rows, lines, strict=True):
        assert row["origin"] == ["own", "extra", "extra"] and row["texts"][1:] == cap["captions"]
        assert row["keep"] == [p >= 0.5 for p in row["itm"]]
        assert all(0.0 <= p <= 1.0 for p in row["itm"])

"""BLIP's decoding rules, as its pinned transformers 4.15 ``generate`` applies them.

Each rule is pinned on a case whose answer is worked out by hand or by a plain re-implementation
of transformers 4.15's loop (no cache, one image at a time): lengths that count the prompt, beam
scores normalised by prompt + tokens before [SEP], and top-k before top-p.
"""

from __future__ import annotations

import pytest
import torch

from blip_core.config import DECODING, SEP_TOKEN_ID, model_preset
from blip_core.generate import generate_token_ids, inference, prompt_token_ids, sample_top_p
from blip_core.model import BlipModel


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    from blip_core.tokenizer import load_tokenizer

    return prompt_token_ids(load_tokenizer(), "a picture of ")  # [DEC] a picture of: 4 tokens


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _tiny(sep_bias: float | None = None, peaked: bool = False) -> BlipModel:
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny")).eval()
    with torch.no_grad():
        if peaked:  # sharp next-token distributions, images that matter, [SEP] likely
            model.lm_head.norm.weight.fill_(12.0)
            for layer in model.text_encoder.layers:
                layer.cross_attn.value.weight.mul_(20.0)
            model.lm_head.bias[SEP_TOKEN_ID] = 9.0
        if sep_bias is not None:
            model.lm_head.bias[SEP_TOKEN_ID] = sep_bias
    return model


def _generate(model, images, prompt, **kw) -> list[list[list[int]]]:
    with inference(model):
        return generate_token_ids(model, model.encode_image(images), prompt, **kw).tokens


def test_the_defaults_are_blips():
    assert (DECODING.max_length, DECODING.min_length, DECODING.top_k, DECODING.top_p) == (20, 5, 50, 0.9)
    assert (DECODING.lengths, DECODING.beam_norm) == ("blip", "blip")


@pytest.mark.parametrize("method", ["greedy", "nucleus", "beam"])
def test_blip_lengths_count_the_prompt(method, images, prompt):
    """max_length=20, min_length=5 with the 4-token prompt: at most 16 tokens generated, [SEP]
    allowed from the second one on (transformers 4.15 bans [SEP] while prompt + tokens < 5)."""
    g = torch.Generator().manual_seed(0)
    eager = _generate(_tiny(sep_bias=100.0), images[:2], prompt, method=method, generator=g)
    assert all(ids[1:] == [SEP_TOKEN_ID] and ids[0] != SEP_TOKEN_ID for caps in eager for ids in caps)
    endless = _generate(_tiny(sep_bias=-100.0), images[:2], prompt, method=method, generator=g)
    assert all(len(ids) == 16 and SEP_TOKEN_ID not in ids for caps in endless for ids in caps)
    new = _generate(_tiny(sep_bias=-100.0), images[:2], prompt, method=method, generator=g,
                    lengths="new_tokens")
    assert all(len(ids) == 20 for caps in new for ids in caps)  # transformers 5's max_new_tokens
    with pytest.raises(ValueError, match="counts the prompt"):
        _generate(_tiny(), images[:1], prompt, method=method, max_length=4)


def _beam_search_415(model: BlipModel, image: torch.Tensor, prompt: torch.Tensor, num_beams: int,
                     max_length: int, min_length: int) -> list[int]:
    """transformers 4.15's ``beam_search`` + ``BeamSearchScorer`` for one image, written plainly:
    lengths count the prompt; a hypothesis ending in [SEP] is scored over its tokens before
    [SEP]; an image is done when its best candidate over the current length cannot beat the
    worst of ``num_beams`` finished ones; at ``max_length`` the running beams finish."""
    embeds = model.encode_image(image[None])
    beams = [(prompt.tolist(), 0.0)] + [(prompt.tolist(), -1e9)] * (num_beams - 1)
    hyps: list[tuple[float, list[int]]] = []
    worst = 1e9

    def add(tokens: list[int], score: float) -> None:
        nonlocal worst
        normalised = score / len(tokens)
        if len(hyps) < num_beams or normalised > worst:
            hyps.append((normalised, tokens))
            if len(hyps) > num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hyps))
                del hyps[ranked[0][1]]
                worst = ranked[1][0]
            else:
                worst = min(normalised, worst)

    cur_len = len(prompt)
    with torch.no_grad():
        while True:
            scores = []
            for seq, beam_score in beams:
                ids = torch.tensor([seq])
                logp = model.lm_logits(embeds, ids, torch.ones_like(ids))[0, -1].float().log_softmax(-1)
                if cur_len < min_length:
                    logp[SEP_TOKEN_ID] = float("-inf")
                scores.append(logp + beam_score)
            flat = torch.stack(scores).view(-1)
            top, idx = flat.topk(2 * num_beams)
            vocab = scores[0].shape[0]
            next_beams = []
            for rank, (score, i) in enumerate(zip(top.tolist(), idx.tolist(), strict=True)):
                beam, token = divmod(i, vocab)
                if token == SEP_TOKEN_ID:
                    if rank < num_beams:
                        add(beams[beam][0], score)
                else:
                    next_beams.append((beams[beam][0] + [token], score))
                if len(next_beams) == num_beams:
                    break
            done = len(hyps) >= num_beams and worst >= top.max().item() / cur_len
            beams, cur_len = next_beams, cur_len + 1
            if done or cur_len >= max_length:
                break
    if not done:
        for seq, score in beams:
            add(seq, score)
    best = max(hyps, key=lambda h: h[0])[1]
    generated = best[len(prompt):]
    return generated + [SEP_TOKEN_ID] if len(best) < max_length else generated


def test_beam_search_is_transformers_4_15s(images, prompt):
    model = _tiny(peaked=True)
    ours = _generate(model, images, prompt, method="beam", num_beams=3)
    reference = [_beam_search_415(model, images[i], prompt, 3, 20, 5) for i in range(len(images))]
    assert [caps[0] for caps in ours] == reference
    assert len({len(r) for r in reference}) > 1  # captions of several lengths: normalisation matters


def test_beam_scores_are_normalised_by_prompt_and_tokens_before_sep(images, prompt):
    model = _tiny(peaked=True)
    with inference(model):
        embeds = model.encode_image(images)
        blip = generate_token_ids(model, embeds, prompt, method="beam", num_beams=3, num_captions=3)
        hf5 = generate_token_ids(model, embeds, prompt, method="beam", num_beams=3, num_captions=3,
                                 beam_norm="transformers")
    for b in range(len(images)):
        for ids, score in zip(blip.tokens[b], blip.scores[b], strict=True):
            seq = torch.cat([prompt, torch.tensor(ids[:-1], dtype=torch.long)])[None]
            with torch.no_grad():
                logp = model.lm_logits(embeds[b : b + 1], seq, torch.ones_like(seq))[0, len(prompt) - 1:]
            total = float(logp.float().log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum())
            ended = ids[-1] == SEP_TOKEN_ID
            assert score == pytest.approx(total / (len(prompt) + len(ids) - ended), abs=1e-4)
    assert blip.tokens != hf5.tokens or blip.scores != hf5.scores


def test_sampling_keeps_the_top_k_then_the_nucleus():
    """probs (0.7, 0.2, 0.06, 0.04), top_k=3, top_p=0.75: renormalised over three, 0.729 0.208
    0.063; the mass ranked ahead of the third (0.938) reaches 0.75, so it goes: tokens 0 and 1
    with 0.7 / 0.9 and 0.2 / 0.9. Without top-k the nucleus (0.7 ahead of token 1 < 0.75) keeps
    the same two; with top_k=1 only token 0; top-p alone at 0.95 keeps three."""
    logits = torch.tensor([0.7, 0.2, 0.06, 0.04]).log()[None].expand(40000, -1)

    def freq(**kw) -> list[float]:
        draws = sample_top_p(logits, generator=torch.Generator().manual_seed(0), **kw)
        return (torch.bincount(draws, minlength=4).float() / len(draws)).tolist()

    assert freq(top_p=0.75, top_k=3) == pytest.approx([0.7 / 0.9, 0.2 / 0.9, 0.0, 0.0], abs=0.01)
    assert freq(top_p=0.75, top_k=None) == pytest.approx([0.7 / 0.9, 0.2 / 0.9, 0.0, 0.0], abs=0.01)
    assert freq(top_p=0.9, top_k=1) == [1.0, 0.0, 0.0, 0.0]
    assert freq(top_p=0.95, top_k=3) == pytest.approx([0.7 / 0.96, 0.2 / 0.96, 0.06 / 0.96, 0.0], abs=0.01)
    assert freq(top_p=0.95, top_k=None) == pytest.approx([0.7 / 0.96, 0.2 / 0.96, 0.06 / 0.96, 0.0],
                                                        abs=0.01)
    assert freq(top_p=1.0, top_k=2) == pytest.approx([0.7 / 0.9, 0.2 / 0.9, 0.0, 0.0], abs=0.01)

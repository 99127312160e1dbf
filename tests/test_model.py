"""The model's maths on small hand-checked cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from blip_core.config import DEC_TOKEN_ID, ENC_TOKEN_ID, model_preset
from blip_core.losses import (
    IGNORE_INDEX,
    ItcLoss,
    LmLoss,
    SoftCrossEntropy,
    linear_cross_entropy,
    lm_labels,
    positive_mask,
    sample_hard_negatives,
    soft_targets,
)
from blip_core.model import BlipModel, TextBatch, count_parameters
from blip_core.train import Collator


@pytest.fixture(scope="module")
def tokenizer():
    from blip_core.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny() -> BlipModel:
    torch.manual_seed(0)
    return BlipModel(model_preset("tiny")).eval()


def _batch(tokenizer, captions, idx, image_size=64, seed=0) -> TextBatch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(captions), 3, image_size, image_size, generator=g)
    return Collator(tokenizer, 32, "a picture of ")(list(zip(images, captions, idx, strict=True)))


# --- ITC -----------------------------------------------------------------------------------


def test_soft_targets_mix_momentum_softmax_and_ground_truth():
    sim_m = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    pos = torch.tensor([[True, False], [False, True]])
    # row 0: 0.4 * [.5, .5] + 0.6 * [1, 0]; row 1: 0.4 * [.25, .75] + 0.6 * [0, 1]
    assert_close(soft_targets(sim_m, pos, 0.4), torch.tensor([[0.8, 0.2], [0.1, 0.9]]))
    # two positives in a row share the ground-truth mass
    two = soft_targets(torch.zeros(1, 3), torch.tensor([[True, True, False]]), 0.0)
    assert_close(two, torch.tensor([[0.5, 0.5, 0.0]]))


def test_soft_cross_entropy_by_hand_and_hard_case_equals_cross_entropy():
    loss = SoftCrossEntropy()(torch.zeros(1, 2), torch.tensor([[0.8, 0.2]]))
    assert_close(loss, torch.tensor(math.log(2.0)))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    onehot = F.one_hot(torch.tensor([0, 2]), 3).float()
    itc = ItcLoss()(logits, logits, onehot, onehot)
    assert_close(itc, F.cross_entropy(logits, torch.tensor([0, 2])))


def test_positive_mask_marks_captions_of_the_same_image():
    mask = positive_mask(torch.tensor([7, 7, 3]), torch.tensor([7, 3, 7, -100]))
    assert mask.tolist() == [[True, False, True, False]] * 2 + [[False, True, False, False]]


def test_temperature_is_clamped_and_momentum_is_an_ema(tokenizer):
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny"))
    with torch.no_grad():
        model.temp.fill_(1.0)
        model.visual_encoder.cls_token.add_(1.0)  # online and momentum weights now differ
    online = model.visual_encoder.cls_token.detach().clone()
    before = model.visual_encoder_m.cls_token.detach().clone()
    model(_batch(tokenizer, ["a red circle", "a blue square"], [0, 1]), alpha=0.4,
          losses=("itc",))
    assert model.temp.item() == pytest.approx(0.5)
    assert_close(model.visual_encoder_m.cls_token, 0.995 * before + 0.005 * online)
    assert model.idx_queue[0, :2].tolist() == [0, 1] and int(model.queue_ptr) == 2


# --- ITM hard negatives --------------------------------------------------------------------


def test_hard_negatives_follow_softmax_and_never_pick_a_positive():
    sim = torch.tensor([[10.0, 0.0, math.log(3.0), 0.0]]).repeat(20000, 1)
    pos = torch.tensor([[True, False, False, False]]).repeat(20000, 1)
    drawn = sample_hard_negatives(sim, pos, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert freq[0] == 0  # the positive, despite the highest similarity
    assert_close(freq[1:], torch.tensor([0.2, 0.6, 0.2]), atol=0.015, rtol=0)


def test_a_row_without_negatives_gets_minus_one():
    pos = torch.tensor([[True, True], [False, True]])
    drawn = sample_hard_negatives(torch.zeros(2, 2), pos)
    assert drawn.tolist() == [-1, 0]


# --- LM ------------------------------------------------------------------------------------


def test_label_smoothing_by_hand():
    # logits [2, 0, 0, 0], target 0, eps 0.1: loss = 0.9 (log Z − 2) + 0.1 (log Z − 0.5)
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    z = math.log(math.exp(2) + 3)
    assert_close(LmLoss(0.1)(logits, labels), torch.tensor(z - 1.85))
    assert_close(LmLoss(0.0)(logits, labels), torch.tensor(z - 2.0))


def _projection_case(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 16, generator=g).requires_grad_()
    weight = (torch.randn(300, 16, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(300, generator=g) * 0.1).requires_grad_()
    return hidden, weight, bias, torch.randint(0, 300, (rows,), generator=g)


@pytest.mark.parametrize("rows", [1, 63, 64, 130])  # one chunk, chunk edges, a ragged last chunk
def test_fused_projection_loss_and_gradients_equal_the_unfused_ones(rows):
    hidden, weight, bias, targets = _projection_case(rows)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=0.1)
    ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight, bias))  # upstream grad 3
    fused = linear_cross_entropy(hidden, weight, bias, targets, 0.1)
    assert_close(fused, ref)
    for got, want in zip(torch.autograd.grad(fused * 3.0, (hidden, weight, bias)), ref_grads, strict=True):
        assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_projection_in_bf16_is_close_and_fp32_out():
    hidden, weight, bias, targets = _projection_case(100)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=0.1)
    ref_grad = torch.autograd.grad(ref, weight)[0]
    fused = linear_cross_entropy(hidden, weight, bias, targets, 0.1, matmul_dtype=torch.bfloat16)
    grad = torch.autograd.grad(fused, weight)[0]
    assert fused.dtype == grad.dtype == torch.float32
    assert_close(fused, ref, atol=2e-2, rtol=1e-2)
    assert_close(grad, ref_grad, atol=2e-2 * ref_grad.abs().max().item(), rtol=0.05)


def test_fused_projection_without_grad_and_without_rows():
    hidden, weight, bias, targets = _projection_case(10)
    with torch.no_grad():
        assert_close(linear_cross_entropy(hidden, weight, bias, targets),
                     F.cross_entropy(F.linear(hidden, weight, bias), targets))
    empty = linear_cross_entropy(hidden[:0], weight, bias, targets[:0], 0.1)
    assert empty.item() == 0.0
    empty.backward()  # a batch with nothing to score still trains the other terms
    assert weight.grad.abs().sum() == 0


def test_prompt_tokens_and_padding_are_not_scored(tokenizer):
    batch = _batch(tokenizer, ["red circle", "a big blue square on the left"], [0, 1])
    assert batch.prompt_length == 4  # [CLS] a picture of
    labels = lm_labels(batch.lm_ids, 0, batch.prompt_length)
    words = tokenizer.convert_ids_to_tokens(batch.lm_ids[0].tolist())
    assert words[:7] == ["[CLS]", "a", "picture", "of", "red", "circle", "[SEP]"]
    assert labels[0].tolist()[:7] == [IGNORE_INDEX] * 4 + batch.lm_ids[0, 4:7].tolist()
    assert (labels[0, 7:] == IGNORE_INDEX).all()  # padding
    assert (labels[1] != IGNORE_INDEX).sum() == len(tokenizer("a big blue square on the left")
                                                     .input_ids) - 1  # words + [SEP]


def test_decoder_is_causal_and_encoder_is_bidirectional(tiny, tokenizer):
    batch = _batch(tokenizer, ["a red circle above a blue square"] * 2, [0, 1])
    ids = batch.lm_ids.clone()
    ids[1, 6:] = tokenizer.convert_tokens_to_ids("green")  # change the tail of sample 1
    image_embeds = tiny.encode_image(batch.images[:1]).repeat(2, 1, 1)
    with torch.no_grad():
        dec = tiny.lm_logits(image_embeds, ids, batch.lm_mask)
        enc, _ = tiny.text_encoder(ids, batch.lm_mask, mode="text")
    assert_close(dec[0, :6], dec[1, :6])  # positions before the change do not see it
    assert not torch.allclose(dec[0, 6:], dec[1, 6:])
    assert not torch.allclose(enc[0, 0], enc[1, 0])  # bidirectional: [CLS] sees the tail


def test_kv_cache_decoding_matches_the_full_forward(tiny, tokenizer):
    batch = _batch(tokenizer, ["a red circle above a blue square"], [0])
    ids = batch.lm_ids.clone()
    ids[:, 0] = DEC_TOKEN_ID
    image_embeds = tiny.encode_image(batch.images)
    with torch.no_grad():
        full, _ = tiny.text_encoder(ids, None, image_embeds, mode="decoder")
        head, cache = tiny.text_encoder(ids[:, :3], None, image_embeds, mode="decoder",
                                        use_cache=True)
        steps = [head]
        for t in range(3, ids.shape[1]):
            out, cache = tiny.text_encoder(ids[:, t : t + 1], None, None, mode="decoder",
                                           past_key_values=cache, use_cache=True)
            steps.append(out)
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_first_token_only_equals_the_full_forward_with_the_same_gradients(tokenizer, mode):
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny"))
    batch = _batch(tokenizer, ["a red circle", "a small blue square above a green triangle"], [0, 1])
    assert not batch.text_mask.all()  # padding in the keys
    image_embeds = model.encode_image(batch.images).detach() if mode == "multimodal" else None
    outputs, grads = [], []
    for first_only in (False, True):
        model.zero_grad()
        hidden, _ = model.text_encoder(batch.text_ids, batch.text_mask, image_embeds, mode=mode,
                                       first_only=first_only)
        assert hidden.shape[1] == (1 if first_only else batch.text_ids.shape[1])
        cls = hidden[:, 0]
        (cls * torch.linspace(-1, 1, cls.shape[-1])).sum().backward()
        outputs.append(cls.detach())
        grads.append({n: p.grad.clone() for n, p in model.text_encoder.named_parameters()
                      if p.grad is not None})
    assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-5)
    assert grads[1].keys() == grads[0].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="encoder modes"):
        model.text_encoder(batch.lm_ids, batch.lm_mask, image_embeds, mode="decoder", first_only=True)


def test_rows_that_share_cross_attention_keys_equal_rows_with_their_own_copy():
    torch.manual_seed(0)
    attn = model_preset("tiny").text
    layer = BlipModel(model_preset("tiny")).text_encoder.layers[0].cross_attn.eval()
    images, groups = torch.randn(3, 17, 128), 4  # 3 images, 4 beams each
    x = torch.randn(3 * groups, 2, attn.hidden_size)
    with torch.no_grad():
        _, (k, v) = layer(x[::groups], context=images)  # one row of keys/values per image
        shared, _ = layer(x, past=(k, v), static_past=True)
        copied, _ = layer(x, past=(k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)),
                          static_past=True)
        with pytest.raises(ValueError, match="do not match"):
            layer(x[:-1], past=(k, v), static_past=True)  # 11 rows cannot share 3
        with pytest.raises(ValueError, match="do not match"):
            layer(x, context=images)  # only cached keys/values are shared: 12 texts, 3 images
    assert_close(shared, copied, atol=1e-6, rtol=1e-5)


# --- sharing and size ----------------------------------------------------------------------


def _params_with_grad(model: BlipModel) -> set[int]:
    return {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_encoder_and_decoder_share_everything_but_self_attention(tokenizer):
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny")).train()
    batch = _batch(tokenizer, ["a red circle", "a blue square on the left"], [0, 1])
    image_embeds = model.encode_image(batch.images).detach()

    model.zero_grad()
    model.itm_logits(image_embeds, batch.text_ids, batch.text_mask).sum().backward()
    encoder = _params_with_grad(model)
    model.zero_grad()
    model.lm_logits(image_embeds, batch.lm_ids, batch.lm_mask).logsumexp(-1).sum().backward()
    decoder = _params_with_grad(model)

    text = dict(model.text_encoder.named_parameters())
    self_attn = {n for n in text if ".self_attn." in n}
    causal = {n for n in text if ".self_attn_causal." in n}
    shared = {id(p) for n, p in text.items() if n not in self_attn | causal}
    assert encoder & decoder == shared  # the same tensor objects, not equal copies
    assert encoder - decoder == {id(text[n]) for n in self_attn} | {id(model.itm_head.weight),
                                                                    id(model.itm_head.bias)}
    lm_head = {id(p) for p in model.lm_head.parameters()}
    assert decoder - encoder == {id(text[n]) for n in causal} | lm_head
    # the ids the model hard-codes are the tokenizer's, and BLIP's (BERT uncased's 30522 tokens + 2)
    ids = tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    assert ids == [DEC_TOKEN_ID, ENC_TOKEN_ID] == [30522, 30523]


def test_base_preset_has_the_papers_252m_parameters():
    with torch.device("meta"):
        model = BlipModel(model_preset("base"))
    n = count_parameters(model)
    assert abs(n - 252e6) / 252e6 < 0.02, n
    assert count_parameters(model, include_momentum=True) > 1.9 * n


def test_full_forward_backward_gives_all_three_losses(tokenizer):
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny")).train()
    captions = ["a red circle", "a red circle on the left", "a blue square", "a green triangle"]
    out = model(_batch(tokenizer, captions, [0, 0, 1, 2]), alpha=0.4)
    terms = out.terms()
    assert set(terms) == {"itc", "itm", "lm"}
    assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_lm)
    # ITM at init is ~ a coin flip; LM at init is ~ log(vocab) with smoothing
    assert terms["itm"] == pytest.approx(math.log(2), abs=0.15)
    assert terms["lm"] == pytest.approx(math.log(30524), abs=1.0)
    out.loss.backward()
    for name, param in (("vision_proj", model.vision_proj.weight), ("temp", model.temp),
                        ("itm_head", model.itm_head.weight), ("lm_head", model.lm_head.bias)):
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name  # each loss reaches the weights only it trains


def test_lm_loss_on_scored_positions_equals_the_full_logits_loss(tiny, tokenizer):
    batch = _batch(tokenizer, ["red circle", "a big blue square on the left"], [0, 1])
    image_embeds = tiny.encode_image(batch.images)
    with torch.no_grad():
        full = LmLoss(0.1)(tiny.lm_logits(image_embeds, batch.lm_ids, batch.lm_mask),
                           lm_labels(batch.lm_ids, 0, batch.prompt_length))
        fast = tiny._lm(batch, image_embeds)
    assert_close(fast, full)


def test_bf16_autocast_step_runs_and_keeps_fp32_state(tokenizer):
    torch.manual_seed(0)
    model = BlipModel(model_preset("tiny")).train()
    batch = _batch(tokenizer, ["a red circle", "a blue square", "a green star"], [0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, alpha=0.4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.image_queue.dtype == torch.float32
    assert model.idx_queue[0, :3].tolist() == [0, 1, 2]
    assert model.vision_proj.weight.grad.dtype == torch.float32

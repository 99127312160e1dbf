"""Captioning: greedy decoding, nucleus sampling and beam search with the MED decoder.

Each image is encoded once per batch. The prompt ("[DEC] a picture of") is fed once per image,
then one token per step through the key/value cache; the cross-attention keys and values of the
image tokens are computed in that first call and reused by every later step (the beams of an
image share one copy: their queries attend to it together). Rows that finish
(an image whose beams can no longer improve, a sample that produced [SEP]) are dropped from the
batch and from the cache, so the cost of a step follows the number of live sequences.

Lengths, as BLIP's (``lengths="blip"``, the default): ``max_length`` and ``min_length`` count
the prompt's tokens too, as transformers 4.15's ``generate`` does with BLIP's
``max_length=20, min_length=5``: with the 4-token prompt, at most 16 tokens are generated
([SEP] included) and [SEP] may come from the second one on. ``lengths="new_tokens"`` counts
the generated tokens only (transformers' ``max_new_tokens`` / ``min_new_tokens``).

Repetition penalty (HF's definition): for every token already in the sequence, prompt
included, a positive score is divided by the penalty and a negative one multiplied by it.
Sampling and greedy decoding apply it to the logits, beam search to the log-probabilities, as
HF does. Its default depends on the method as in BLIP: 1.1 for nucleus sampling, 1.0 for beam
search and greedy decoding.

Beam search (``num_beams``, ``length_penalty=1.0``, ``early_stopping=False``): only candidates
ranked within the top ``num_beams`` may finish; an image stops once it holds ``num_beams``
finished hypotheses and its best candidate, normalised, cannot beat the worst of them. A
finished hypothesis scores ``sum(log p) / n ** length_penalty``: with ``beam_norm="blip"``
(transformers 4.15, as BLIP) ``n`` counts the prompt and the tokens before [SEP], and the
``num_beams`` best running beams finish at ``max_length`` with their full length; with
``beam_norm="transformers"`` (transformers 5) ``n`` counts the generated tokens, [SEP] included.

Sampling keeps the ``top_k`` most likely tokens (transformers' default 50, which BLIP's
``generate`` applies), then the nucleus of mass ``top_p`` among them, renormalised each time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from blip_core.config import DEC_TOKEN_ID, DECODING, PAD_TOKEN_ID, SEP_TOKEN_ID
from blip_core.med import LayerCache
from blip_core.model import BlipModel

Method = Literal["greedy", "nucleus", "beam"]
METHODS: tuple[str, ...] = ("greedy", "nucleus", "beam")
# BLIP's repetition penalties: 1.1 hard-coded for sampling, 1.0 (its default) for beam search.
DEFAULT_REPETITION_PENALTY: dict[str, float] = {"greedy": 1.0, "nucleus": 1.1, "beam": 1.0}


@dataclass
class Generation:
    """Token ids generated for a batch of images (the prompt not included).

    ``tokens[b][j]`` is caption ``j`` of image ``b``: ids after the prompt, ending with [SEP]
    when the caption finished before ``max_length``. For beam search ``scores[b][j]`` is its
    length-normalised log-probability and captions are sorted best first; sampling leaves
    ``scores`` empty.
    """

    tokens: list[list[list[int]]]
    scores: list[list[float]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Generated tokens in total ([SEP] included)."""
        return sum(len(t) for caps in self.tokens for t in caps)


@dataclass
class CaptionStats:
    """Running totals of a captioning job (filled by :func:`caption_dataset`)."""

    images: int = 0
    captions: int = 0
    tokens: int = 0  # generated tokens, [SEP] included
    seconds: float = 0.0  # time spent generating (data loading excluded)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def inference(model: torch.nn.Module, bf16: bool = False) -> Iterator[None]:
    """``model.eval()`` + ``torch.inference_mode()`` (+ bf16 autocast); restores the mode after."""
    was_training = model.training
    device = next(model.parameters()).device
    if was_training:  # walking every module (momentum copies too) costs ~10 ms a call on a GPU
        model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            yield
    finally:
        if was_training:
            model.train()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters."""
    return next(model.parameters()).device


def prompt_token_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """(P,) ids of ``[DEC] prompt``: the tokenised prompt with [DEC] for [CLS] and no [SEP]."""
    ids = tokenizer(prompt).input_ids[:-1]  # [CLS] words ([SEP] dropped)
    ids[0] = DEC_TOKEN_ID
    return torch.tensor(ids, dtype=torch.long)


# --- decoding steps ------------------------------------------------------------------------


def _decode_step(
    model: BlipModel,
    ids: torch.Tensor,
    cache: list[LayerCache] | None,
    image_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[LayerCache]]:
    """Feed (R, L) ids; return (R, V) float logits of the next token and the grown cache."""
    hidden, cache = model.text_encoder(
        ids, None, image_embeds, mode="decoder", past_key_values=cache, use_cache=True
    )
    logits = model.lm_head(hidden[:, -1:], model.text_encoder.embeddings.word_embeddings.weight)
    assert cache is not None
    return logits[:, 0].float(), cache


def _select_rows(
    cache: list[LayerCache], rows: torch.Tensor, cross_rows: torch.Tensor | None
) -> list[LayerCache]:
    """Keep (and reorder / repeat) the self-attention cache rows ``rows`` (R',) of every layer,
    and the cross-attention rows ``cross_rows`` (None: left as they are)."""
    out: list[LayerCache] = []
    for (k, v), cross in cache:
        if cross is not None and cross_rows is not None:
            cross = (cross[0][cross_rows], cross[1][cross_rows])
        out.append(((k[rows], v[rows]), cross))
    return out


def apply_repetition_penalty(
    scores: torch.Tensor, sequences: torch.Tensor, penalty: float
) -> torch.Tensor:
    """HF's repetition penalty on (R, V) scores for the tokens of (R, T) ``sequences``.

    Scores of tokens already present are divided by ``penalty`` when positive and multiplied by
    it when negative (so a penalty > 1 always makes them less likely).
    """
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def sample_top_p(
    logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """Nucleus sampling (temperature 1): one token per row of (R, V) logits, returned as (R,).

    With ``top_k``, each row keeps its ``top_k`` most likely tokens first, renormalised, and
    samples from the nucleus of those (transformers' top-k then top-p).

    Each row samples from the smallest set of most likely tokens whose probability reaches
    ``top_p`` (at least the most likely token), renormalised. Each row's set is looked for among
    its top 64 tokens first, then the top 1024, and in the whole vocabulary only when that row
    needs more, so that peaked rows cost a small ``topk`` whatever the flat rows beside them need.
    A row whose most likely token alone reaches ``top_p`` takes it without a draw.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        top_logits, top_ids = logits.topk(top_k, dim=-1)  # (R, k), most likely first
        probs = top_logits.softmax(-1)
        if top_p < 1.0:
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass ranked ahead
        return top_ids.gather(1, torch.multinomial(probs, 1, generator=generator))[:, 0]
    probs = logits.softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    vocab = probs.shape[-1]
    best, out = probs.max(-1)  # a set of one token: no topk, no draw
    todo = (best < top_p).nonzero()[:, 0]  # rows whose set is not found yet
    for k in (min(64, vocab), min(1024, vocab), vocab):
        if todo.numel() == 0:
            break
        top, ids = probs[todo].topk(k, dim=-1)  # (r, k), most likely first
        done = top.sum(-1) >= top_p if k < vocab else torch.ones_like(todo, dtype=torch.bool)
        if bool(done.any()):
            top, ids = top[done], ids[done]
            top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)  # mass ranked ahead >= top_p
            out[todo[done]] = ids.gather(1, torch.multinomial(top, 1, generator=generator))[:, 0]
            todo = todo[~done]
    return out


def _sample(
    model: BlipModel,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    num_captions: int,
    do_sample: bool,
    top_p: float,
    top_k: int | None,
    max_length: int,
    min_length: int,
    penalty: float,
    generator: torch.Generator | None,
) -> list[list[list[int]]]:
    """Greedy decoding or nucleus sampling of ``num_captions`` captions per image."""
    b, device = image_embeds.shape[0], image_embeds.device
    prompt = prompt_ids.to(device)
    logits, cache = _decode_step(model, prompt.expand(b, -1), None, image_embeds)
    rows = b * num_captions
    if num_captions > 1:  # each image's prompt state, copied for each of its captions
        owner = torch.arange(b, device=device).repeat_interleave(num_captions)
        cache, logits = _select_rows(cache, owner, owner), logits[owner]
    sequences = prompt.expand(rows, -1)  # (R, P + t): for the repetition penalty
    alive = torch.arange(rows, device=device)  # original row of each live row
    out: list[list[int]] = [[] for _ in range(rows)]
    for t in range(max_length):
        logits = apply_repetition_penalty(logits, sequences, penalty)
        if t < min_length:
            logits[:, SEP_TOKEN_ID] = float("-inf")
        if do_sample:
            next_ids = sample_top_p(logits, top_p, generator, top_k)
        else:
            next_ids = logits.argmax(-1)
        for row, token in zip(alive.tolist(), next_ids.tolist(), strict=True):
            out[row].append(token)
        if t + 1 == max_length:
            break
        sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
        running = next_ids != SEP_TOKEN_ID
        if not bool(running.all()):
            if not bool(running.any()):
                break
            keep = running.nonzero()[:, 0]
            alive, sequences, next_ids = alive[keep], sequences[keep], next_ids[keep]
            cache = _select_rows(cache, keep, keep)
        logits, cache = _decode_step(model, next_ids[:, None], cache)
    return [out[i * num_captions : (i + 1) * num_captions] for i in range(b)]


def _beam_search(
    model: BlipModel,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    num_beams: int,
    num_return: int,
    max_length: int,
    min_length: int,
    penalty: float,
    length_penalty: float,
    blip_norm: bool,
) -> tuple[list[list[list[int]]], list[list[float]]]:
    """Batched beam search (see the module docstring for both normalisations)."""
    b, device = image_embeds.shape[0], image_embeds.device
    n_prompt = prompt_ids.numel()
    k, neg_inf = num_beams, float("-inf")
    prompt = prompt_ids.to(device)
    logits, cache = _decode_step(model, prompt.expand(b, -1), None, image_embeds)
    owner = torch.arange(b, device=device).repeat_interleave(k)
    # Self-attention rows per beam (A*K), cross-attention rows per live image (A): the K beams
    # of an image share its image keys/values (no K copies, no gather per step).
    cache, logits = _select_rows(cache, owner, None), logits[owner]

    active = torch.arange(b, device=device)  # image of each live group of K beams
    run_scores = torch.full((b, k), neg_inf, device=device)
    run_scores[:, 0] = 0.0  # all beams start equal: expand only the first one at step 0
    run_tokens = torch.empty(b, k, 0, dtype=torch.long, device=device)  # generated so far
    # Finished hypotheses of every image: K best, padded with PAD, normalised scores.
    fin_tokens = torch.full((b, k, max_length), PAD_TOKEN_ID, dtype=torch.long, device=device)
    fin_scores = torch.full((b, k), neg_inf, device=device)
    fin_lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    rank_ok = torch.arange(2 * k, device=device) < k  # only the top K candidates may finish

    for t in range(max_length):
        a = active.shape[0]
        flat_prefix = torch.cat([prompt.expand(a * k, -1), run_tokens.reshape(a * k, t)], dim=1)
        logp = apply_repetition_penalty(logits.log_softmax(-1), flat_prefix, penalty)
        if t < min_length:
            logp[:, SEP_TOKEN_ID] = neg_inf
        vocab = logp.shape[-1]
        total = (logp.view(a, k, vocab) + run_scores[:, :, None]).view(a, k * vocab)
        cand_scores, cand_idx = total.topk(2 * k, dim=-1)  # (A, 2K), best first
        beam, token = cand_idx // vocab, cand_idx % vocab
        cand_tokens = torch.cat(
            [run_tokens.gather(1, beam[:, :, None].expand(-1, -1, t)), token[:, :, None]], dim=2
        )  # (A, 2K, t + 1)
        last = t + 1 == max_length
        is_sep = token == SEP_TOKEN_ID
        hits = is_sep | last

        # Finished candidates compete with the image's finished pool for its K places.
        if blip_norm:  # [SEP] ends a hypothesis of P + t tokens; at max_length the K best running
            # beams (the first K candidates without [SEP]) finish with all P + t + 1 of theirs
            running_rank = (~is_sep).cumsum(dim=1) - 1
            finishing = (is_sep & rank_ok[None]) | (~is_sep & (running_rank < k) & last)
            length = torch.where(is_sep, n_prompt + t, n_prompt + t + 1).float()
        else:
            finishing, length = hits & rank_ok[None], torch.full_like(cand_scores, t + 1.0)
        norm = torch.where(finishing, cand_scores / length ** length_penalty, neg_inf)
        padded = F.pad(cand_tokens, (0, max_length - t - 1), value=PAD_TOKEN_ID)
        pool_scores = torch.cat([fin_scores[active], norm], dim=1)  # (A, 3K)
        pool_tokens = torch.cat([fin_tokens[active], padded], dim=1)
        pool_lengths = torch.cat(
            [fin_lengths[active], torch.full_like(token, t + 1)], dim=1
        )
        best_scores, best = pool_scores.topk(k, dim=-1)
        fin_scores[active] = best_scores
        fin_tokens[active] = pool_tokens.gather(1, best[:, :, None].expand(-1, -1, max_length))
        fin_lengths[active] = pool_lengths.gather(1, best)
        if last:
            break

        # The K best unfinished candidates carry on.
        run_scores, pick = torch.where(hits, neg_inf, cand_scores).topk(k, dim=-1)
        run_tokens = cand_tokens.gather(1, pick[:, :, None].expand(-1, -1, t + 1))
        source = beam.gather(1, pick)  # (A, K) beam each continues
        rows = (torch.arange(a, device=device)[:, None] * k + source).view(-1)

        # Can the best beam still beat the worst finished hypothesis? (transformers 4.15 asks it of
        # the best candidate over the length so far, transformers 5 of the best running beam)
        worst_finished = fin_scores[active].min(dim=1).values  # -inf while places are free
        best = cand_scores[:, 0] / (n_prompt + t) ** length_penalty if blip_norm else \
            run_scores[:, 0] / (t + 1) ** length_penalty
        still_open = best > worst_finished
        images = None  # cross-attention rows, one per live image: unchanged unless one stops
        if not bool(still_open.all()):
            if not bool(still_open.any()):
                break
            images = still_open.nonzero()[:, 0]
            active, run_scores, run_tokens = active[images], run_scores[images], run_tokens[images]
            rows = rows.view(a, k)[images].view(-1)
        cache = _select_rows(cache, rows, images)
        logits, cache = _decode_step(model, run_tokens[:, :, -1].reshape(-1, 1), cache)

    tokens = [
        [fin_tokens[i, j, : fin_lengths[i, j]].tolist() for j in range(num_return)]
        for i in range(b)
    ]
    scores = fin_scores[:, :num_return].tolist()
    return tokens, scores


# --- public API ----------------------------------------------------------------------------


def generate_token_ids(
    model: BlipModel,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    *,
    method: Method = DECODING.method,
    num_captions: int = 1,
    top_p: float = DECODING.top_p,
    top_k: int | None = DECODING.top_k,
    num_beams: int = DECODING.num_beams,
    max_length: int = DECODING.max_length,
    min_length: int = DECODING.min_length,
    lengths: str = DECODING.lengths,
    beam_norm: str = DECODING.beam_norm,
    repetition_penalty: float | None = DECODING.repetition_penalty,
    length_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode captions from already encoded images (call under :func:`inference`).

    Args:
        image_embeds: (B, 1 + N, Dv) image tokens from ``model.encode_image``.
        prompt_ids: (P,) ids from :func:`prompt_token_ids`.
        method: "greedy" (argmax), "nucleus" (top-p sampling, temperature 1) or "beam".
        num_captions: captions per image; for beam search the best ``num_captions`` of the
            final ``num_beams`` hypotheses (so at most ``num_beams``).
        top_p: nucleus mass.
        top_k: sampling keeps the ``top_k`` most likely tokens before the nucleus (None: all).
        num_beams: beams per image.
        max_length: most tokens, [SEP] included (the prompt's count too with ``lengths="blip"``).
        min_length: fewest tokens before [SEP] may be chosen (likewise).
        lengths: "blip" (the prompt counts, as BLIP) or "new_tokens" (generated tokens only).
        beam_norm: "blip" (transformers 4.15) or "transformers" (transformers 5), see the module
            docstring.
        repetition_penalty: HF's penalty; None: 1.1 for nucleus, 1.0 otherwise (as BLIP).
        length_penalty: exponent of the length normalisation of beam scores.
        generator: random generator for sampling (on the model's device).

    Returns:
        The ids generated after the prompt, per image and caption.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if lengths not in ("blip", "new_tokens") or beam_norm not in ("blip", "transformers"):
        raise ValueError(f"lengths is blip or new_tokens ({lengths!r}), beam_norm blip or transformers "
                         f"({beam_norm!r})")
    if lengths == "blip":
        if max_length <= prompt_ids.numel():
            raise ValueError(f"max_length={max_length} counts the prompt's {prompt_ids.numel()} tokens "
                             "(lengths='blip'): nothing would be generated")
        max_length, min_length = max_length - prompt_ids.numel(), max(0, min_length - prompt_ids.numel())
    if num_captions < 1 or max_length < 1 or min_length < 0:
        raise ValueError("num_captions >= 1, max_length >= 1 and min_length >= 0 are required")
    if method == "beam" and not 1 <= num_captions <= num_beams:
        raise ValueError(f"beam search returns at most num_beams={num_beams} captions per image")
    positions = model.text_encoder.embeddings.position_embeddings.num_embeddings
    if prompt_ids.numel() + max_length > positions:
        raise ValueError(f"prompt ({prompt_ids.numel()}) + max_length ({max_length}) tokens exceed "
                         f"the decoder's {positions} positions")
    penalty = DEFAULT_REPETITION_PENALTY[method] if repetition_penalty is None else repetition_penalty
    if method == "beam":
        tokens, scores = _beam_search(model, image_embeds, prompt_ids, num_beams, num_captions,
                                      max_length, min_length, penalty, length_penalty,
                                      beam_norm == "blip")
        return Generation(tokens, scores)
    tokens = _sample(model, image_embeds, prompt_ids, num_captions, method == "nucleus", top_p, top_k,
                     max_length, min_length, penalty, generator)
    return Generation(tokens)


def decode_captions(tokenizer: Any, generation: Generation) -> list[list[str]]:
    """Generated ids to lower-case strings ([SEP] and other special tokens dropped)."""
    flat = [ids for caps in generation.tokens for ids in caps]
    texts = [t.strip() for t in tokenizer.batch_decode(flat, skip_special_tokens=True)]
    out, i = [], 0
    for caps in generation.tokens:
        out.append([texts[i + j].lower() for j in range(len(caps))])
        i += len(caps)
    return out


def generate_captions(
    model: BlipModel,
    tokenizer: Any,
    images: torch.Tensor,
    *,
    prompt: str | None = None,
    bf16: bool = False,
    **gen_kwargs: Any,
) -> list[list[str]]:
    """Caption a batch of images; each image is encoded once.

    Args:
        images: (B, 3, H, W) normalised images.
        prompt: text after [DEC] that every caption continues; default ``model.cfg.prompt``.
            It is not part of the returned captions.
        bf16: run under bf16 autocast.
        gen_kwargs: passed to :func:`generate_token_ids` (method, num_captions, top_p, ...).

    Returns:
        B lists of ``num_captions`` lower-case captions.
    """
    prompt_ids = prompt_token_ids(tokenizer, model.cfg.prompt if prompt is None else prompt)
    with inference(model, bf16):
        image_embeds = model.encode_image(images.to(model_device(model)))
        generation = generate_token_ids(model, image_embeds, prompt_ids, **gen_kwargs)
    return decode_captions(tokenizer, generation)


def caption_dataset(
    model: BlipModel,
    tokenizer: Any,
    dataset: Iterable[tuple[torch.Tensor, str]],
    batch_size: int,
    *,
    num_workers: int = 0,
    progress: bool = True,
    stats: CaptionStats | None = None,
    bf16: bool = False,
    prompt: str | None = None,
    desc: str = "caption",
    **gen_kwargs: Any,
) -> Iterator[tuple[str, list[str]]]:
    """Caption every image of a dataset of ``(image (3, H, W), key)`` items, in order.

    Args:
        dataset: e.g. ``blip_core.data.dataset.ImageOnlyDataset``.
        stats: updated with counts and generation time as batches complete.
        desc: the progress bar's label.
        gen_kwargs: passed to :func:`generate_token_ids` (method, num_captions, ...).

    Yields:
        (key, captions) per image.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)  # type: ignore[arg-type]
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    prompt_ids = prompt_token_ids(tokenizer, model.cfg.prompt if prompt is None else prompt)
    device = model_device(model)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images, keys in loader:
            start = time.perf_counter()
            with inference(model, bf16):
                image_embeds = model.encode_image(images.to(device))
                generation = generate_token_ids(model, image_embeds, prompt_ids, **gen_kwargs)
            captions = decode_captions(tokenizer, generation)
            if stats is not None:
                stats.seconds += time.perf_counter() - start
                stats.images += len(keys)
                stats.captions += sum(len(c) for c in captions)
                stats.tokens += generation.num_tokens
            bar.update(len(keys))
            yield from zip(keys, captions, strict=True)


# --- command line --------------------------------------------------------------------------


def read_captions_jsonl(path: str | Path) -> dict[str, list[str]]:
    """``{"key", "captions"}`` lines (as ``blip-core caption`` writes them) to key -> captions."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("key"), str) or not isinstance(record.get("captions"), list):
                raise ValueError(f"{path}:{n}: expected {{'key': str, 'captions': [str, ...]}}")
            out.setdefault(record["key"], []).extend(str(c) for c in record["captions"])
    return out


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``blip-core caption``."""
    p = argparse.ArgumentParser(
        prog="blip-core caption",
        description="Caption the images of web shards or of a Karpathy split with a captioner "
                    "checkpoint; writes one JSON line per image: {\"key\", \"captions\"}.",
    )
    p.add_argument("--checkpoint", required=True, help="captioner checkpoint folder")
    p.add_argument("--data", required=True, help="shard folder / .tar, or ANNOTATIONS.json:SPLIT")
    p.add_argument("--out", type=Path, required=True, help="captions .jsonl to write (atomically)")
    from blip_core.recipe import Recipe

    d, recipe = DECODING, Recipe()
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help=f"nucleus sampling (as CapFilt), beam search or greedy (default {d.method})")
    p.add_argument("--num-captions", type=int, default=1, help="captions per image (default 1)")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus mass (default {d.top_p})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"sampling keeps the k most likely tokens first (default {d.top_k}; 0: all)")
    p.add_argument("--num-beams", type=int, default=d.num_beams, help=f"beams (default {d.num_beams})")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"most tokens, [SEP] and (--lengths blip) the prompt included "
                        f"(default {d.max_length})")
    p.add_argument("--min-length", type=int, default=d.min_length,
                   help=f"fewest tokens before [SEP], the prompt included likewise (default {d.min_length})")
    p.add_argument("--lengths", choices=["blip", "new_tokens"], default=d.lengths,
                   help="blip (default): the lengths count the prompt, as BLIP; new_tokens: generated only")
    p.add_argument("--beam-norm", choices=["blip", "transformers"], default=d.beam_norm,
                   help="beam score normalisation: blip (default, transformers 4.15) or transformers (5)")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="default: 1.1 for nucleus, 1.0 for beam / greedy (as BLIP)")
    p.add_argument("--seed", type=int, default=recipe.seed, help="sampling seed (default %(default)s)")
    add_model_run_args(p, batch_size=recipe.capfilt.batch_size)
    return p


def add_model_run_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The options of a command that runs a checkpoint over the images of a dataset."""
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="images per batch (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model_and_images(args: argparse.Namespace) -> tuple[BlipModel, Any, Any, torch.device]:
    """``args.checkpoint`` on ``args.device`` and the images of ``args.data`` at its resolution."""
    from blip_core.checkpoint import load_for_inference
    from blip_core.data.dataset import ImageOnlyDataset
    from blip_core.device import resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_for_inference(args.checkpoint, device)
    return model, tokenizer, ImageOnlyDataset(args.data, image_size=model.cfg.vision.image_size), device


def main(argv: Sequence[str] | None = None) -> int:
    """``blip-core caption``: caption a dataset and write ``--out`` atomically."""
    from blip_core.io import atomic_write_text

    args = build_parser().parse_args(argv)
    model, tokenizer, dataset, device = load_model_and_images(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stats = CaptionStats()
    lines = [
        json.dumps({"key": key, "captions": captions}, ensure_ascii=False)
        for key, captions in caption_dataset(
            model, tokenizer, dataset, args.batch_size, num_workers=args.num_workers,
            progress=not args.no_progress, stats=stats, bf16=args.bf16, method=args.method,
            num_captions=args.num_captions, top_p=args.top_p, top_k=args.top_k or None,
            num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
            lengths=args.lengths, beam_norm=args.beam_norm,
            repetition_penalty=args.repetition_penalty, generator=generator,
        )
    ]
    atomic_write_text(args.out, "".join(line + "\n" for line in lines))
    print(f"{stats.captions} captions of {stats.images} images ({args.method}): "
          f"{stats.tokens} tokens in {stats.seconds:.1f}s = {stats.tokens_per_second:.0f} tokens/s")
    print(f"written to {args.out.resolve()}")
    return 0

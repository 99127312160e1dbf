"""BLIP's three pre-training losses, each with logits, targets and reduction kept apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


@dataclass
class BlipOutput:
    """Every loss term of one forward pass (absent terms are None)."""

    loss: torch.Tensor  # sum of the terms that were computed
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None

    def terms(self) -> dict[str, float]:
        """The computed terms as floats, for logging."""
        return {
            name: float(value.detach())
            for name, value in (("itc", self.loss_itc), ("itm", self.loss_itm), ("lm", self.loss_lm))
            if value is not None
        }


def positive_mask(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """(B, N) boolean: True where the sample and the candidate show the same image."""
    return idx[:, None] == idx_all[None, :]


def soft_targets(
    sim_m: torch.Tensor, positives: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ITC targets: ``alpha`` · softmax(momentum similarity) + (1 − alpha) · ground truth.

    Args:
        sim_m: (B, N) similarities of the momentum encoders, already divided by the temperature.
        positives: (B, N) boolean positive mask; each row's ground truth spreads uniformly on it.
    """
    hard = positives.float()
    hard = hard / hard.sum(dim=1, keepdim=True).clamp(min=1.0)
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * hard


class SoftCrossEntropy(nn.Module):
    """Cross-entropy against a distribution: −Σ targets · log_softmax(logits), row mean."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits of −inf (masked candidates) must have a zero target; they contribute nothing."""
        logp = F.log_softmax(logits, dim=1).masked_fill(targets == 0, 0.0)  # avoids 0 · −inf
        return -(logp * targets).sum(dim=1).mean()


class ItcLoss(nn.Module):
    """Image–text contrastive loss, symmetric over both directions, with soft targets."""

    def __init__(self) -> None:
        super().__init__()
        self.ce = SoftCrossEntropy()

    def forward(
        self,
        sim_i2t: torch.Tensor,
        sim_t2i: torch.Tensor,
        targets_i2t: torch.Tensor,
        targets_t2i: torch.Tensor,
    ) -> torch.Tensor:
        """All (B, N): similarities / temperature against the candidates, and their targets."""
        return (self.ce(sim_i2t, targets_i2t) + self.ce(sim_t2i, targets_t2i)) / 2


def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, one candidate index drawn in proportion to softmax(sim), positives excluded.

    Args:
        sim: (B, N) similarities (already divided by the temperature).
        positives: (B, N) boolean; these candidates are never drawn.

    Returns:
        (B,) indices; −1 for a row that has no negative candidate at all.
    """
    weights = F.softmax(sim.float(), dim=1).masked_fill(positives, 0.0)
    # A row whose negatives all underflowed to 0 still gets a uniform draw over its negatives.
    weights = weights + (~positives).float() * 1e-12
    has_negative = (~positives).any(dim=1)
    weights[~has_negative] = 1.0  # placeholder, overwritten below
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(has_negative, drawn, torch.full_like(drawn, -1))


class ItmLoss(nn.Module):
    """Image–text matching: binary cross-entropy (2-way softmax) on the [ENC] head's logits."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (M, 2), labels (M,) with 1 = matched pair."""
        return F.cross_entropy(logits, labels)


class LmLoss(nn.Module):
    """Autoregressive cross-entropy with label smoothing; targets equal to −100 are not scored."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, L, V) predict labels (B, L) shifted by one: token t scores label t + 1."""
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(L−1), V)
        return self.scored(shifted, labels[:, 1:].reshape(-1))

    def scored(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Already aligned logits (T, V) and targets (T,); −100 targets are not scored."""
        return F.cross_entropy(
            logits.float(), targets, ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def projected(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  targets: torch.Tensor, matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`scored` of ``F.linear(hidden, weight, bias)``, fused (:func:`linear_cross_entropy`)."""
        return linear_cross_entropy(hidden, weight, bias, targets, self.label_smoothing,
                                    matmul_dtype=matmul_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and input gradients of :func:`linear_cross_entropy`, both computed in ``forward``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                targets: torch.Tensor, label_smoothing: float, dtype: torch.dtype,
                chunk_size: int) -> torch.Tensor:
        loss, grads = _linear_ce(hidden, weight, bias, targets, label_smoothing, dtype, chunk_size,
                                 with_grads=True)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable  # the gradients come out of forward: no graph for a second derivative
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, grad_bias * grad, None, None, None, None


def _linear_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               targets: torch.Tensor, eps: float, dtype: torch.dtype, chunk_size: int,
               with_grads: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    n, vocab = hidden.shape[0], weight.shape[0]
    h, w, b = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_logits = torch.empty(n, vocab, dtype=dtype, device=hidden.device) if with_grads else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # the matmul dtype is explicit here
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = torch.addmm(b, h[rows], w.t()).float()  # (c, V), fp32 from here on
            y = targets[rows]
            at_y, z_sum = logits.gather(1, y[:, None]).squeeze(1), logits.sum(1)
            z_max = logits.amax(1, keepdim=True)
            e = logits.sub_(z_max).exp_()  # in place: the exponentials serve loss and softmax
            e_sum = e.sum(1)
            lse = z_max.squeeze(1) + e_sum.log()
            # −[(1 − ε) log p_y + ε/V Σ_c log p_c] = lse − (1 − ε) z_y − ε/V Σ_c z_c
            total += (lse - (1.0 - eps) * at_y - eps / vocab * z_sum).sum()
            if grad_logits is not None:  # d loss / d z = softmax − (1 − ε) onehot − ε/V, / n
                grad = e.mul_((1.0 / (e_sum * n))[:, None]).sub_(eps / (vocab * n))
                grad.scatter_add_(1, y[:, None], grad.new_full((len(y), 1), -(1.0 - eps) / n))
                grad_bias += grad.sum(0)
                grad_logits[rows] = grad
        if grad_logits is None:
            return total / n, ()
        grad_hidden = (grad_logits @ w).to(hidden.dtype)
        grad_weight = (grad_logits.t() @ h).to(weight.dtype)
    return total / n, (grad_hidden, grad_weight, grad_bias.to(bias.dtype))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    *,
    matmul_dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=...)``, fused.

    The projection and the loss run chunk by chunk of rows: a chunk's fp32 logits stay in cache
    while its loss and the gradient of its logits are computed in place, and only that gradient
    is kept, (T, V) in ``matmul_dtype``, for the two gradient matmuls. ``torch.bfloat16``
    multiplies in bf16 as autocast would (bf16 inputs and outputs, fp32 accumulation inside the
    matmul; log-sum-exp and loss in fp32; gradients within ~1% of fp32): for 296 rows of the
    30,524-token vocabulary on 2 AVX512-BF16 cores, forward + backward take 26 ms, against 91 ms
    unfused in fp32 and 63 ms fused in fp32.

    Args:
        hidden: (T, D) inputs of the projection; every row is scored (gather them first).
        weight: (V, D) projection (BLIP ties it to the word embeddings); bias: (V,).
        targets: (T,) class indices in [0, V).
        chunk_size: rows per chunk; default 64 on CPUs (cache-sized), 4096 on GPUs.

    Returns:
        The mean loss over the T rows (0 for T = 0, still connected to the inputs).
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum() + bias.sum()) * 0.0
    chunk_size = chunk_size or (64 if hidden.device.type == "cpu" else 4096)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, label_smoothing,
                                         matmul_dtype, chunk_size)
    return _linear_ce(hidden, weight, bias, targets, label_smoothing, matmul_dtype, chunk_size,
                      with_grads=False)[0]


def lm_labels(input_ids: torch.Tensor, pad_token_id: int, prompt_length: int) -> torch.Tensor:
    """Decoder targets: the input ids with padding and the prompt's tokens set to −100.

    ``prompt_length`` counts the bos token, so the first scored label is the first caption word.
    """
    labels = input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels

"""BLIP's three pre-training losses, each with logits, targets and reduction kept apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


def lm_labels(input_ids: torch.Tensor, pad_token_id: int, prompt_length: int) -> torch.Tensor:
    """Decoder targets: the input ids with padding and the prompt's tokens set to −100.

    ``prompt_length`` counts the bos token, so the first scored label is the first caption word.
    """
    labels = input_ids.masked_fill(input_ids == pad_token_id, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels

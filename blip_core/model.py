"""The BLIP model: ViT + MED, ITC/ITM/LM heads, momentum encoders and feature queues.

Module names follow the official checkpoints (``visual_encoder``, ``text_encoder``,
``vision_proj``, ``text_proj``, ``itm_head``, ``*_m`` momentum copies), so that
:mod:`blip_core.interop` maps them with a table rather than code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip_core.config import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID, BlipConfig
from blip_core.losses import (
    IGNORE_INDEX,
    BlipOutput,
    ItcLoss,
    ItmLoss,
    LmLoss,
    lm_labels,
    positive_mask,
    sample_hard_negatives,
    soft_targets,
)
from blip_core.med import MedLMHead, MedModel
from blip_core.vision import build_vision_encoder

EMPTY_SLOT = -1  # idx_queue value of a queue slot that holds no feature yet (image ids are >= 0)

# Modules with an exponential-moving-average twin used for ITC targets.
MOMENTUM_PAIRS = (
    ("visual_encoder", "visual_encoder_m"),
    ("vision_proj", "vision_proj_m"),
    ("text_encoder", "text_encoder_m"),
    ("text_proj", "text_proj_m"),
)


@dataclass
class TextBatch:
    """A training batch: images, their captions tokenised twice, and image identities.

    Shapes: images (B, 3, H, W); text_ids / text_mask (B, L) for ITC/ITM, [CLS] first;
    lm_ids / lm_mask (B, L') = prompt + caption for the decoder; image_idx (B,) equal for
    captions of the same image (they are positives of each other).
    """

    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    lm_ids: torch.Tensor
    lm_mask: torch.Tensor
    image_idx: torch.Tensor
    prompt_length: int

    def to(self, device: torch.device | str) -> TextBatch:
        moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in vars(self).items()}
        return TextBatch(**moved)


class BlipModel(nn.Module):
    """BLIP for pre-training and its two fine-tunes (captioner: LM; filter: ITC + ITM)."""

    def __init__(self, cfg: BlipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vision_width = cfg.vision.width
        self.visual_encoder = build_vision_encoder(cfg.vision)
        self.text_encoder = MedModel(cfg.text, vision_width)
        self.lm_head = MedLMHead(cfg.text)
        self.vision_proj = nn.Linear(vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        for module in (self.text_encoder, self.lm_head, self.vision_proj, self.text_proj,
                       self.itm_head):
            module.apply(_init_text_weights)  # timm initialised the ViT itself

        for name, twin in MOMENTUM_PAIRS:
            module = copy.deepcopy(getattr(self, name))
            module.requires_grad_(False)
            setattr(self, twin, module)
        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        # Slots start empty (EMPTY_SLOT) and are masked out: random "features" in the queue would
        # reward collapsing every feature onto one direction, a trap for models trained from scratch.
        self.register_buffer("idx_queue", torch.full((1, q), EMPTY_SLOT, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        self.itc_loss = ItcLoss()
        self.itm_loss = ItmLoss()
        self.lm_loss = LmLoss(cfg.label_smoothing)

    # --- encoders -----------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images to (B, 1 + N, Dv) tokens; token 0 is [CLS]."""
        return self.visual_encoder.forward_features(images)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, Dv) image tokens to (B, embed_dim) unit ITC features."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) [CLS]-first ids to (B, embed_dim) unit ITC features (unimodal encoder)."""
        hidden, _ = self.text_encoder(text_ids, text_mask, mode="text", first_only=True)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(
        self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2) match logits of paired images and texts; [ENC] replaces the first token."""
        ids = text_ids.clone()
        ids[:, 0] = ENC_TOKEN_ID
        hidden, _ = self.text_encoder(ids, text_mask, image_embeds, mode="multimodal", first_only=True)
        return self.itm_head(hidden[:, 0])

    def lm_logits(
        self, image_embeds: torch.Tensor, lm_ids: torch.Tensor, lm_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, V) next-token logits of the decoder; [DEC] replaces the first token."""
        ids = lm_ids.clone()
        ids[:, 0] = DEC_TOKEN_ID
        hidden, _ = self.text_encoder(ids, lm_mask, image_embeds, mode="decoder")
        return self.lm_head(hidden, self.text_encoder.embeddings.word_embeddings.weight)

    # --- training -----------------------------------------------------------------------

    def forward(
        self, batch: TextBatch, alpha: float, losses: tuple[str, ...] = ("itc", "itm", "lm"),
        lm_dtype: torch.dtype | None = None,
    ) -> BlipOutput:
        """One ViT forward and up to three text forwards; returns every requested loss term.

        Args:
            batch: see :class:`TextBatch`.
            alpha: weight of the momentum model's soft ITC targets (ramped up by the trainer).
            losses: any of "itc", "itm", "lm".
            lm_dtype: dtype of the LM's vocabulary projection (the costliest matmul); default
                bf16 under bf16 autocast, else fp32.
        """
        unknown = set(losses) - {"itc", "itm", "lm"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        image_embeds = self.encode_image(batch.images)
        out: dict[str, torch.Tensor] = {}

        if "itc" in losses or "itm" in losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(batch.text_ids, batch.text_mask)
            if "itc" in losses:
                out["loss_itc"] = self._itc(batch, image_feat, text_feat, alpha)
            if "itm" in losses:
                out["loss_itm"] = self._itm(batch, image_embeds, image_feat, text_feat)
        if "lm" in losses:
            out["loss_lm"] = self._lm(batch, image_embeds, lm_dtype)
        return BlipOutput(loss=sum(out.values()), **out)

    @torch.no_grad()
    def evaluation_losses(self, batch: TextBatch, seed: int = 0) -> BlipOutput:
        """The three losses on a batch, comparable across training: ITC in-batch with ground-truth
        targets (no queue, no momentum model), ITM with seeded hard negatives, LM. Touches no state.
        """
        was_training = self.training
        self.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image_embeds = self.encode_image(batch.images)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(batch.text_ids, batch.text_mask)
            pos = positive_mask(batch.image_idx, batch.image_idx)
            sim = image_feat @ text_feat.t() / self.temp.clamp(0.001, 0.5)
            itc = self.itc_loss(sim, sim.t(), soft_targets(sim, pos, 0.0), soft_targets(sim.t(), pos, 0.0))
            itm = self._itm(batch, image_embeds, image_feat, text_feat)
            lm = self._lm(batch, image_embeds)
        self.train(was_training)
        return BlipOutput(loss=itc + itm + lm, loss_itc=itc, loss_itm=itm, loss_lm=lm)

    def _lm(self, batch: TextBatch, image_embeds: torch.Tensor,
            lm_dtype: torch.dtype | None = None) -> torch.Tensor:
        ids = batch.lm_ids.clone()
        ids[:, 0] = DEC_TOKEN_ID
        hidden, _ = self.text_encoder(ids, batch.lm_mask, image_embeds, mode="decoder")
        targets = lm_labels(batch.lm_ids, PAD_TOKEN_ID, batch.prompt_length)[:, 1:]  # (B, L−1)
        scored = targets != IGNORE_INDEX
        if lm_dtype is None:
            device = image_embeds.device.type
            autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
            lm_dtype = torch.bfloat16 if autocast == torch.bfloat16 else torch.float32
        # The vocabulary projection is the costliest matmul: scored positions only, fused with
        # the loss so that the (T, V) logits never exist in fp32 at once.
        h = self.lm_head.transform(hidden[:, :-1][scored]).float()
        return self.lm_loss.projected(h, self.text_encoder.embeddings.word_embeddings.weight,
                                      self.lm_head.bias, targets[scored], lm_dtype)

    def _itc(
        self, batch: TextBatch, image_feat: torch.Tensor, text_feat: torch.Tensor, alpha: float
    ) -> torch.Tensor:
        idx = batch.image_idx
        idx_all = torch.cat([idx, self.idx_queue[0]])  # (B + Q,)
        positives = positive_mask(idx, idx_all)  # (B, B + Q)
        empty = (idx_all == EMPTY_SLOT)[None]  # (1, B + Q): no feature there yet
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.visual_encoder_m.forward_features(batch.images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            hidden_m, _ = self.text_encoder_m(batch.text_ids, batch.text_mask, mode="text",
                                              first_only=True)
            text_feat_m = F.normalize(self.text_proj_m(hidden_m[:, 0]), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            sim_i2t_m = (image_feat_m @ text_feat_m_all / self.temp).masked_fill(empty, float("-inf"))
            sim_t2i_m = (text_feat_m @ image_feat_m_all / self.temp).masked_fill(empty, float("-inf"))
            targets_i2t = soft_targets(sim_i2t_m, positives, alpha)
            targets_t2i = soft_targets(sim_t2i_m, positives, alpha)
        sim_i2t = (image_feat @ text_feat_m_all / self.temp).masked_fill(empty, float("-inf"))  # (B, B+Q)
        sim_t2i = (text_feat @ image_feat_m_all / self.temp).masked_fill(empty, float("-inf"))
        loss = self.itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        self._enqueue(image_feat_m, text_feat_m, idx)
        return loss

    def _itm(
        self,
        batch: TextBatch,
        image_embeds: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
    ) -> torch.Tensor:
        bsz = image_embeds.shape[0]
        with torch.no_grad():
            positives = positive_mask(batch.image_idx, batch.image_idx)  # (B, B)
            sim_i2t = image_feat @ text_feat.t() / self.temp
            neg_text = sample_hard_negatives(sim_i2t, positives)  # a text for each image
            neg_image = sample_hard_negatives(sim_i2t.t(), positives)  # an image for each text
        rows = torch.arange(bsz, device=image_embeds.device)
        img_rows = rows[neg_image >= 0]  # texts that got a negative image
        txt_rows = rows[neg_text >= 0]  # images that got a negative text
        # Positives, then (negative image, text), then (image, negative text): one forward.
        images = torch.cat([image_embeds, image_embeds[neg_image[img_rows]], image_embeds[txt_rows]])
        ids = torch.cat([batch.text_ids, batch.text_ids[img_rows], batch.text_ids[neg_text[txt_rows]]])
        mask = torch.cat(
            [batch.text_mask, batch.text_mask[img_rows], batch.text_mask[neg_text[txt_rows]]]
        )
        logits = self.itm_logits(images, ids, mask)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:bsz] = 1
        return self.itm_loss(logits, labels)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.cfg.momentum
        for name, twin in MOMENTUM_PAIRS:
            params = [p.detach() for p in getattr(self, name).parameters()]
            params_m = list(getattr(self, twin).parameters())
            torch._foreach_mul_(params_m, m)
            torch._foreach_add_(params_m, params, alpha=1.0 - m)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        image_feat, text_feat, idx = (_all_gather(t) for t in (image_feat, text_feat, idx))
        n, q = image_feat.shape[0], self.cfg.queue_size
        slots = (self.queue_ptr[0] + torch.arange(n, device=idx.device)) % q  # wraps around
        self.image_queue[:, slots] = image_feat.t().to(self.image_queue.dtype)  # autocast: bf16
        self.text_queue[:, slots] = text_feat.t().to(self.text_queue.dtype)
        self.idx_queue[0, slots] = idx
        self.queue_ptr[0] = (self.queue_ptr[0] + n) % q

    def sync_momentum(self) -> None:
        """Copy the online weights into the momentum encoders (as at initialisation)."""
        with torch.no_grad():
            for name, twin in MOMENTUM_PAIRS:
                getattr(self, twin).load_state_dict(getattr(self, name).state_dict())


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every DDP rank (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _init_text_weights(module: nn.Module) -> None:
    """BERT initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear | nn.Embedding):
        module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


def count_parameters(model: BlipModel, include_momentum: bool = False) -> int:
    """Trainable-model parameters; momentum copies only when ``include_momentum``."""
    twins = {twin for _, twin in MOMENTUM_PAIRS}
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_momentum or name.split(".")[0] not in twins
    )

"""MED: the multimodal mixture of encoder-decoder (BERT-shaped), written bottom-up.

One network, three modes:

* ``"text"``: unimodal text encoder, bidirectional self-attention, [CLS] first;
* ``"multimodal"``: image-grounded text encoder, a cross-attention layer between self-attention
  and the feed-forward block of every layer, [ENC] first;
* ``"decoder"``: image-grounded text decoder, causal self-attention, [DEC] as bos.

The decoder shares every parameter with the encoder except the self-attention layers (paper,
Table 3), so each layer holds two self-attention blocks, ``self_attn`` (encoder modes) and
``self_attn_causal`` (decoder), and one ``cross_attn`` and ``mlp`` used by both.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.config import TextConfig

Mode = Literal["text", "multimodal", "decoder"]
KV = tuple[torch.Tensor, torch.Tensor]
# Per layer: (self-attention k/v, cross-attention k/v or None).
LayerCache = tuple[KV, KV | None]


class MedEmbeddings(nn.Module):
    """Word + learned absolute position embeddings, LayerNorm, dropout (no token types)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        length = input_ids.shape[1]
        if past_length + length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence of {past_length + length} tokens exceeds max_position "
                f"{self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.norm(x))


class MedAttention(nn.Module):
    """Multi-head attention followed by BERT's output block (dense, dropout, residual norm)."""

    def __init__(self, cfg: TextConfig, kv_dim: int | None = None) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        if hidden % cfg.num_heads:
            raise ValueError(f"hidden_size {hidden} not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim or hidden, hidden)
        self.value = nn.Linear(kv_dim or hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        past: KV | None = None,
        static_past: bool = False,
        first_only: bool = False,
    ) -> tuple[torch.Tensor, KV]:
        """Attend from ``x`` (B, L, D) to itself, or to ``context`` (B, M, Dkv) when given.

        Args:
            mask: boolean, broadcastable to (B, H, L, keys); True where attention is allowed.
            past: cached keys/values (B, H, P, Dh). Self-attention appends to them; with
                ``static_past`` (cross-attention) they are reused as they are, and may hold one
                row per group of B / rows consecutive rows of ``x`` (the beams of one image):
                each group's queries then attend to their shared row together.
            first_only: attend from the first token alone (keys and values still from every
                token); the output is then (B, 1, D). ``mask`` must not depend on the query.

        Returns:
            The output (B, L, D) and the keys/values to cache.
        """
        queries = x[:, :1] if first_only else x
        b, length, d = queries.shape
        q = self._heads(self.query(queries))
        groups = 1
        if past is not None and static_past:
            k, v = past
            groups = b // k.shape[0]
        else:
            src = x if context is None else context
            k, v = self._heads(self.key(src)), self._heads(self.value(src))
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        drop = self.dropout if self.training else 0.0
        if groups * k.shape[0] != b or (groups > 1 and mask is not None):
            raise ValueError(f"{b} query rows do not match {k.shape[0]} rows of keys/values")
        if groups > 1:  # (B, H, L, Dh) queries to (B / g, H, g * L, Dh): g rows share k and v
            h, dh = q.shape[1], q.shape[3]
            q = q.view(k.shape[0], groups, h, length, dh).transpose(1, 2).reshape(
                k.shape[0], h, groups * length, dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        if groups > 1:
            out = out.view(k.shape[0], out.shape[1], groups, length, -1).transpose(1, 2)
            out = out.reshape(b, -1, length, out.shape[-1])  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(b, length, d)  # (B, L, D)
        out = F.dropout(self.dense(out), drop, self.training)
        return self.norm(out + queries), (k, v)


class MedMLP(nn.Module):
    """BERT's feed-forward block: dense, GELU, dense, dropout, residual norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)


class MedLayer(nn.Module):
    """One MED block: self-attention (per mode), cross-attention (grounded modes), MLP."""

    def __init__(self, cfg: TextConfig, vision_width: int) -> None:
        super().__init__()
        self.self_attn = MedAttention(cfg)  # bidirectional: encoder modes only
        self.self_attn_causal = MedAttention(cfg)  # causal: decoder only
        self.cross_attn = MedAttention(cfg, kv_dim=vision_width)  # shared by both
        self.mlp = MedMLP(cfg)  # shared by both

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        mode: Mode,
        past: LayerCache | None = None,
        first_only: bool = False,
    ) -> tuple[torch.Tensor, LayerCache]:
        """``first_only``: the output is the first token's alone, (B, 1, D) (encoder modes)."""
        attn = self.self_attn_causal if mode == "decoder" else self.self_attn
        x, self_kv = attn(x, mask=self_mask, past=past[0] if past else None, first_only=first_only)
        cross_kv = None
        if mode != "text":
            if image_embeds is None and not (past and past[1] is not None):
                raise ValueError(f"mode {mode!r} needs image_embeds")
            x, cross_kv = self.cross_attn(
                x, context=image_embeds, past=past[1] if past else None, static_past=True
            )
        return self.mlp(x), (self_kv, cross_kv)


class MedModel(nn.Module):
    """The MED transformer (embeddings + layers), run in one of its three modes."""

    def __init__(self, cfg: TextConfig, vision_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = MedEmbeddings(cfg)
        self.layers = nn.ModuleList(MedLayer(cfg, vision_width) for _ in range(cfg.num_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        mode: Mode = "text",
        past_key_values: list[LayerCache] | None = None,
        use_cache: bool = False,
        first_only: bool = False,
    ) -> tuple[torch.Tensor, list[LayerCache] | None]:
        """Encode or decode a batch of token ids.

        Args:
            input_ids: (B, L) token ids; the first is [CLS], [ENC] or [DEC] by mode.
            attention_mask: (B, P + L) with 1 for real tokens, 0 for padding (P cached tokens).
            image_embeds: (B, N, Dv) image tokens for the grounded modes.
            past_key_values: decoder cache from a previous call (generation).
            first_only: return the first token's hidden state alone, (B, 1, D): the last layer
                then runs its queries, cross-attention and MLP for that token only ([CLS] / [ENC]
                features for ITC and ITM). Encoder modes, no cache.

        Returns:
            Hidden states (B, L, D) and, with ``use_cache``, the cache for the next call.
        """
        if first_only and (mode == "decoder" or use_cache or past_key_values):
            raise ValueError("first_only is for the encoder modes, without a cache")
        past_len = past_key_values[0][0][0].shape[2] if past_key_values else 0
        x = self.embeddings(input_ids, past_length=past_len)
        mask = self_attention_mask(
            attention_mask, input_ids.shape[1], past_len, causal=mode == "decoder",
            device=input_ids.device,
        )
        cache: list[LayerCache] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, layer_cache = layer(x, mask, image_embeds, mode, past, first_only and i == last)
            cache.append(layer_cache)
        return x, cache if use_cache else None


def self_attention_mask(
    attention_mask: torch.Tensor | None,
    length: int,
    past_length: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean self-attention mask (B or 1, 1, L, P + L), True where allowed; None if all allowed.

    Query ``i`` (absolute position ``P + i``) may see key ``j`` when ``j`` is not padding and, for
    the decoder, ``j <= P + i``.
    """
    mask = None
    if causal and length > 1:
        q = torch.arange(past_length, past_length + length, device=device)[:, None]
        k = torch.arange(past_length + length, device=device)[None, :]
        mask = (k <= q)[None, None]  # (1, 1, L, P + L)
    if attention_mask is not None and not bool(attention_mask.all()):
        pad = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, P + L)
        mask = pad if mask is None else mask & pad
    return mask


class MedLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, norm, then the (tied) vocabulary projection."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, L, D) hidden states to (B, L, V) logits, projecting on the (tied) embeddings."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """The (…, D) inputs of the vocabulary projection: dense, GELU, norm."""
        return self.norm(F.gelu(self.dense(hidden)))

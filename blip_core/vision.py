"""The ViT image encoder, built by timm; its [CLS] token is the global image feature."""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from blip_core.config import VisionConfig


def build_vision_encoder(cfg: VisionConfig) -> VisionTransformer:
    """A randomly initialised ViT with a class token and no classifier head.

    ``forward_features(images)`` maps (B, 3, H, W) to (B, 1 + H*W/patch², width), normed.
    Parameter names follow timm, which is also the official BLIP ``visual_encoder.*`` layout.
    """
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        drop_path_rate=cfg.drop_path,
    )
    if cfg.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    return vit


def resize_pos_embed(pos_embed: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Resample a (1, 1 + N, D) position embedding to the grid of ``image_size`` (e.g. 224 → 384)."""
    side = image_size // patch_size
    if pos_embed.shape[1] == 1 + side * side:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=(side, side), num_prefix_tokens=1)

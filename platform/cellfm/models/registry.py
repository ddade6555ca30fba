"""Build a backbone from the `model` section of the config: `name` picks the architecture,
`size` picks width/depth/heads so that every architecture shares the same size ladder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cellfm.config import ModelConfig


@dataclass(frozen=True)
class BackboneSize:
    embed_dim: int
    depth: int
    num_heads: int


# The standard ViT ladder (ViT-S/B/L); `tiny` is for CPU demos and tests.
SIZES: dict[str, BackboneSize] = {
    "tiny": BackboneSize(96, 4, 3),
    "small": BackboneSize(384, 12, 6),
    "base": BackboneSize(768, 12, 12),
    "large": BackboneSize(1024, 24, 16),
}


BACKBONES = ("cellrep", "c3r", "vit_rgb", "channelvit", "single_channel", "dichavit", "ca_mae")
# Backbones with a learned embedding per channel name (model.channel_vocabulary): no other name can be embedded.
VOCABULARY_BACKBONES = ("channelvit", "dichavit")


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone named by cfg.name at cfg.size. Every backbone has the common interface

        forward(x (B,C,H,W), channel_names=None, channel_mask=None (B,C) bool, patch_mask=None (B,N) bool)
          -> {"cls": (B,D), "patch": (B,N,D), "registers": (B,R,D)}

    plus `embed_dim` (D) and `num_patch_tokens(img_size) -> N`. C3R, ChannelViT and DiChaViT need channel_names."""
    if cfg.size not in SIZES:
        raise ValueError(f"model.size={cfg.size!r} is not one of {sorted(SIZES)}")
    size = SIZES[cfg.size]
    common = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        num_register_tokens=cfg.num_register_tokens,
        drop_path_rate=cfg.drop_path_rate,
        layerscale_init=cfg.layerscale_init,
    )
    if cfg.name == "cellrep":
        from cellfm.models.cellrep import CellRep

        return CellRep(
            **common,
            mixer_depth=cfg.mixer_depth,
            channel_encoder_dim=cfg.channel_encoder_dim,
            channel_encoder_stride=cfg.channel_encoder_stride,
            pooling_ratio=cfg.pooling_ratio,
            input_norm=cfg.input_norm,
            channel_mixer=cfg.channel_mixer,
            channel_pool_after=cfg.channel_pool_after,
            channel_pooling=cfg.channel_pooling,
            channel_pooling_queries=cfg.channel_pooling_queries,
        )
    if cfg.name == "c3r":
        from cellfm.models.c3r import C3R

        return C3R(channel_groups=dict(cfg.channel_groups or {}), n_pre=cfg.n_pre, channel_pooling=cfg.channel_pooling,
                   channel_pooling_queries=cfg.channel_pooling_queries, **common)
    if cfg.name == "vit_rgb":
        from cellfm.models.vit_rgb import RGBCompositeViT

        return RGBCompositeViT(channel_vocabulary=list(cfg.channel_vocabulary or []), **common)
    if cfg.name == "channelvit":
        from cellfm.models.channelvit import ChannelViT

        return ChannelViT(channel_vocabulary=list(cfg.channel_vocabulary or []), **common)
    if cfg.name == "dichavit":
        from cellfm.models.dichavit import DiChaViT

        return DiChaViT(channel_vocabulary=list(cfg.channel_vocabulary or []), **common)
    if cfg.name == "ca_mae":
        from cellfm.models.ca_mae import ChannelAgnosticMAE

        return ChannelAgnosticMAE(**common)
    if cfg.name == "single_channel":
        from cellfm.models.single_channel import SingleChannelViT

        return SingleChannelViT(**common)
    raise ValueError(f"model.name={cfg.name!r} is not a registered backbone; choose one of {list(BACKBONES)}")

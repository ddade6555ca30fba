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


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """Returns a backbone whose forward(x (B,C,H,W), channel_mask=None) gives a dict with
    `cls` (B, D) and `patch` (B, N, D), and whose `embed_dim` attribute is D."""
    size = SIZES[cfg.size]
    if cfg.name == "cellrep":
        from cellfm.models.cellrep import CellRep

        return CellRep(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=size.embed_dim,
            depth=size.depth,
            num_heads=size.num_heads,
            mixer_depth=cfg.mixer_depth,
            channel_encoder_dim=cfg.channel_encoder_dim,
            channel_encoder_stride=cfg.channel_encoder_stride,
            pooling_ratio=cfg.pooling_ratio,
            num_register_tokens=cfg.num_register_tokens,
            drop_path_rate=cfg.drop_path_rate,
            layerscale_init=cfg.layerscale_init,
        )
    raise ValueError(f"model.name={cfg.name!r} is not a registered backbone")

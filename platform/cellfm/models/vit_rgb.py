"""Baseline: a DINOv2-style ViT on a CellProfiler-style RGB composite of the channels.

Each channel is min-max scaled per image, given a colour at an evenly spaced hue (channel i of n: hue
i/n, full saturation and value), blended additively, and each RGB component is divided by the total
weight of the colours it received, so the composite lies in [0, 1]."""

from __future__ import annotations

import colorsys

import torch
from torch import Tensor, nn

from cellfm.models.layers import check_channel_mask, check_image, normalize_channel_names
from cellfm.models.vit import VisionTransformer


def hue_colors(n: int) -> list[tuple[float, float, float]]:
    """RGB of n hues evenly spaced on the colour wheel (hue i/n); one channel is rendered grey (1, 1, 1)
    rather than pure red so that a single-channel image fills all three inputs."""
    if n == 1:
        return [(1.0, 1.0, 1.0)]
    return [colorsys.hsv_to_rgb(i / n, 1.0, 1.0) for i in range(n)]


def channel_ranks(channel_names: list[list[str]] | None, channel_mask: Tensor | None, B: int, C: int,
                  vocabulary: list[str] | None = None) -> tuple[list[list[int]], list[int]]:
    """Colour slot of every (sample, channel) and the number of real channels per sample.

    With names, a stain keeps its colour whatever its position in the tensor: slots follow the order of
    `vocabulary` (names outside it after, alphabetically), else alphabetical order. Without names, slots
    follow the tensor order. Masked channels get slot -1."""
    order = {name: i for i, name in enumerate(vocabulary or [])}
    ranks, counts = [], []
    for b in range(B):
        real = [c for c in range(C) if channel_mask is None or bool(channel_mask[b, c])]
        if channel_names is not None:
            real = sorted(real, key=lambda c: (order.get(channel_names[b][c], len(order)), channel_names[b][c], c))
        slot = [-1] * C
        for r, c in enumerate(real):
            slot[c] = r
        ranks.append(slot)
        counts.append(len(real))
    return ranks, counts


def rgb_composite(x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                  vocabulary: list[str] | None = None, eps: float = 1e-6) -> Tensor:
    """(B, C, H, W) -> (B, 3, H, W) in [0, 1] (see module docstring); masked channels do not contribute."""
    B, C, H, W = check_image(x, "rgb_composite")
    check_channel_mask(channel_mask, B, C)
    names = normalize_channel_names(channel_names, B, C, "rgb_composite")
    ranks, counts = channel_ranks(names, channel_mask, B, C, vocabulary)
    colors = torch.zeros(B, C, 3)
    palettes = {n: torch.tensor(hue_colors(n), dtype=torch.float32) for n in set(counts)}
    for b in range(B):
        for c in range(C):
            if ranks[b][c] >= 0:
                colors[b, c] = palettes[counts[b]][ranks[b][c]]
    colors = colors.to(device=x.device, dtype=x.dtype)

    flat = x.reshape(B, C, H * W)
    if channel_mask is not None:
        flat = flat.masked_fill(~channel_mask[:, :, None], 0.0)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    scaled = ((flat - lo) / (hi - lo).clamp_min(eps)).clamp(0.0, 1.0)  # constant channel -> 0
    rgb = torch.einsum("bck,bcp->bkp", colors, scaled)
    rgb = rgb / colors.sum(dim=1).clamp_min(eps)[:, :, None]
    return rgb.clamp(0.0, 1.0).reshape(B, 3, H, W)


class RGBCompositeViT(nn.Module):
    """`vit_rgb`: rgb_composite -> 3-channel VisionTransformer (patch tokens: L; mask_token as the ViT's)."""

    def __init__(self, channel_vocabulary: list[str] | None = None, **vit_kwargs):
        """channel_vocabulary: optional fixed stain order for the colour assignment; vit_kwargs go to
        VisionTransformer (img_size, patch_size, embed_dim, depth, num_heads, ...)."""
        super().__init__()
        vit_kwargs.pop("in_chans", None)
        self.vit = VisionTransformer(in_chans=3, **vit_kwargs)
        self.channel_vocabulary = list(channel_vocabulary or [])
        self.embed_dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_size

    def num_patch_tokens(self, img_size) -> int:
        return self.vit.num_patch_tokens(img_size)

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        rgb = rgb_composite(x, channel_names, channel_mask, self.channel_vocabulary)
        return self.vit(rgb, patch_mask=patch_mask)

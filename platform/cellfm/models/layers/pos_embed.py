"""Resampling a learned 2-D positional embedding to another patch grid."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def interpolate_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resampling of a learned 2-D positional embedding to another patch grid.

    pos_embed: (1, old_h * old_w, D) (patch positions only, row-major); old_grid / new_grid: (h, w).
    Returns (1, new_h * new_w, D); the input tensor itself when the grids match."""
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != old_h * old_w:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not match grid {tuple(old_grid)}")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    # Interpolate in fp32: bicubic on bf16 weights is lossy and not implemented on every backend.
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)

"""Positional embeddings of a patch grid: resampling a learned one to another grid, and the fixed 2-D sin-cos
one (MAE, Phenom's CA-MAE)."""

from __future__ import annotations

import torch
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


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, scale: float = 10000.0) -> Tensor:
    """(1, h * w, dim) fixed 2-D sin-cos positions of a patch grid (h, w), row-major: dim / 4 frequencies
    scale ** (-k / (dim / 4)), k = 0 .. dim/4 - 1, and [sin(row f), cos(row f), sin(col f), cos(col f)] (the
    layout of Phenom's CA-MAE). Defined at every grid size, so nothing is resampled. dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    freqs = 1.0 / scale ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    row_angles = torch.outer(rows.flatten(), freqs)
    col_angles = torch.outer(cols.flatten(), freqs)
    return torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)[None]

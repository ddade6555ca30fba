"""Pooling per-channel tokens over a sample's real channels."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_over_channels(tokens: Tensor, channel_mask: Tensor | None) -> Tensor:
    """tokens (B, C, L, D), channel_mask (B, C) bool (True = real; None: all) -> (B, L, D): for each grid position
    the mean over the sample's real channels (padded / dropped channels get weight 0)."""
    if channel_mask is None:
        return tokens.mean(dim=1)
    w = channel_mask.to(tokens.dtype)
    return torch.einsum("bc,bcld->bld", w, tokens) / w.sum(dim=1)[:, None, None]

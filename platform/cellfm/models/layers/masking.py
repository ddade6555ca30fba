"""iBOT patch masking: masked patch tokens are replaced by a learned mask token."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_patch_mask(tokens: Tensor, patch_mask: Tensor | None, replacement: Tensor) -> Tensor:
    """tokens (..., N, D); patch_mask (..., N) bool, True = replace that token, broadcast against
    tokens' leading dimensions (e.g. (B, 1, L) for (B, C, L, D) per-channel tokens); replacement: the mask
    token, broadcastable to tokens, e.g. (1, D), or (1, N, D) when it already carries positions.
    Returns tokens with the masked rows replaced (tokens itself when patch_mask is None)."""
    if patch_mask is None:
        return tokens
    return torch.where(patch_mask.unsqueeze(-1), replacement.to(tokens.dtype), tokens)

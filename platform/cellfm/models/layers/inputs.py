"""Validation of the common backbone interface's inputs (DESIGN §4):

    forward(x (B,C,H,W), channel_names=None, channel_mask=None (B,C) bool, patch_mask=None (B,N) bool)
      -> {"cls": (B,D), "patch": (B,N,D), "registers": (B,R,D)}"""

from __future__ import annotations

import torch
from torch import Tensor


def check_image(x: Tensor, model: str) -> tuple[int, int, int, int]:
    """(B, C, H, W) of a 4-D image batch with C >= 1; a clear error naming `model` otherwise."""
    if x.ndim != 4:
        raise ValueError(f"{model} expects (B, C, H, W) input, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if C < 1:
        raise ValueError(f"{model} needs at least one channel, got shape {tuple(x.shape)}")
    return B, C, H, W


def check_channel_mask(channel_mask: Tensor | None, B: int, C: int) -> None:
    """channel_mask: (B, C) bool, True = real channel, False = padding / dropped; every sample needs a real channel."""
    if channel_mask is None:
        return
    if channel_mask.shape != (B, C) or channel_mask.dtype != torch.bool:
        raise ValueError(
            f"channel_mask must be a bool tensor of shape {(B, C)}, got {channel_mask.dtype} {tuple(channel_mask.shape)}"
        )
    if not bool(channel_mask.any(dim=1).all()):
        raise ValueError("channel_mask has a sample with no real channel")


def check_patch_mask(patch_mask: Tensor | None, B: int, N: int) -> None:
    """patch_mask: (B, N) bool over the backbone's output patch tokens, True = replace by mask_token."""
    if patch_mask is None:
        return
    if patch_mask.shape != (B, N) or patch_mask.dtype != torch.bool:
        raise ValueError(
            f"patch_mask must be a bool tensor of shape {(B, N)} (N = num_patch_tokens), "
            f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
        )


def normalize_channel_names(channel_names, B: int, C: int, model: str) -> list[list[str]] | None:
    """Accepts None, one list of C names (shared by the batch) or B lists of C names; returns B lists or None."""
    if channel_names is None:
        return None
    names = list(channel_names)
    if names and all(isinstance(n, str) for n in names):
        names = [names] * B
    if len(names) != B or any(len(row) != C for row in names):
        raise ValueError(
            f"{model}: channel_names must give {C} names for each of the {B} samples (or one list of {C} names), "
            f"got {len(names)} rows of lengths {[len(row) for row in names][:8]}"
        )
    return [[str(n) for n in row] for row in names]


def zero_padding(x: Tensor, channel_mask: Tensor | None) -> Tensor:
    """x (B, C, H, W) with the planes of masked channels set to 0 (x itself without a mask). Done before
    any compute: NaN / inf garbage in a padded plane would otherwise leak through a 0 weight (0 * NaN = NaN)."""
    if channel_mask is None:
        return x
    return x.masked_fill(~channel_mask[:, :, None, None], 0.0)

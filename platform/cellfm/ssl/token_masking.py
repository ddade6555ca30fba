"""MAE's random token masking over every channel's patch tokens (Phenom's CA-MAE: a fixed fraction of all L*C
tokens of an image is hidden from the encoder, uniformly at random).

Draws are made per real channel (`cellfm.ssl.channel_sampling.spread_over_real_channels`): with the same
generator state a padded batch masks the same real tokens as the unpadded one, and a padded channel's tokens
are always masked (never seen)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cellfm.ssl.channel_sampling import check_valid_channels, spread_over_real_channels


def visible_token_counts(real_channels: Tensor, tokens_per_channel: int, mask_ratio: float) -> Tensor:
    """(B,) long: the tokens a sample keeps visible, floor((1 - mask_ratio) * n) of its n = L * real channels,
    at least 1."""
    n = real_channels.sum(dim=1) * tokens_per_channel
    # The small epsilon keeps exact products (16 * 0.25 = 4) from rounding down through float error.
    return torch.floor(n.double() * (1.0 - mask_ratio) + 1e-9).long().clamp_min(1)


def random_token_mask(valid: Tensor, tokens_per_channel: int, mask_ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """valid (B, C) bool, True = real channel -> (B, C, L) bool, True = masked: per sample exactly
    `visible_token_counts` of its real tokens stay visible, chosen uniformly without replacement (the smallest of
    one uniform draw per real token); every token of a padded channel is masked. Drawn on the generator's device
    (CPU by default), returned on valid's device."""
    check_valid_channels(valid)
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    real = valid.to(gen_device)
    B, C = real.shape
    L = tokens_per_channel
    n = int(real.sum(dim=1).max())
    draws = torch.rand(L, B, n, generator=generator, device=gen_device)
    scores = spread_over_real_channels(draws, real, fill=math.inf).permute(1, 2, 0)  # (B, C, L)
    rank = scores.reshape(B, C * L).argsort(dim=1).argsort(dim=1).reshape(B, C, L)
    keep = rank < visible_token_counts(real, L, mask_ratio).to(gen_device)[:, None, None]
    return (~keep).to(valid.device)

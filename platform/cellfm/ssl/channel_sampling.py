"""Channel sampling for training: which of a sample's real channels the student sees.

Hierarchical channel sampling (HCS; ChannelViT, Bao et al., ICLR 2024): per sample with n real channels,
draw m ~ U{1..n}, then m of its n real channels uniformly without replacement. The teacher sees every real
channel; evaluation never samples.

Diverse channel sampling (DCS; DiChaViT, Pham et al., NeurIPS 2024, reference github
chaudatascience/diverse_channel_vit, `hcs_sampling: lowest_cosine_prob`): per sample m ~ U{1..n} and an anchor
channel a uniformly among the real ones; then m channels drawn one after another without replacement with
probability proportional to exp((1 - cos(e_a, e_c)) / T) over the remaining ones (e_c: the learned channel
embedding, T the temperature), so channels unlike the anchor are favoured; if the anchor is not among the m drawn,
it replaces the m-th.

Every draw here is made per *real* channel, never per padded slot: a sample's j-th real channel gets the
j-th draw of that sample, and the number of draws depends only on the real channel counts. So with the same
generator state a padded and an unpadded batch keep the same channels (padding changes nothing), and a
padded channel is never kept. Masked Context Distillation (`cellfm.ssl.mcd`) and the multi-crop intensity
jitter draw the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_valid_channels(valid: Tensor) -> None:
    """valid (B, C) bool, True = real channel; every sample needs one."""
    if valid.ndim != 2 or valid.dtype != torch.bool:
        raise ValueError(f"channel mask must be a (B, C) bool tensor, got {valid.dtype} {tuple(valid.shape)}")
    if not bool(valid.any(dim=1).all()):
        raise ValueError("channel mask has a sample with no real channel")


def spread_over_real_channels(draws: Tensor, valid: Tensor, fill: float = 0.0) -> Tensor:
    """Per-real-channel draws onto the padded layout: draws (..., B, N), N >= the most real channels of
    any sample, valid (B, C) bool -> (..., B, C), where slot c of sample b holds draws[..., b, j] if c is
    that sample's j-th real channel, and `fill` where c is padding."""
    valid = valid.to(draws.device)
    ordinal = (valid.cumsum(dim=1) - 1).clamp_min(0)  # (B, C): j of the j-th real channel
    index = ordinal.expand(*draws.shape[:-2], *ordinal.shape)
    spread = draws.gather(-1, index)
    return spread.masked_fill(~valid, fill)


def real_channel_uniforms(valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, C) U(0, 1) draws, one per real channel (inf on padding), drawn on the generator's device as
    (B, n) for n = the most real channels of any sample: independent of the padded width C."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    valid = valid.to(gen_device)
    n = int(valid.sum(dim=1).max())
    if n == 0:  # no sample has a channel of this kind: nothing to draw
        return torch.full(valid.shape, float("inf"), device=gen_device)
    draws = torch.rand(valid.shape[0], n, generator=generator, device=gen_device)
    return spread_over_real_channels(draws, valid, fill=float("inf"))


def keep_random_channels(valid: Tensor, counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """valid (B, C) bool, counts (B,) long -> (B, C) bool keeping counts[b] of sample b's valid channels,
    chosen uniformly without replacement (the counts[b] smallest of one uniform draw per valid channel)."""
    scores = real_channel_uniforms(valid, generator)
    rank = scores.argsort(dim=1).argsort(dim=1)  # invalid slots (inf) rank after every valid one
    return (rank < counts.to(rank.device)[:, None]) & valid.to(rank.device)


def uniform_counts(n: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B,) long n >= 1 -> (B,) long m ~ U{1..n} per sample (one uniform draw each)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    n = n.to(gen_device)
    u = torch.rand(n.shape[0], generator=generator, device=gen_device)
    return (1 + (u * n).long()).minimum(n)


def hierarchical_channel_mask(valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """HCS keep-mask: valid (B, C) bool (True = real channel) -> (B, C) bool, per sample m ~ U{1..n} of its
    n real channels, chosen without replacement. Drawn on the generator's device (CPU by default), returned
    on valid's device."""
    check_valid_channels(valid)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    real = valid.to(gen_device)
    keep = keep_random_channels(real, uniform_counts(real.sum(dim=1), generator), generator)
    return keep.to(valid.device)


def diverse_channel_mask(valid: Tensor, channel_embeddings: Tensor, temperature: float,
                         generator: torch.Generator | None = None) -> Tensor:
    """DCS keep-mask (module doc): valid (B, C) bool (True = real channel), channel_embeddings (B, C, D) (each
    slot's learned embedding; padded slots ignored), temperature T > 0 -> (B, C) bool. Draws, in order, per
    sample: m (one uniform), the anchor (one uniform), one uniform per real channel for the weighted draw
    (successive sampling in proportion to the weights w_c = the order of E_c / w_c, E_c = -log U_c ~ Exp(1)).
    Drawn on the generator's device (CPU by default), returned on valid's device."""
    check_valid_channels(valid)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    real = valid.to(gen_device)
    n = real.sum(dim=1)
    m = uniform_counts(n, generator)
    ordinal = (torch.rand(n.shape[0], generator=generator, device=gen_device) * n).long().minimum(n - 1)
    anchor = real & ((real.cumsum(dim=1) - 1) == ordinal[:, None])  # (B, C), one True per row
    unit = F.normalize(channel_embeddings.detach().to(gen_device, torch.float32), dim=-1)
    cosine = torch.einsum("bcd,bd->bc", unit, (unit * anchor[..., None]).sum(dim=1))
    log_weight = (1.0 - cosine) / temperature
    exponential = -torch.log(real_channel_uniforms(real, generator).clamp(max=1.0))
    order_key = torch.where(real, torch.log(exponential) - log_weight, torch.full_like(log_weight, float("inf")))
    rank = order_key.argsort(dim=1).argsort(dim=1)
    anchor_drawn = (rank * anchor).sum(dim=1) < m
    first_m = rank < m[:, None]
    first_m_minus_one_and_anchor = (rank < (m - 1)[:, None]) | anchor
    keep = torch.where(anchor_drawn[:, None], first_m, first_m_minus_one_and_anchor) & real
    return keep.to(valid.device)

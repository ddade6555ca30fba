"""DiChaViT's token diversification loss (Pham et al., NeurIPS 2024; reference github
chaudatascience/diverse_channel_vit, `ortho_proj_loss_fn_v2` with reverse_pos_pairs): the patch tokens that the
shared patch embedding makes of every channel, L2-normalized, are pushed towards orthogonality, both within a
channel and (weighted more) across channels:

    loss = mean over samples of  same_weight * mean_{i != j same channel} <f_i, f_j>
                                + cross_weight * mean_{i, j different channels} <f_i, f_j>

Computed from per-channel sums (sum over pairs of <f_i, f_j> = |sum f|^2 - sum |f|^2), never the (C*L)^2 matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The reference's pair counts carry this epsilon (a sample with one token has no pair).
PAIR_EPS = 1e-6


class TokenOrthogonalityLoss(nn.Module):
    """Defaults: the reference's JUMP-CP (Cell Painting) run, gamma_s = 1, gamma_d = 4."""

    def __init__(self, same_weight: float = 1.0, cross_weight: float = 4.0):
        super().__init__()
        self.same_weight = same_weight
        self.cross_weight = cross_weight

    def forward(self, tokens: Tensor, channel_mask: Tensor | None) -> Tensor:
        """tokens (B, C, L, D): each channel's patch tokens; channel_mask (B, C) bool (True = the channel
        counts; None: all). Returns the scalar loss (mean over the B samples)."""
        B, C, L, _ = tokens.shape
        valid = (torch.ones(B, C, dtype=torch.bool, device=tokens.device) if channel_mask is None
                 else channel_mask).to(torch.float32)
        f = F.normalize(tokens.float(), dim=-1) * valid[:, :, None, None]
        per_channel = f.sum(dim=2)  # (B, C, D)
        within = (per_channel ** 2).sum(dim=-1)  # (B, C): sum over ordered pairs of one channel, i = j included
        counts = valid * L  # tokens per channel
        norms = (f ** 2).sum(dim=(-1, -2))  # (B, C): the i = j terms (1 per real token)
        same = (within - norms).sum(dim=1)
        same_pairs = (counts * (counts - 1)).sum(dim=1)
        cross = (per_channel.sum(dim=1) ** 2).sum(dim=-1) - within.sum(dim=1)
        cross_pairs = counts.sum(dim=1) ** 2 - (counts ** 2).sum(dim=1)
        loss = (self.same_weight * same / (same_pairs + PAIR_EPS)
                + self.cross_weight * cross / (cross_pairs + PAIR_EPS))
        return loss.mean()

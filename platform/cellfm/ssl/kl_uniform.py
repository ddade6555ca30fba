"""KL-to-uniform regulariser on the batch-mean prototype distribution (CellRep appendix A.1):
pushes the batch to use all prototypes, a guard against collapse onto a few of them."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class KLUniformLoss(nn.Module):
    """KL( m || Uniform(K) ) = sum_k m_k * log(m_k * K), with m the batch mean of the probabilities.

    0 when the batch spreads its mass evenly, log K when every sample puts all mass on one prototype.
    The mean is over the local batch: under DDP each rank regularises its own batch."""

    def forward(self, probs: Tensor) -> Tensor:
        """probs (N, K) rows summing to 1 -> scalar loss (fp32)."""
        if probs.ndim != 2:
            raise ValueError(f"probs must be (N, K), got shape {tuple(probs.shape)}")
        mean = probs.float().mean(dim=0)
        # 0 * log 0 = 0; clamping (rather than xlogy) also keeps the gradient finite at m_k = 0.
        log_mean = mean.clamp_min(torch.finfo(mean.dtype).tiny).log()
        return (mean * (log_mean + math.log(probs.shape[1]))).sum()

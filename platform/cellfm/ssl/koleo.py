"""KoLeo regulariser (Sablayrolles et al. 2019, used by DINOv2): the Kozachenko-Leonenko differential
entropy estimator on L2-normalised features; minimising it spreads a batch's features apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """-(1/B) sum_i log(d_i + eps), d_i = ||x_i - x_nn(i)|| the distance from the L2-normalised feature x_i to
    its nearest other feature in the (local) batch. Runs in fp32."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor) -> Tensor:
        """features (B, D), B >= 2 -> scalar."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeo needs (B, D) features with B >= 2, got shape {tuple(features.shape)}")
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            # For unit vectors the nearest neighbour is the largest inner product; exclude the point itself.
            dots = x @ x.t()
            dots.fill_diagonal_(-float("inf"))
            nearest = dots.argmax(dim=1)
        # eps inside the norm (as nn.PairwiseDistance) keeps the gradient finite for duplicate features.
        distances = (x - x[nearest] + self.eps).norm(dim=-1)
        return -torch.log(distances + self.eps).mean()

"""Supervised contrastive loss (Khosla et al. 2020, L_out form) for C3R's optional weak labels, e.g.
an antibody / protein id: features with the same label are pulled together, all others pushed apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SupConLoss(nn.Module):
    """For each anchor i with at least one positive (another sample with its label):

        l_i = -(1 / |P(i)|) sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

    on L2-normalised features z; the loss is the mean of l_i over anchors that have positives. Anchors
    without a positive are skipped (they still appear in other anchors' denominators); a batch with no
    positive pair at all gives 0 (connected to the graph). No base-temperature rescaling. Local batch only."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """features (N, D), labels (N,) integer ids -> scalar (fp32)."""
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f"need features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
        n = features.shape[0]
        z = F.normalize(features.float(), p=2, dim=-1)
        sim = z @ z.t() / self.temperature  # (N, N)
        self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
        log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
        positives = (labels[:, None] == labels[None, :]) & ~self_mask
        n_pos = positives.sum(dim=1)
        has_pos = n_pos > 0
        if not bool(has_pos.any()):
            return features.sum() * 0.0
        mean_log_prob_pos = (log_prob * positives).sum(dim=1)[has_pos] / n_pos[has_pos]
        return -mean_log_prob_pos.mean()


def label_ids(labels: list[str], device: torch.device | str | None = None) -> Tensor:
    """String labels -> (N,) int64 ids, equal strings sharing an id (order of first appearance)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(str(lab), len(index)) for lab in labels], dtype=torch.long, device=device)

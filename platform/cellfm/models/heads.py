"""DINO projection head: MLP to a bottleneck, L2-normalise, then cosine-similarity logits
against `out_dim` unit-norm prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from cellfm.models.layers import init_weights_trunc_normal


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1) -> Linear to bottleneck) -> L2 normalise -> weight-normalised
    Linear(bottleneck, out_dim, bias=False) whose row norms are fixed at 1 (the prototypes).

    `last_layer` is exposed so the trainer can zero its gradients during the first epoch (DINO's
    trick against early collapse)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3,
                 use_bn: bool = False):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            # use_bn (DINO's option): batch statistics remove the component all images share, so the
            # teacher's targets differ between images from the first step of a short run.
            def hidden(i: int) -> list[nn.Module]:
                return [nn.Linear(i, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]

            layers: list[nn.Module] = hidden(in_dim)
            for _ in range(nlayers - 2):
                layers += hidden(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(init_weights_trunc_normal)

        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0  # g, shape (out_dim, 1)
        magnitude.data.fill_(1.0)
        # A fixed g=1 makes the logits cosine similarities; a learnable g would let the head rescale them.
        magnitude.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_dim) -> (N, out_dim) logits, each in [-1, 1]."""
        z = self.mlp(x)
        # fp16 cannot represent 1e-12; eps must stay above its smallest normal.
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(z, dim=-1, p=2, eps=eps))

"""The feed-forward half of a transformer block."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    """Two-layer feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self.fc2(self.act(self.fc1(x)))

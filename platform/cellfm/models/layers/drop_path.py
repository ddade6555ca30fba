"""Stochastic depth: the residual branch of a block dropped per sample, with a linear rate schedule."""

from __future__ import annotations

from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> same shape; each sample's branch is zeroed with probability drop_prob,
        survivors are rescaled by 1 / keep_prob so the expectation is unchanged."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Linearly increasing stochastic-depth rates 0 .. rate over n blocks (plain floats: works on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]

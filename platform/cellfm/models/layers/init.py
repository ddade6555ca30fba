"""DINOv2's weight initialisation."""

from __future__ import annotations

from torch import nn


def init_weights_trunc_normal(module: nn.Module) -> None:
    """For use with `model.apply`: Linear weights ~ trunc normal(std .02), biases 0.
    Convs and norms keep their PyTorch defaults, as in DINOv2."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

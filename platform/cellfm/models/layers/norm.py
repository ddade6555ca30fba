"""The LayerNorm every backbone uses."""

from __future__ import annotations

from functools import partial

from torch import nn

# DINOv2 uses eps=1e-6 everywhere; the PyTorch default (1e-5) changes bf16 numerics slightly.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)

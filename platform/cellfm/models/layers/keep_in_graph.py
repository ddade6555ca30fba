"""Keeping parameters that one forward does not use in the autograd graph (for DDP)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def keep_in_graph(params: Iterable[nn.Parameter | None]) -> Tensor | float:
    """A scalar 0 that depends on every given trainable parameter. Added to an output, it keeps parameters that
    a particular forward does not use (mask_token without patch_mask, an absent-group token) in the autograd
    graph, so DDP with find_unused_parameters=False does not stall waiting for their gradients (which are 0).
    Plain 0.0 when no given parameter needs a gradient."""
    total = None
    for p in params:
        if p is None or not p.requires_grad:
            continue
        term = p.reshape(-1)[:1].sum()
        total = term if total is None else total + term
    return 0.0 if total is None else total * 0.0

"""Masked Context Distillation (C3R): the student sees only k of a sample's C1 context channels (k drawn
per sample from a configured set), the teacher sees them all, and concept channels are never dropped, so
the student learns to infer the missing context from what is left."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from cellfm.ssl.channel_sampling import check_valid_channels, keep_random_channels, uniform_counts

CONTEXT = "context"
CONCEPT = "concept"
GROUPS = (CONTEXT, CONCEPT)


def context_channel_mask(channel_names: Sequence[Sequence[str]], channel_groups: Mapping[str, str],
                         channel_mask: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """Per-sample channel names (B lists of C names) -> (B, C) bool, True = context channel, False = concept
    or padding (channel_mask (B, C) False: the name, "" from the pipeline, is not looked up).

    Raises ValueError naming the channel (and the known ones) when a real channel's name has no group, or a
    group is neither "context" nor "concept"."""
    if not channel_names:
        raise ValueError("channel_names is empty: MCD needs the channel names of every sample")
    widths = {len(names) for names in channel_names}
    if len(widths) != 1:
        raise ValueError(f"samples of one batch must have the same number of channels, got {sorted(widths)}")
    bad = sorted({g for g in channel_groups.values() if g not in GROUPS})
    if bad:
        raise ValueError(f"model.channel_groups values must be {GROUPS}, got {bad}")
    real = None if channel_mask is None else channel_mask.tolist()
    rows = []
    for b, names in enumerate(channel_names):
        names = [n if real is None or real[b][c] else None for c, n in enumerate(names)]
        missing = [n for n in names if n is not None and n not in channel_groups]
        if missing:
            raise ValueError(
                f"channel(s) {missing} have no group in model.channel_groups (known: {sorted(channel_groups)}); "
                f"add them as context or concept, e.g. model.channel_groups={{{missing[0]}: context, ...}}"
            )
        rows.append([n is not None and channel_groups[n] == CONTEXT for n in names])
    return torch.tensor(rows, dtype=torch.bool, device=device)


class MCDSampler:
    """Student channel mask for MCD. For each sample with C1 real context channels, draw k uniformly from
    `keep_counts` (empty: from {1, ..., C1}), clip it to C1, and keep k context channels chosen uniformly
    without replacement plus every real concept channel; padding is never kept. A sample with no context
    channel keeps every real channel. Draws are per real context channel
    (`cellfm.ssl.channel_sampling`), so padding does not change them."""

    def __init__(self, keep_counts: Sequence[int] = ()):
        counts = [int(k) for k in keep_counts]
        if any(k < 1 for k in counts):
            raise ValueError(f"MCD keep counts must be >= 1 (a sample must keep a context channel), got {counts}")
        self.keep_counts = counts

    def __call__(self, is_context: Tensor, valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """is_context (B, C) bool, valid (B, C) bool (True = real channel) -> keep (B, C) bool (True = the
        student sees the channel). Drawn on the generator's device (CPU by default), returned on
        is_context's device."""
        if is_context.ndim != 2 or is_context.dtype != torch.bool:
            raise ValueError(f"is_context must be a (B, C) bool tensor, got {is_context.dtype} {tuple(is_context.shape)}")
        check_valid_channels(valid)
        if valid.shape != is_context.shape:
            raise ValueError(f"channel mask {tuple(valid.shape)} does not match is_context {tuple(is_context.shape)}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        real = valid.to(gen_device)
        ctx = is_context.to(gen_device) & real
        n_context = ctx.sum(dim=1)  # (B,) = C1 per sample
        if self.keep_counts:
            u = torch.rand(ctx.shape[0], generator=generator, device=gen_device)
            choices = torch.tensor(self.keep_counts, device=gen_device)
            k = choices[(u * len(choices)).long().clamp_max(len(choices) - 1)]
        else:
            k = uniform_counts(n_context.clamp_min(1), generator)
        kept_context = keep_random_channels(ctx, torch.minimum(k, n_context), generator)
        keep = real & (~ctx | kept_context)
        return keep.to(is_context.device)

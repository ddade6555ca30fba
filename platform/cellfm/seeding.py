"""Seeds of every random draw, each a pure function of (train.seed, a named stream, and the draw's
position: epoch, rank, step, micro-batch or field). A run, a resumed run and a rerun therefore draw the
same numbers wherever they are, and no draw depends on how many draws came before it elsewhere (a
generator per draw site, never a process-wide one that carries state across epochs or restarts)."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """What a seed is for; streams never share numbers, even at the same (epoch, rank, step)."""

    BLOCK_ORDER = 1  # the epoch's order of read blocks (data.pipeline.dataset.epoch_shard)
    CHANNEL_PERMUTATION = 2  # a field's channel order in one epoch
    SHUFFLE_BUFFER = 3  # a rank's local shuffle buffer in one epoch
    CROPS = 4  # multi-crop boxes, flips, rotations, blur, intensity jitter of one micro-batch
    PATCH_MASKS = 5  # iBOT block masks of one micro-batch
    CHANNEL_SAMPLING = 6  # MCD / hierarchical channel sampling of one micro-batch
    FIELD_ORDER = 7  # single-process recipes that hold fields in memory (benchmarks/demo_recipe.py)


def derive_seed(seed: int, stream: Stream, *position: int) -> int:
    """A 63-bit seed from (seed, stream, position...) through numpy's SeedSequence: well mixed, so nearby
    positions give unrelated seeds. All parts must be >= 0."""
    parts = [int(seed), int(stream), *(int(p) for p in position)]
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be >= 0, got {parts}")
    high, low = np.random.SeedSequence(parts).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) >> 1


def numpy_rng(seed: int, stream: Stream, *position: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *position))


def torch_generator(seed: int, stream: Stream, *position: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *position))

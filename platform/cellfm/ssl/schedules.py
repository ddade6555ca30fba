"""Per-step hyperparameter schedules (learning rate, weight decay, teacher momentum/temperature)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """Per-step values, length total_steps: `freeze_steps` zeros, then a linear warmup from
    start_warmup_value towards base_value over `warmup_steps` (base itself is reached on the first
    cosine step), then a half cosine from base_value that lands exactly on final_value at the last step."""
    if min(total_steps, warmup_steps, freeze_steps) < 0:
        raise ValueError("step counts must be non-negative")
    cosine_steps = total_steps - freeze_steps - warmup_steps
    if cosine_steps < 0:
        raise ValueError(
            f"freeze_steps ({freeze_steps}) + warmup_steps ({warmup_steps}) exceed total_steps ({total_steps})"
        )
    freeze = np.zeros(freeze_steps)
    warmup = start_warmup_value + (base_value - start_warmup_value) * np.arange(warmup_steps) / max(warmup_steps, 1)
    # Divide by (n - 1) so the final step is final_value; a single step is already "the end".
    progress = np.arange(cosine_steps) / (cosine_steps - 1) if cosine_steps > 1 else np.ones(cosine_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([freeze, warmup, cosine]).astype(np.float64)

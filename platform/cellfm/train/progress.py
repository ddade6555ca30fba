"""Training progress lines a person reads: where the run is (epoch, step), how it goes (loss), how fast
(images/s, the fraction of time spent waiting for data) and when it ends (ETA).

    [cellfm] epoch 2/12 step 14/120 loss 3.9121 | 48.2 images/s, data wait 7% | lr 1.31e-03 | ETA 5m12s

Images/s is measured since the previous line; the ETA from the rate since this process started
training (a resumed run counts only its own steps), so it settles after the first few lines.
"""

from __future__ import annotations

import time
from typing import Callable

from cellfm.progress import eta_seconds, format_duration


class TrainingProgress:
    """Formats one progress line per call; `first_step` is the global step training starts from
    (non-zero when resumed), `images_per_step` the global batch of one optimizer step."""

    def __init__(self, total_steps: int, images_per_step: int, first_step: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.clock = clock
        self.first_step = first_step
        self.started = clock()
        self._last_step, self._last_time = first_step, self.started

    def line(self, *, epoch: int, epochs: int, step: int, loss: float, data_wait_fraction: float,
             images_per_s: float | None = None, **values: float) -> str:
        """`step`: optimizer steps done in all (1-based); `epoch`: 0-based; `images_per_s`: a measured
        rate (default: since the previous line); `values`: more numbers to show (lr=..., ...)."""
        now = self.clock()
        if images_per_s is None:
            window = max(now - self._last_time, 1e-9)
            images_per_s = (step - self._last_step) * self.images_per_step / window
        self._last_step, self._last_time = step, now
        extra = " ".join(f"{name} {_number(value)}" for name, value in values.items())
        return (f"epoch {epoch + 1}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} | "
                f"{images_per_s:.1f} images/s, data wait {data_wait_fraction:.0%}"
                + (f" | {extra}" if extra else "") + f" | ETA {format_duration(self.eta_s(step, now))}")

    def eta_s(self, step: int, now: float | None = None) -> float:
        """Seconds left at the average rate of this process's steps so far (0 when done)."""
        now = self.clock() if now is None else now
        return eta_seconds(step - self.first_step, self.total_steps - self.first_step, now - self.started)


def _number(value: float) -> str:
    return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.3f}"

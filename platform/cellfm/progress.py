"""Progress lines of long work (training, ingestion, embedding, sweeps): the line itself, durations and ETAs."""

from __future__ import annotations

import sys


def log_line(message: str) -> None:
    """One `[cellfm] ...` line to stdout, flushed. Not `print` (inside Ray Train V2 workers print is patched to
    also log, so every line would show up twice) and not logging (Ray forwards a worker's stdout to the driver)."""
    sys.stdout.write(f"[cellfm] {message}\n")
    sys.stdout.flush()


def eta_seconds(done: int, total: int, elapsed_s: float) -> float:
    """Seconds left for `total` items at the average rate of the `done` ones so far (0 when finished,
    inf before the first)."""
    if done >= total:
        return 0.0
    if done <= 0:
        return float("inf")
    return (total - done) * elapsed_s / done


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m (unknown: ?)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"

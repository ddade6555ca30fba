"""Durations and ETAs for the progress lines of long work (training, ingestion, embedding)."""

from __future__ import annotations


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

"""Counting a field stream: the ``PipelineMonitor`` actor every read task of a dataset reports to (fields,
bytes, bad fields; progress and per-pass summaries logged), its driver-side handle, and the error a bad
field raises."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cellfm.config import DataConfig
from cellfm.data.pipeline.layout import MB
from cellfm.data.plate import PlateError
from cellfm.progress import log_line


class BadFieldError(PlateError):
    """A field could not be read (policy ``fail``), or too many fields were bad (policy ``skip``)."""



class PipelineMonitor:
    """Ray actor (0 CPUs) shared by every read task of one dataset: counts fields and bytes, records
    bad fields by (plate, well, field) (a retried task is not counted twice), logs progress every
    ``interval_s`` seconds and a summary at the end of every pass over the dataset."""

    def __init__(self, total_fields: int, max_bad: int, interval_s: float, name: str = "fields"):
        self.total = total_fields
        self.max_bad = max_bad
        self.interval_s = interval_s
        self.name = name
        self.fields = 0
        self.bytes = 0
        self.bad: dict[tuple[str, str, int], str] = {}
        self.bad_events = 0
        self.t0 = self.t_last = time.monotonic()
        self.fields_last = self.bytes_last = 0
        self.passes = 0

    def record(self, n_fields: int, n_bytes: int, bad: list[dict] | None = None) -> int:
        """Count one task's output; returns the number of distinct bad fields so far."""
        self.fields += n_fields
        self.bytes += n_bytes
        for item in bad or []:
            key = (item["plate"], item["well"], int(item["field"]))
            self.bad_events += 1
            if key not in self.bad:
                self.bad[key] = item["error"]
                log_line(f"data: skipped bad field {len(self.bad)}/{self.max_bad} allowed: {item['error']}")
        now = time.monotonic()
        if self.interval_s > 0 and now - self.t_last >= self.interval_s:
            dt = now - self.t_last
            log_line(f"data ({self.name}): {self.fields} fields read, {(self.fields - self.fields_last) / dt:.1f} fields/s, "
                 f"{(self.bytes - self.bytes_last) / dt / MB:.1f} MB/s over the last {dt:.0f} s; "
                 f"{len(self.bad)} bad field(s) skipped")
            self.t_last, self.fields_last, self.bytes_last = now, self.fields, self.bytes
        seen = self.fields + self.bad_events
        if self.total and seen // self.total > self.passes:
            self.passes = seen // self.total
            log_line(self._summary_line())
        return len(self.bad)

    def _summary_line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        text = (f"data ({self.name}): pass {self.passes} done, {self.fields} fields in {elapsed:.0f} s "
                f"({self.fields / elapsed:.1f} fields/s, {self.bytes / elapsed / MB:.1f} MB/s), "
                f"{len(self.bad)} bad field(s) skipped of {self.total}")
        if self.bad:
            text += ": " + "; ".join(f"{p} {w} field {f}" for p, w, f in list(self.bad)[:20])
        return text

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return {
            "fields": self.fields, "bytes": self.bytes, "seconds": elapsed,
            "fields_per_s": self.fields / elapsed, "mb_per_s": self.bytes / elapsed / MB,
            "total_fields": self.total, "max_bad_fields": self.max_bad,
            "bad_fields": [{"plate": p, "well": w, "field": f, "error": e} for (p, w, f), e in self.bad.items()],
        }


class DataMonitor:
    """Driver-side handle on a dataset's ``PipelineMonitor`` actor (Ray actor handles pickle, so the
    same handle may be passed to Ray Train workers). ``max_bad``: the most bad fields allowed;
    ``total``: the distinct fields monitored."""

    def __init__(self, actor, max_bad: int, total: int):
        self.actor = actor
        self.max_bad = max_bad
        self.total = total

    def summary(self) -> dict[str, Any]:
        """Fields and bytes read, rates, and the bad fields skipped (plate, well, field, error)."""
        import ray

        return ray.get(self.actor.summary.remote())

    def check(self) -> dict[str, Any]:
        """The summary, after raising ``BadFieldError`` if more fields were bad than allowed."""
        summary = self.summary()
        bad = summary["bad_fields"]
        if len(bad) > summary["max_bad_fields"]:
            raise BadFieldError(too_many_bad_message(len(bad), summary["total_fields"], summary["max_bad_fields"], bad))
        return summary


def too_many_bad_message(n_bad: int, total: int, max_bad: int, bad: list[dict]) -> str:
    shown = "; ".join(b["error"] for b in bad[:5])
    return (f"{n_bad} of {total} fields are unreadable, more than data.max_bad_fraction allows ({max_bad}): "
            f"{shown}{' ...' if len(bad) > 5 else ''}")


def create_monitor(cfg: DataConfig, total_fields: int, name: str = "fields",
                   fields_per_pass: int | None = None) -> DataMonitor | None:
    """The ``PipelineMonitor`` actor of a stream of ``total_fields`` distinct fields (``fields_per_pass``
    read per pass, default all of them), or None when neither bad-field skipping nor progress logs need
    one. One monitor may serve several streams (every rank's shard of a training run)."""
    import ray

    if cfg.bad_field_policy != "skip" and cfg.progress_interval_s <= 0:
        return None
    max_bad = int(np.floor(cfg.max_bad_fraction * total_fields)) if cfg.bad_field_policy == "skip" else 0
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(PipelineMonitor)
    return DataMonitor(actor_cls.remote(fields_per_pass or total_fields, max_bad, cfg.progress_interval_s, name),
                       max_bad, total_fields)


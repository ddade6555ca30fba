"""The training fields held in Ray's object store (``data.cache_fields``): read and normalized once by
``fill_field_cache``, then every epoch's stream takes its fields from there instead of the plates, bit
for bit the same rows."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellfm.config import DataConfig
from cellfm.data.pipeline.layout import (CHANNEL_SEPARATOR, FIELD_INDEX, MB, PAD_CHANNEL_NAME, check_pipeline_config,
                                         field_table, read_block_columns, stream_layout)
from cellfm.data.pipeline.loader import FieldLoader
from cellfm.data.pipeline.monitor import DataMonitor
from cellfm.data.plate import PlateError
from cellfm.progress import log_line

@dataclass(frozen=True)
class FieldCache:
    """A training manifest's normalized fields held in Ray's object store (``data.cache_fields``), read
    once by ``fill_field_cache``: every epoch's stream then takes its fields from here instead of the plates.

    ``blocks``: one object per read block of the manifest (``read_blocks``: never spanning plates), the
    loader's output for it with channels in manifest order (no permutation; padded to the largest channel
    count); ``where``: a field's index label -> (block, row in block); a field that could not be read is
    absent (with ``data.bad_field_policy=skip`` it stays skipped, counted once). The driver owns the objects:
    they live as long as it holds this cache."""

    blocks: tuple
    where: dict[int, tuple[int, int]]
    nbytes: int
    # This process's blocks fetched so far (read-only views of the object store): a process that takes
    # fields from the cache every epoch (a training worker) asks the object store for each block once.
    _fetched: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def fetch(self, field_indices: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """The cached blocks holding these fields (zero-copy views of the object store), by block number."""
        import ray

        numbers = sorted({self.where[int(i)][0] for i in field_indices if int(i) in self.where})
        missing = [b for b in numbers if b not in self._fetched]
        self._fetched.update(zip(missing, ray.get([self.blocks[b] for b in missing])))
        return {b: self._fetched[b] for b in numbers}

    def __getstate__(self) -> dict:
        # Another process fetches for itself: views of this one's object store mappings do not travel.
        return {**self.__dict__, "_fetched": {}}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "__dict__", state)

    def field(self, field_index: int, blocks: dict[int, dict[str, np.ndarray]], row: dict) -> tuple[np.ndarray, list[str]]:
        """One field's cached (C_padded, H, W) image and channel names in manifest order, from ``fetch``ed
        blocks; a field the filling pass could not read raises ``PlateError`` naming it."""
        if field_index not in self.where:
            raise PlateError(f"plate {row['plate']} well {row['well']} field {row['field']}: unreadable when "
                             f"data.cache_fields read the training fields")
        block, position = self.where[field_index]
        data = blocks[block]
        names = str(data["channel_names"][position]).split(CHANNEL_SEPARATOR)
        return data["image"][position], [name for name in names if name != PAD_CHANNEL_NAME]


def cache_size_mb(manifest: pd.DataFrame, cfg: DataConfig) -> float:
    """The object-store megabytes ``fill_field_cache`` would hold for ``manifest`` (checked at the edge
    against ``data.cache_max_mb``)."""
    layout = stream_layout(manifest, _cache_config(cfg))
    return len(manifest) * layout.channels * layout.height * layout.width * np.dtype(layout.dtype).itemsize / MB


def field_cache_problem(manifest: pd.DataFrame, cfg: DataConfig, source: str) -> str | None:
    """The line refusing ``data.cache_fields`` for ``manifest`` (named ``source``) when its cache would
    exceed ``data.cache_max_mb``, else None."""
    if not cfg.cache_fields or (size := cache_size_mb(manifest, cfg)) <= cfg.cache_max_mb:
        return None
    return (f"data.cache_fields: the {len(manifest)} training fields of {source} need {size:.0f} MB of object "
            f"store, more than data.cache_max_mb={cfg.cache_max_mb}; raise the limit or set data.cache_fields=false")


def _cache_config(cfg: DataConfig) -> DataConfig:
    """The cache stores fields padded to the largest channel count, whatever the mode: a field is
    then taken out with its own channel count in either mode."""
    return dataclasses.replace(cfg, mixed_channels="pad", pad_channels_to=0)


def _load_block(loader: FieldLoader, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    out = loader(batch)
    return out[FIELD_INDEX], out


def fill_field_cache(manifest: pd.DataFrame, cfg: DataConfig, *, monitor: DataMonitor | None = None) -> FieldCache:
    """Read and normalize every field of the training ``manifest`` once, as Ray tasks (one per read
    block, ``data.read_cpus`` each), into a ``FieldCache`` owned by the caller. Bad fields follow
    ``data.bad_field_policy`` (counted in ``monitor``) and stay out of the cache."""
    import ray

    cache_cfg = _cache_config(cfg)
    table = field_table(manifest, [])
    loader = FieldLoader(cache_cfg, permute_channels=False, keep_columns=[FIELD_INDEX],
                         layout=check_pipeline_config(manifest, cache_cfg),
                         monitor=monitor.actor if monitor else None, max_bad=monitor.max_bad if monitor else 0,
                         total=monitor.total if monitor else len(table))
    # "DEFAULT": never inside the caller's placement group. A sweep trial's driver runs in one of 0.01 CPU that
    # captures its child tasks, where a read task could not fit; reads use the CPUs kept free for Ray Data.
    read = ray.remote(num_cpus=cfg.read_cpus, num_returns=2, scheduling_strategy="DEFAULT")(_load_block)
    started = time.monotonic()
    refs = [read.remote(loader, block) for block in read_block_columns(table, cfg)]
    indices = ray.get([index for index, _ in refs])
    where = {int(i): (b, position) for b, block in enumerate(indices) for position, i in enumerate(block)}
    blocks = tuple(out for _, out in refs)
    ray.wait(list(blocks), num_returns=len(blocks), fetch_local=False)
    nbytes = int(cache_size_mb(manifest, cfg) * MB)
    log_line(f"data: {len(where)} of {len(table)} training fields cached in Ray's object store "
         f"({nbytes / MB:.0f} MB) in {time.monotonic() - started:.0f} s; every epoch reads them from there")
    return FieldCache(blocks, where, nbytes)


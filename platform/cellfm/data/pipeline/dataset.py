"""Field streams as Ray Datasets: manifests in (``load_manifests``), each training epoch's order and each
rank's share of it (``epoch_shard``), and the streaming dataset of normalized fields
(``build_field_pipeline``) under a bounded object-store budget and number of read tasks, in the
manifest's order."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from cellfm.config import DataConfig
from cellfm.data.cells import CELLS_X, CELLS_Y, cells_per_field, with_cell_locations
from cellfm.data.manifest import check_manifest_against_plates, read_manifest
from cellfm.data.pipeline.cache import FieldCache
from cellfm.data.pipeline.layout import MB, check_pipeline_config, field_table, read_block_columns, read_blocks
from cellfm.data.pipeline.loader import FieldLoader
from cellfm.data.pipeline.monitor import DataMonitor, create_monitor
from cellfm.seeding import Stream, numpy_rng

def load_manifests(paths: Sequence[str], check_plates: bool = True, storage_options: dict | None = None) -> pd.DataFrame:
    """Read and concatenate manifests (local or ``s3://``); optionally verify every named channel
    exists in its plate.

    Checking at the edge (the driver) turns a mislabelled plate into one clear error before any
    worker starts, instead of a failure deep inside a streaming read.
    """
    frames = []
    for path in paths:
        path = str(path)
        df = read_manifest(path, storage_options=storage_options)
        # Relative store URIs are relative to the manifest's folder, so a screen can be moved.
        if "://" in path and not path.startswith("file://"):
            base = posixpath.dirname(path)
            df["store_uri"] = [u if "://" in u or u.startswith("/") else f"{base}/{u}" for u in df["store_uri"]]
        else:
            local = Path(path.removeprefix("file://")).resolve().parent
            df["store_uri"] = [u if "://" in u or Path(u).is_absolute() else str(local / u) for u in df["store_uri"]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if check_plates:
        check_manifest_against_plates(df, storage_options=storage_options)
    return df


@dataclass
class FieldPipeline:
    """A streaming field dataset and the monitor counting its fields (None when nothing is monitored).
    ``channels``: the padded channel count (``mixed_channels=pad``) or the largest one (``group``)."""

    dataset: Any
    monitor: DataMonitor | None
    channels: int
    field_shape: tuple[int, int]


def _execution_options(cfg: DataConfig):
    """Ray Data ExecutionOptions of a field stream: rows in the order of its manifest (a fixed order,
    whatever the timing of the read tasks) and, with ``data.object_store_limit_mb``, a bounded
    object-store budget."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    options = ExecutionOptions(resource_limits=DataContext.get_current().execution_options.resource_limits,
                               preserve_order=True)
    if cfg.object_store_limit_mb > 0:
        options.resource_limits = options.resource_limits.copy(object_store_memory=cfg.object_store_limit_mb * MB)
    return options


def epoch_shard(manifest: pd.DataFrame, cfg: DataConfig, *, seed: int, epoch: int, rank: int,
                world_size: int) -> pd.DataFrame:
    """The fields rank ``rank`` of ``world_size`` trains on in ``epoch``, in the order it reads them: the
    manifest's read blocks (``read_blocks``; with ``mixed_channels=group``, after sorting by channel
    count) in an order drawn from (seed, epoch), flattened, then cut into ``world_size`` equal contiguous
    shares of ``len(manifest) // world_size`` fields (the epoch's last few fields wait for another epoch).
    Keeps the manifest's index labels (``FIELD_INDEX``). Equal shares: every rank runs the same number of
    steps, as DDP needs."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} workers")
    table = manifest
    if cfg.mixed_channels == "group":
        table = manifest.iloc[np.argsort(manifest["channel_names"].map(len).to_numpy(), kind="stable")]
    blocks = read_blocks(table, cfg)
    order = numpy_rng(seed, Stream.BLOCK_ORDER, epoch).permutation(len(blocks))
    shuffled = pd.concat([blocks[i] for i in order])
    share = len(manifest) // world_size
    if share == 0:
        raise ValueError(f"{len(manifest)} fields cannot be shared among {world_size} workers")
    return shuffled.iloc[rank * share:(rank + 1) * share]


def samples_per_rank(manifest: pd.DataFrame, cfg: DataConfig, *, seed: int, epochs: int, world_size: int) -> int:
    """The fewest samples a rank streams in an epoch: ``len(manifest) // world_size`` fields, or with
    ``data.crop_mode=cells`` (centres attached: ``with_cell_locations``) the fewest cells of any rank's
    ``epoch_shard`` in any of ``epochs`` epochs, so every rank can run that many steps every epoch."""
    if cfg.crop_mode != "cells":
        return len(manifest) // world_size
    counts = pd.Series(cells_per_field(manifest), index=manifest.index)
    return min(int(counts.loc[epoch_shard(manifest, cfg, seed=seed, epoch=epoch, rank=rank,
                                          world_size=world_size).index].sum())
               for epoch in range(epochs) for rank in range(world_size))


@dataclass
class _FieldReads:
    """What a field stream reads and how: the field table (one row per field, ``keep_columns`` and, with
    ``data.crop_mode=cells``, each field's cell centres along), the ``FieldLoader``'s arguments and the output
    shape."""

    table: pd.DataFrame
    loader_kwargs: dict[str, Any]
    channels: int
    field_shape: tuple[int, int]


def _field_reads(manifest: pd.DataFrame, cfg: DataConfig, *, training: bool, keep_columns: Sequence[str], seed: int,
                 epoch: int, monitor: DataMonitor | None, cache: FieldCache | None) -> _FieldReads:
    eval_cfg = cfg
    if not training and cfg.transfer_dtype == "uint8":
        # Evaluation consumers (batch inference) expect float images: keep float16 there.
        import dataclasses

        eval_cfg = dataclasses.replace(cfg, transfer_dtype="float16")
    layout = check_pipeline_config(manifest, eval_cfg)
    cells = cfg.crop_mode == "cells"
    if cells:  # each field's centres travel with it to the read task that crops them
        manifest = with_cell_locations(manifest, cfg)
        keep_columns = [*keep_columns, CELLS_Y, CELLS_X]
    table = field_table(manifest, keep_columns)
    loader_kwargs = dict(cfg=eval_cfg, permute_channels=training and cfg.channel_permutation,
                         keep_columns=keep_columns, layout=layout, monitor=monitor.actor if monitor else None,
                         max_bad=monitor.max_bad if monitor else 0, total=monitor.total if monitor else len(table),
                         seed=seed, epoch=epoch, cache=cache, cell_crop_size=cfg.cell_crop_size if cells else 0)
    shape = (cfg.cell_crop_size, cfg.cell_crop_size) if cells else (layout.height, layout.width)
    return _FieldReads(table, loader_kwargs, layout.channels, shape)


def build_field_pipeline(
    manifest: pd.DataFrame,
    cfg: DataConfig,
    *,
    training: bool,
    keep_columns: Sequence[str] = (),
    seed: int = 0,
    epoch: int = 0,
    name: str = "fields",
    monitor: DataMonitor | None = None,
) -> FieldPipeline:
    """A streaming Ray Dataset of normalized fields for the rows of ``manifest`` (one or several
    manifests concatenated by ``load_manifests``: several plates, sources, channel counts; or one rank's
    ``epoch_shard``), in the manifest's order.

    training=True permutes channels per field (if ``data.channel_permutation``), seeded by (seed, epoch,
    the row's index label); evaluation keeps channel order and carries ``keep_columns`` along.
    ``monitor``: an existing monitor to report to (default: a new one, when one is needed). Cached training
    fields (``data.cache_fields``) go through ``training_epoch_blocks`` instead.
    """
    import ray.data

    if monitor is None:
        monitor = create_monitor(cfg, len(manifest), name)
    reads = _field_reads(manifest, cfg, training=training, keep_columns=keep_columns, seed=seed, epoch=epoch,
                         monitor=monitor, cache=None)
    # One block per few consecutive fields (same plate: read locality) so reads spread over tasks and
    # memory stays bounded. (Split here: Ray 2.60's own `override_num_blocks` split breaks on pandas 3 frames.)
    # Blocks never span two plates, so a plate's blocks are the same whatever else is read (batch
    # inference embeds a block as one batch: its numbers do not depend on the other plates of a run).
    ds = ray.data.from_pandas(read_blocks(reads.table, cfg))
    kwargs: dict[str, Any] = {}
    if cfg.read_actors > 0:
        # Two blocks queued per actor: the next block is already there when one finishes.
        kwargs.update(compute=ray.data.ActorPoolStrategy(size=cfg.read_actors, max_tasks_in_flight_per_actor=2),
                      fn_constructor_kwargs=reads.loader_kwargs)
        loader = FieldLoader
    else:
        loader = FieldLoader(**reads.loader_kwargs)
        if cfg.read_concurrency > 0:
            kwargs["compute"] = ray.data.TaskPoolStrategy(size=cfg.read_concurrency)
    # batch_size=None hands each block to the loader as it is: a batch of `read_batch_size` rows could
    # otherwise span two blocks of different channel counts.
    ds = ds.map_batches(loader, batch_size=None if cfg.mixed_channels == "group" else max(1, cfg.read_batch_size),
                        num_cpus=cfg.read_cpus, batch_format="numpy", **kwargs)
    ds.context.execution_options = _execution_options(cfg)
    return FieldPipeline(ds, monitor, reads.channels, reads.field_shape)


def training_epoch_blocks(shard: pd.DataFrame, cfg: DataConfig, *, keep_columns: Sequence[str] = (), seed: int,
                          epoch: int, monitor: DataMonitor | None = None, cache: FieldCache | None = None
                          ) -> Iterator[dict[str, np.ndarray]]:
    """A rank's training fields of ``epoch`` (its ``epoch_shard``) as blocks of rows (numpy column dicts) in
    the shard's order, for ``iter_training_batches``.

    Read from the plates, they stream through ``build_field_pipeline``'s Ray Dataset. From a ``FieldCache``
    (``data.cache_fields``), this process runs the same ``FieldLoader`` over the same read blocks: the cache
    already holds the normalized fields, so what is left per field (its channel permutation, a copy) is cheaper
    than a Ray Data execution per epoch, whose scheduling thread would share this training process's cores
    and whose read tasks start worker processes (measured: benchmarks/train_throughput.py). The rows are the
    same bit for bit either way."""
    if cache is None:
        stream = build_field_pipeline(shard, cfg, training=True, keep_columns=keep_columns, seed=seed, epoch=epoch,
                                      monitor=monitor).dataset
        # batch_size=None: the blocks as the read tasks made them; iter_training_batches shuffles and batches rows.
        yield from stream.iter_batches(batch_size=None, batch_format="numpy")
        return
    # Fields the filling pass could not read were skipped and counted there (data.bad_field_policy=skip): what
    # is left needs no monitor, and no call to its actor per block.
    shard = shard[[int(i) in cache.where for i in shard.index]]
    reads = _field_reads(shard, cfg, training=True, keep_columns=keep_columns, seed=seed, epoch=epoch, monitor=None,
                         cache=cache)
    loader = FieldLoader(**reads.loader_kwargs)
    for block in read_block_columns(reads.table, cfg):
        yield loader(block)


def build_field_dataset(
    manifest: pd.DataFrame,
    cfg: DataConfig,
    *,
    training: bool,
    keep_columns: Sequence[str] = (),
    seed: int = 0,
    epoch: int = 0,
):
    """``build_field_pipeline(...).dataset`` (the monitor actor lives as long as the dataset: the
    read tasks hold its handle, and it logs progress and a summary per pass by itself)."""
    return build_field_pipeline(manifest, cfg, training=training, keep_columns=keep_columns, seed=seed,
                                epoch=epoch).dataset


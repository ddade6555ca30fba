"""Ray Data pipeline: manifest rows -> field reads -> per-channel normalization -> (training) random
channel permutation -> fields padded to one channel count with a channel mask, or grouped by
channel count -> batches.

- Determinism: a training epoch's order is built here, not left to Ray Data: ``epoch_shard`` permutes
  the manifest's read blocks with a seed of (``train.seed``, epoch) and gives each rank its own equal,
  contiguous share; each rank streams its share in that order (``preserve_order``), its local shuffle
  buffer seeded by (seed, epoch, rank), and a field's channel permutation is seeded by (seed, epoch,
  field). So the fields, their order and their channel orders are a function of (seed, epoch, rank,
  worker count), whatever the timing of the read tasks. Evaluation streams keep the manifest's order.

- Read locality: a read task reads whole fields (one Zarr shard each, all channels) for a block of
  consecutive manifest rows (same plate), optionally through the Rust ``zarrs`` codec pipeline; a
  ``data.field_size`` centre crop reads only the tiles it covers.
- Read and normalize are fused in one task, so only the normalized float16 (or uint8) field crosses
  Ray's object store (the raw read never does), and nothing is materialized: the dataset streams
  under a bounded object-store budget and a bounded number of read tasks, whatever the number of plates.
- Mixed channel counts (e.g. 5-, 4- and 1-channel plates in one run), ``data.mixed_channels``:
  ``pad`` zero-pads every field to ``data.pad_channels_to`` channels, ``channel_mask`` (True = real
  channel) and ``channel_names`` (``""`` for padding) travelling with it; ``group`` pads nothing:
  read blocks hold one channel count each and the trainer's batches are regrouped by channel count.
  Different field sizes: ``data.field_size`` crop or resize.
- Bad fields: ``data.bad_field_policy`` ``fail`` raises ``BadFieldError`` naming plate/well/field;
  ``skip`` drops the field, counts it in a ``PipelineMonitor`` actor (which also logs progress:
  fields/s and MB/s) and fails once more than ``data.max_bad_fraction`` of the fields are bad.
"""

from __future__ import annotations

import posixpath
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from cellfm.config import ConfigError, DataConfig, data_config_problems
from cellfm.data.batch import FieldBatch
from cellfm.data.cells import CELLS_X, CELLS_Y, cell_crop_batch, cells_per_field, with_cell_locations
from cellfm.data.layout import field_layout_problems
from cellfm.data.manifest import check_manifest_against_plates, read_manifest
from cellfm.data.normalize import normalize_field, quantize_unit
from cellfm.data.plate import PlateError, read_field
from cellfm.seeding import Stream, numpy_rng

# Manifest columns a read task needs; the rest travel as metadata only when asked for.
_READ_COLUMNS = ["plate", "well", "row", "col", "field", "store_uri", "channel_names", "height", "width"]
# Read when the manifest has it: the array's channel names where a plate's omero labels are missing or renamed.
_LABELS_COLUMN = "channel_labels"
# A field's position in the training manifest (its index label): what its channel permutation is seeded by.
FIELD_INDEX = "field_index"
CHANNEL_SEPARATOR = ","
PAD_CHANNEL_NAME = ""
_MB = 1024 * 1024


class BadFieldError(PlateError):
    """A field could not be read (policy ``fail``), or too many fields were bad (policy ``skip``)."""


def _log(message: str) -> None:
    # Not print/logging: one plain line to stdout, forwarded to the driver by Ray (log_to_driver).
    sys.stdout.write(f"[cellfm] {message}\n")
    sys.stdout.flush()


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


# ---------------------------------------------------------------------------------------- monitor


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
                _log(f"data: skipped bad field {len(self.bad)}/{self.max_bad} allowed: {item['error']}")
        now = time.monotonic()
        if self.interval_s > 0 and now - self.t_last >= self.interval_s:
            dt = now - self.t_last
            _log(f"data ({self.name}): {self.fields} fields read, {(self.fields - self.fields_last) / dt:.1f} fields/s, "
                 f"{(self.bytes - self.bytes_last) / dt / _MB:.1f} MB/s over the last {dt:.0f} s; "
                 f"{len(self.bad)} bad field(s) skipped")
            self.t_last, self.fields_last, self.bytes_last = now, self.fields, self.bytes
        seen = self.fields + self.bad_events
        if self.total and seen // self.total > self.passes:
            self.passes = seen // self.total
            _log(self._summary_line())
        return len(self.bad)

    def _summary_line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        text = (f"data ({self.name}): pass {self.passes} done, {self.fields} fields in {elapsed:.0f} s "
                f"({self.fields / elapsed:.1f} fields/s, {self.bytes / elapsed / _MB:.1f} MB/s), "
                f"{len(self.bad)} bad field(s) skipped of {self.total}")
        if self.bad:
            text += ": " + "; ".join(f"{p} {w} field {f}" for p, w, f in list(self.bad)[:20])
        return text

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        return {
            "fields": self.fields, "bytes": self.bytes, "seconds": elapsed,
            "fields_per_s": self.fields / elapsed, "mb_per_s": self.bytes / elapsed / _MB,
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
            raise BadFieldError(_too_many_bad_message(len(bad), summary["total_fields"], summary["max_bad_fields"], bad))
        return summary


def _too_many_bad_message(n_bad: int, total: int, max_bad: int, bad: list[dict]) -> str:
    shown = "; ".join(b["error"] for b in bad[:5])
    return (f"{n_bad} of {total} fields are unreadable, more than data.max_bad_fraction allows ({max_bad}): "
            f"{shown}{' ...' if len(bad) > 5 else ''}")


# ---------------------------------------------------------------------------------------- loader

_ZARRS_SET: bool | None = None


def _ensure_codec_pipeline(use_zarrs: bool) -> None:
    """Select zarr's codec pipeline once per worker process (zarr's config is process-global)."""
    global _ZARRS_SET
    if _ZARRS_SET is use_zarrs:
        return
    from cellfm.data.plate import use_zarrs as select

    active = select(use_zarrs)
    if use_zarrs and not active:
        _log("data.use_zarrs=true but zarrs is not installed (pip install 'cellfm[zarrs]'); using zarr's pipeline")
    _ZARRS_SET = use_zarrs


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float -> (C, height, width), bilinear with antialiasing when shrinking."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out[0].numpy()


@dataclass(frozen=True)
class _Layout:
    """What every output row looks like: padded channel count, field size, transfer dtype."""

    channels: int
    height: int
    width: int
    dtype: str  # float16 | uint8 | a raw stored dtype (normalization "none")


class FieldLoader:
    """Ray Data batch UDF: reads each field of a batch of manifest rows and normalizes it.

    Output batch: ``image`` (N, C, H, W) in ``layout.dtype`` (float16 [0, 1] by default; C = the
    padded count, padded channels zero, or with ``mixed_channels=group`` the block's one channel
    count), ``channel_mask`` (N, C) bool, ``channel_names`` (N,) comma-joined names in the
    image's channel order (after permutation, when enabled; ``""`` for padding), plus ``keep_columns``.
    With ``permute_channels``, a field's channel order is drawn from (``seed``, ``epoch``, its
    ``field_index``): the same in every rerun, a new one every epoch. With a ``cache`` (``FieldCache``)
    the normalized fields come from Ray's object store instead of the plates, bit for bit the same rows.
    With ``cell_crop_size`` (``data.crop_mode=cells``) each field leaves as one row per cell centre of its
    CELLS_Y / CELLS_X columns (``cellfm.data.cells.cell_crop_batch``), after normalization and permutation.
    """

    def __init__(self, cfg: DataConfig, permute_channels: bool, keep_columns: Sequence[str] = (),
                 layout: _Layout | None = None, monitor=None, max_bad: int = 0, total: int = 0,
                 seed: int = 0, epoch: int = 0, cache: "FieldCache | None" = None, cell_crop_size: int = 0):
        self.cfg = cfg
        self.cell_crop_size = cell_crop_size
        self.cache = cache
        self._cached_blocks: dict[int, dict[str, np.ndarray]] = {}
        self.permute_channels = permute_channels
        self.seed = seed
        self.epoch = epoch
        self.keep_columns = list(keep_columns)
        self.layout = layout
        self.monitor = monitor
        self.max_bad = max_bad
        self.total = total

    def _read_into(self, row: dict, out: np.ndarray, field_index: int) -> list[str]:
        """Read one field and write it, normalized, into ``out`` (this sample's slot of the batch:
        (C_padded, H, W) in the transfer dtype); returns its channel names in the order written.

        Channels are permuted (``permute_channels``) by reading them in the permuted order, and
        percentile clipping writes straight into ``out``: a field crosses memory once after decoding.
        """
        cfg, layout = self.cfg, self.layout
        where = (str(row["store_uri"]), str(row["row"]), str(row["col"]), int(row["field"]))
        height, width = int(row["height"]), int(row["width"])
        region = None
        # The manifest's height/width are full resolution: another level is read whole, then fitted.
        crop = (cfg.field_size and cfg.field_resize == "crop" and height >= layout.height and width >= layout.width
                and not cfg.resolution_level)
        if crop and (height, width) != (layout.height, layout.width):
            y0, x0 = (height - layout.height) // 2, (width - layout.width) // 2
            region = (y0, y0 + layout.height, x0, x0 + layout.width)
        names = list(row["channel_names"])
        order = np.arange(len(names))
        if self.permute_channels:
            order = numpy_rng(self.seed, Stream.CHANNEL_PERMUTATION, self.epoch, field_index).permutation(len(names))
            names = [names[j] for j in order]
        if self.cache is not None:
            # Normalization, cropping and resizing act on each channel alone, so permuting the cached
            # channels gives what reading them in the permuted order gives.
            image, cached_names = self.cache.field(field_index, self._cached_blocks, row)
            out[: len(order)] = image[order]
            return [cached_names[j] for j in order]
        labels = row.get(_LABELS_COLUMN)
        image, channels = read_field(*where, channels=names, storage_options=cfg.storage_options or None, region=region,
                                     z_plane=cfg.z_plane, z_projection=cfg.z_projection,
                                     resolution_level=cfg.resolution_level,
                                     labels=list(labels) if isinstance(labels, (list, np.ndarray)) and len(labels) else None)
        dest = out[: len(channels)]
        resized = image.shape[1:] != (layout.height, layout.width)
        if cfg.normalization == "none":
            if resized:
                image = self._fit(image)
            dest[...] = image
            return channels
        if not resized:
            normalize_field(image, cfg.normalization, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                            clahe_clip_limit=cfg.clahe_clip_limit, clahe_tiles=cfg.clahe_tiles, out=dest)
            return channels
        image = normalize_field(image, cfg.normalization, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                clahe_clip_limit=cfg.clahe_clip_limit, clahe_tiles=cfg.clahe_tiles, dtype=np.float32)
        image = self._fit(image)
        if dest.dtype == np.uint8:
            quantize_unit(image, dest)
        else:
            dest[...] = image
        return channels

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """A field of another size -> the layout's (float32): ``crop`` scales the short side up to it
        and centre-crops, ``resize`` resizes the whole field."""
        layout = self.layout
        if self.cfg.field_resize == "crop":
            scale = max(layout.height / image.shape[1], layout.width / image.shape[2])
            h, w = max(layout.height, round(image.shape[1] * scale)), max(layout.width, round(image.shape[2] * scale))
            image = _resize(image, h, w)
            y0, x0 = (h - layout.height) // 2, (w - layout.width) // 2
            return image[:, y0:y0 + layout.height, x0:x0 + layout.width]
        return _resize(image, layout.height, layout.width)

    def _batch_channels(self, batch: dict[str, np.ndarray]) -> int:
        """Channels per output row: the padded count, or with ``mixed_channels=group`` the one
        channel count every field of this block has (blocks are formed per channel count)."""
        if self.cfg.mixed_channels == "pad":
            return self.layout.channels
        counts = {len(names) for names in batch["channel_names"]}
        if len(counts) != 1:  # blocks never mix counts (build_field_pipeline); a bundling change would
            raise ValueError(f"data.mixed_channels=group: one read block holds fields of {sorted(counts)} channels")
        return counts.pop()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _ensure_codec_pipeline(self.cfg.use_zarrs)
        layout = self.layout
        n = len(batch["plate"])
        channels = self._batch_channels(batch)
        if self.cache is not None:
            self._cached_blocks = self.cache.fetch(batch[FIELD_INDEX])
        images = np.zeros((n, channels, layout.height, layout.width), dtype=layout.dtype)
        masks = np.zeros((n, channels), dtype=bool)
        names, kept, bad = [], [], []
        for i in range(n):
            row = {k: batch[k][i] for k in _READ_COLUMNS + [_LABELS_COLUMN] if k in batch}
            k = len(kept)
            try:
                field_channels = self._read_into(row, images[k], int(batch[FIELD_INDEX][i]))
            except PlateError as exc:
                if self.cfg.bad_field_policy == "fail":
                    raise BadFieldError(f"{exc} [data.bad_field_policy=fail; set data.bad_field_policy=skip to skip "
                                        f"and count bad fields]") from exc
                images[k] = 0  # a partial write of the failed field
                bad.append({"plate": str(row["plate"]), "well": str(row["well"]), "field": int(row["field"]),
                            "error": str(exc)})
                continue
            masks[k, : len(field_channels)] = True
            names.append(CHANNEL_SEPARATOR.join(field_channels + [PAD_CHANNEL_NAME] * (channels - len(field_channels))))
            kept.append(i)
        images, masks = images[: len(kept)], masks[: len(kept)]
        if self.monitor is not None:
            ref = self.monitor.record.remote(len(kept), images.nbytes, bad)
            if bad:  # only then wait for the count: the common case stays fire-and-forget
                n_bad = ray_get(ref)
                if n_bad > self.max_bad:
                    raise BadFieldError(_too_many_bad_message(n_bad, self.total, self.max_bad, bad))
        elif bad:  # the skip policy always has a monitor; defensive
            raise BadFieldError(bad[0]["error"])
        self._cached_blocks = {}
        out = {"image": images, "channel_mask": masks, "channel_names": np.asarray(names, dtype=object)}
        for col in self.keep_columns:
            out[col] = np.asarray(batch[col])[kept]
        if self.cell_crop_size:
            out = cell_crop_batch(out, self.cell_crop_size)
        return out


def ray_get(ref):
    import ray

    return ray.get(ref)


# ---------------------------------------------------------------------------------------- dataset


def _layout(manifest: pd.DataFrame, cfg: DataConfig) -> _Layout:
    problems = field_layout_problems(manifest, cfg)
    if problems:
        raise ConfigError(problems)
    channels = cfg.pad_channels_to or int(manifest["channel_names"].map(len).max())
    if cfg.field_size:
        height = width = int(cfg.field_size)
    else:
        height, width = int(manifest["height"].iloc[0]), int(manifest["width"].iloc[0])
    if cfg.normalization == "none":
        dtype = "float32" if cfg.field_size and cfg.field_resize == "resize" else str(manifest["dtype"].iloc[0])
    else:
        dtype = "uint8" if cfg.transfer_dtype == "uint8" else "float16"
    return _Layout(channels, height, width, dtype)


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
        options.resource_limits = options.resource_limits.copy(object_store_memory=cfg.object_store_limit_mb * _MB)
    return options


def check_pipeline_config(manifest: pd.DataFrame, cfg: DataConfig) -> _Layout:
    """Every check a field stream of ``manifest`` makes before reading (run it on the driver, before Ray
    starts, for a stream built later elsewhere); returns the stream's layout."""
    problems = data_config_problems(cfg)  # a DataConfig built in code has not been through load_config
    if problems:
        raise ConfigError(problems)
    if len(manifest) == 0:
        raise ValueError("empty manifest: no fields to read")
    return _layout(manifest, cfg)


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


def _read_blocks(table: pd.DataFrame, cfg: DataConfig) -> list[pd.DataFrame]:
    """Consecutive rows cut into read blocks of at most ``data.read_batch_size`` fields, cut where the
    plate changes (read locality; a block never spans two plates) and, with ``mixed_channels=group``,
    where the channel count changes, so every block has one image shape."""
    step = max(1, cfg.read_batch_size)
    plates = table["plate"].astype(str).to_numpy()
    changes = plates[1:] != plates[:-1]
    if cfg.mixed_channels == "group":
        counts = table["channel_names"].map(len).to_numpy()
        changes |= counts[1:] != counts[:-1]
    cuts = [0, *np.flatnonzero(changes) + 1, len(table)]
    return [table.iloc[i:min(i + step, b)] for a, b in zip(cuts[:-1], cuts[1:]) for i in range(a, b, step)]


def _field_table(manifest: pd.DataFrame, keep_columns: Sequence[str]) -> pd.DataFrame:
    """The columns a read task needs plus ``keep_columns``, with each row's ``FIELD_INDEX`` (its index label)."""
    columns = list(dict.fromkeys(_READ_COLUMNS + list(keep_columns)
                                 + ([_LABELS_COLUMN] if _LABELS_COLUMN in manifest.columns else [])))
    index = pd.to_numeric(pd.Series(manifest.index), errors="coerce")
    if index.isna().any() or (index < 0).any() or not index.is_unique:
        raise ValueError("the manifest's index must hold unique non-negative integers (its rows' positions in "
                         "the training manifest); reset_index(drop=True) a frame that lost them")
    return manifest[columns].assign(**{FIELD_INDEX: index.to_numpy(dtype=np.int64)}).reset_index(drop=True)


def epoch_shard(manifest: pd.DataFrame, cfg: DataConfig, *, seed: int, epoch: int, rank: int,
                world_size: int) -> pd.DataFrame:
    """The fields rank ``rank`` of ``world_size`` trains on in ``epoch``, in the order it reads them: the
    manifest's read blocks (``_read_blocks``; with ``mixed_channels=group``, after sorting by channel
    count) in an order drawn from (seed, epoch), flattened, then cut into ``world_size`` equal contiguous
    shares of ``len(manifest) // world_size`` fields (the epoch's last few fields wait for another epoch).
    Keeps the manifest's index labels (``FIELD_INDEX``). Equal shares: every rank runs the same number of
    steps, as DDP needs."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of {world_size} workers")
    table = manifest
    if cfg.mixed_channels == "group":
        table = manifest.iloc[np.argsort(manifest["channel_names"].map(len).to_numpy(), kind="stable")]
    blocks = _read_blocks(table, cfg)
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
    cache: "FieldCache | None" = None,
) -> FieldPipeline:
    """A streaming Ray Dataset of normalized fields for the rows of ``manifest`` (one or several
    manifests concatenated by ``load_manifests``: several plates, sources, channel counts; or one rank's
    ``epoch_shard``), in the manifest's order.

    training=True permutes channels per field (if ``data.channel_permutation``), seeded by (seed, epoch,
    the row's index label); evaluation keeps channel order and carries ``keep_columns`` along.
    ``monitor``: an existing monitor to report to (default: a new one, when one is needed). ``cache``: the
    training manifest's ``FieldCache`` (``data.cache_fields``) to take the fields from instead of the plates.
    """
    import ray
    import ray.data

    if cache is not None and not training:
        raise ValueError("a FieldCache holds training fields (training transfer dtype); evaluation reads the plates")
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
    table = _field_table(manifest, keep_columns)
    if monitor is None:
        monitor = create_monitor(cfg, len(table), name)
    # One block per few consecutive fields (same plate: read locality) so reads spread over tasks and
    # memory stays bounded. (Split here: Ray 2.60's own `override_num_blocks` split breaks on pandas 3 frames.)
    # Blocks never span two plates, so a plate's blocks are the same whatever else is read (batch
    # inference embeds a block as one batch: its numbers do not depend on the other plates of a run).
    ds = ray.data.from_pandas(_read_blocks(table, cfg))
    loader_kwargs = dict(cfg=eval_cfg, permute_channels=training and cfg.channel_permutation,
                         keep_columns=keep_columns, layout=layout, monitor=monitor.actor if monitor else None,
                         max_bad=monitor.max_bad if monitor else 0, total=monitor.total if monitor else len(table),
                         seed=seed, epoch=epoch, cache=cache, cell_crop_size=cfg.cell_crop_size if cells else 0)
    kwargs: dict[str, Any] = {}
    if cfg.read_actors > 0:
        # Two blocks queued per actor: the next block is already there when one finishes.
        kwargs.update(compute=ray.data.ActorPoolStrategy(size=cfg.read_actors, max_tasks_in_flight_per_actor=2),
                      fn_constructor_kwargs=loader_kwargs)
        loader = FieldLoader
    else:
        loader = FieldLoader(**loader_kwargs)
        if cfg.read_concurrency > 0:
            kwargs["compute"] = ray.data.TaskPoolStrategy(size=cfg.read_concurrency)
    # batch_size=None hands each block to the loader as it is: a batch of `read_batch_size` rows could
    # otherwise span two blocks of different channel counts.
    ds = ds.map_batches(loader, batch_size=None if cfg.mixed_channels == "group" else max(1, cfg.read_batch_size),
                        num_cpus=cfg.read_cpus, batch_format="numpy", **kwargs)
    ds.context.execution_options = _execution_options(cfg)
    shape = (cfg.cell_crop_size, cfg.cell_crop_size) if cells else (layout.height, layout.width)
    return FieldPipeline(ds, monitor, layout.channels, shape)


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


# ---------------------------------------------------------------------------------------- field cache


@dataclass(frozen=True)
class FieldCache:
    """A training manifest's normalized fields held in Ray's object store (``data.cache_fields``), read
    once by ``fill_field_cache``: every epoch's stream then takes its fields from here instead of the plates.

    ``blocks``: one object per read block of the manifest (``_read_blocks``: never spanning plates), the
    loader's output for it with channels in manifest order (no permutation; padded to the largest channel
    count); ``where``: a field's index label -> (block, row in block); a field that could not be read is
    absent (with ``data.bad_field_policy=skip`` it stays skipped, counted once). The driver owns the objects:
    they live as long as it holds this cache."""

    blocks: tuple
    where: dict[int, tuple[int, int]]
    nbytes: int

    def fetch(self, field_indices: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """The cached blocks holding these fields (zero-copy views of the object store), by block number."""
        import ray

        numbers = sorted({self.where[int(i)][0] for i in field_indices if int(i) in self.where})
        return dict(zip(numbers, ray.get([self.blocks[b] for b in numbers])))

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
    layout = _layout(manifest, _cache_config(cfg))
    return len(manifest) * layout.channels * layout.height * layout.width * np.dtype(layout.dtype).itemsize / _MB


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
    import dataclasses

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
    table = _field_table(manifest, [])
    loader = FieldLoader(cache_cfg, permute_channels=False, keep_columns=[FIELD_INDEX],
                         layout=check_pipeline_config(manifest, cache_cfg),
                         monitor=monitor.actor if monitor else None, max_bad=monitor.max_bad if monitor else 0,
                         total=monitor.total if monitor else len(table))
    read = ray.remote(num_cpus=cfg.read_cpus, num_returns=2)(_load_block)
    started = time.monotonic()
    refs = [read.remote(loader, {c: block[c].to_numpy() for c in block.columns}) for block in _read_blocks(table, cfg)]
    indices = ray.get([index for index, _ in refs])
    where = {int(i): (b, position) for b, block in enumerate(indices) for position, i in enumerate(block)}
    blocks = tuple(out for _, out in refs)
    ray.wait(list(blocks), num_returns=len(blocks), fetch_local=False)
    nbytes = int(cache_size_mb(manifest, cfg) * _MB)
    _log(f"data: {len(where)} of {len(table)} training fields cached in Ray's object store "
         f"({nbytes / _MB:.0f} MB) in {time.monotonic() - started:.0f} s; every epoch reads them from there")
    return FieldCache(blocks, where, nbytes)


# ---------------------------------------------------------------------------------------- consumer


def to_float_images(images: np.ndarray):
    """A batch's ``image`` column as a float32 torch tensor ([0, 1] for uint8 transfers)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).mul_(1.0 / 255.0)
    return tensor.to(torch.float32)


def iter_training_batches(stream, cfg: DataConfig, batch_size: int, device, label_column: str = "",
                          shuffle_seed: int | None = None) -> Iterator[FieldBatch]:
    """One epoch of a rank's field stream (a Ray Dataset or DataIterator) as FieldBatches of exactly
    `batch_size` samples, floor(samples / batch_size) of them, so every rank runs the same number of steps.
    `label_column`: a manifest column carried by the dataset (keep_columns) to hand out as per-sample
    labels. `shuffle_seed`: the seed of the local shuffle buffer (`data.shuffle_buffer`); with a stream in
    a fixed order, the batches are then the same in every rerun.

    ``data.mixed_channels=pad``: the remainder is dropped. ``group``: each batch holds fields of one
    channel count (no padding; ``channel_mask`` None); an epoch's leftovers of each count (fewer than
    a batch) top up to full batches with repeats of that count's own fields, up to the same number
    of batches as ``pad`` (DDP ranks must step together).
    """
    group = cfg.mixed_channels == "group"
    batches = stream.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=not group,
                                  local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=shuffle_seed)
    if group:
        batches = _group_by_channel_count(batches, batch_size)
    for data in batches:
        yield _field_batch(data, device, label_column)


def _field_batch(data: dict[str, np.ndarray], device, label_column: str) -> FieldBatch:
    import torch

    mask = data.get("channel_mask")
    channel_mask = None
    if mask is not None and not mask.all():
        channel_mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(device)
    return FieldBatch(
        images=to_float_images(data["image"]).to(device),
        channel_names=[names.split(CHANNEL_SEPARATOR) for names in data["channel_names"]],
        channel_mask=channel_mask,
        labels=[str(v) for v in data[label_column]] if label_column else None,
    )


def _group_by_channel_count(batches: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-batch a stream whose rows have different channel counts into batches of one count.

    Rows of several counts in one incoming batch arrive as an object array of (C, H, W) images
    (Ray's variable-shaped tensors); of one count, as a (N, C, H, W) array.
    """
    pending: dict[int, list[dict[str, Any]]] = {}
    seen = emitted = 0
    for data in batches:
        images = data["image"]
        for i in range(len(images)):
            row = {key: values[i] for key, values in data.items()}
            rows = pending.setdefault(row["image"].shape[0], [])
            rows.append(row)
            seen += 1
            if len(rows) == batch_size:
                yield _stack_rows(rows)
                rows.clear()
                emitted += 1
    # Each count has < batch_size left, so the counts with the most left always suffice.
    for rows in sorted(pending.values(), key=len, reverse=True):
        if emitted >= seen // batch_size or not rows:
            break
        yield _stack_rows([rows[i % len(rows)] for i in range(batch_size)])
        emitted += 1


def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) if key in ("image", "channel_mask")
            else np.asarray([row[key] for row in rows], dtype=object) for key in rows[0]}

"""What a field stream's rows look like before anything is read: the manifest columns a read task
takes, the stream's layout (channel count, field size, transfer dtype), and the read blocks a manifest is
cut into (never spanning two plates: read locality)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from cellfm.config import ConfigError, DataConfig, data_config_problems
from cellfm.data.layout import field_layout_problems

# Manifest columns a read task needs; the rest travel as metadata only when asked for.
READ_COLUMNS = ["plate", "well", "row", "col", "field", "store_uri", "channel_names", "height", "width"]
# Read when the manifest has it: the array's channel names where a plate's omero labels are missing or renamed.
LABELS_COLUMN = "channel_labels"
# A field's position in the training manifest (its index label): what its channel permutation is seeded by.
FIELD_INDEX = "field_index"
CHANNEL_SEPARATOR = ","
PAD_CHANNEL_NAME = ""
MB = 1024 * 1024


@dataclass(frozen=True)
class StreamLayout:
    """What every output row looks like: padded channel count, field size, transfer dtype."""

    channels: int
    height: int
    width: int
    dtype: str  # float16 | uint8 | a raw stored dtype (normalization "none")


def stream_layout(manifest: pd.DataFrame, cfg: DataConfig) -> StreamLayout:
    """The layout of a stream of ``manifest``'s fields under ``cfg`` (ConfigError when its fields cannot
    share one)."""
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
    return StreamLayout(channels, height, width, dtype)


def check_pipeline_config(manifest: pd.DataFrame, cfg: DataConfig) -> StreamLayout:
    """Every check a field stream of ``manifest`` makes before reading (run it on the driver, before Ray
    starts, for a stream built later elsewhere); returns the stream's layout."""
    problems = data_config_problems(cfg)  # a DataConfig built in code has not been through load_config
    if problems:
        raise ConfigError(problems)
    if len(manifest) == 0:
        raise ValueError("empty manifest: no fields to read")
    return stream_layout(manifest, cfg)


def _read_block_bounds(table: pd.DataFrame, cfg: DataConfig) -> list[tuple[int, int]]:
    """(start, stop) rows of each read block (see read_blocks)."""
    step = max(1, cfg.read_batch_size)
    plates = table["plate"].astype(str).to_numpy()
    changes = plates[1:] != plates[:-1]
    if cfg.mixed_channels == "group":
        counts = table["channel_names"].map(len).to_numpy()
        changes |= counts[1:] != counts[:-1]
    cuts = [0, *np.flatnonzero(changes) + 1, len(table)]
    return [(i, min(i + step, b)) for a, b in zip(cuts[:-1], cuts[1:]) for i in range(a, b, step)]


def read_blocks(table: pd.DataFrame, cfg: DataConfig) -> list[pd.DataFrame]:
    """Consecutive rows cut into read blocks of at most ``data.read_batch_size`` fields, cut where the
    plate changes (read locality; a block never spans two plates) and, with ``mixed_channels=group``,
    where the channel count changes, so every block has one image shape."""
    return [table.iloc[start:stop] for start, stop in _read_block_bounds(table, cfg)]


def read_block_columns(table: pd.DataFrame, cfg: DataConfig) -> Iterator[dict[str, np.ndarray]]:
    """``read_blocks`` as the numpy column dicts a ``FieldLoader`` takes (each column converted once)."""
    columns = {column: table[column].to_numpy() for column in table.columns}
    for start, stop in _read_block_bounds(table, cfg):
        yield {column: values[start:stop] for column, values in columns.items()}


def field_table(manifest: pd.DataFrame, keep_columns: Sequence[str]) -> pd.DataFrame:
    """The columns a read task needs plus ``keep_columns``, with each row's ``FIELD_INDEX`` (its index label)."""
    columns = list(dict.fromkeys(READ_COLUMNS + list(keep_columns)
                                 + ([LABELS_COLUMN] if LABELS_COLUMN in manifest.columns else [])))
    index = pd.to_numeric(pd.Series(manifest.index), errors="coerce")
    if index.isna().any() or (index < 0).any() or not index.is_unique:
        raise ValueError("the manifest's index must hold unique non-negative integers (its rows' positions in "
                         "the training manifest); reset_index(drop=True) a frame that lost them")
    return manifest[columns].assign(**{FIELD_INDEX: index.to_numpy(dtype=np.int64)}).reset_index(drop=True)


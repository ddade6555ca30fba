"""The field manifest: one Parquet row per field, with the perturbation metadata OME-Zarr has no slot for.

Columns (``MANIFEST_COLUMNS``, in this order; extra columns are kept after them):
``channel_names``/``channel_groups`` are ``list<string>`` (group "context" or "concept", per C3R),
``field``/``height``/``width`` int64, ``is_control`` bool, ``dose`` float64, the rest strings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellfm.data.plate import PlateError, plate_channel_names, plate_wells

MANIFEST_COLUMNS: tuple[str, ...] = ("source", "plate", "well", "row", "col", "field", "store_uri",
    "channel_names", "channel_groups", "height", "width", "dtype",
    "perturbation_id", "moa", "is_control", "dose", "cell_line", "batch")

CHANNEL_GROUPS = ("context", "concept")
_LIST_COLUMNS = ("channel_names", "channel_groups")
_INT_COLUMNS = ("field", "height", "width")
_SCHEMA = pa.schema([
    pa.field(name, pa.list_(pa.string()) if name in _LIST_COLUMNS
             else pa.int64() if name in _INT_COLUMNS
             else pa.bool_() if name == "is_control"
             else pa.float64() if name == "dose"
             else pa.string())
    for name in MANIFEST_COLUMNS
])


class ManifestError(ValueError):
    """A manifest is missing, malformed or inconsistent; the message names the offending rows."""


def _row_label(row: pd.Series) -> str:
    return f"plate {row['plate']!r} well {row['well']} field {row['field']}"


def _validate(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns, uniqueness and per-row channel lists; return a copy with canonical types."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{where}: missing column(s) {missing}; a manifest needs {list(MANIFEST_COLUMNS)}")
    df = df.reset_index(drop=True).copy()
    for col in _LIST_COLUMNS:
        df[col] = pd.Series([list(v) if isinstance(v, (list, tuple, np.ndarray)) else v for v in df[col]],
                            index=df.index, dtype=object)
        bad = [i for i, v in enumerate(df[col]) if not isinstance(v, list) or not all(isinstance(s, str) for s in v)]
        if bad:
            raise ManifestError(f"{where}: column {col!r} must hold lists of strings; "
                                f"{_row_label(df.iloc[bad[0]])} has {df[col].iloc[bad[0]]!r}")
    try:
        for col in _INT_COLUMNS:
            df[col] = df[col].astype("int64")
        df["dose"] = df["dose"].astype("float64")
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: non-numeric field/height/width/dose value: {exc}") from exc
    if not df["is_control"].map(lambda v: isinstance(v, (bool, np.bool_))).all():
        raise ManifestError(f"{where}: column 'is_control' must be boolean")
    df["is_control"] = df["is_control"].astype(bool)

    duplicated = df.duplicated(subset=["plate", "well", "field"], keep=False)
    if duplicated.any():
        keys = df.loc[duplicated, ["plate", "well", "field"]].drop_duplicates()
        shown = [f"({p}, {w}, {f})" for p, w, f in keys.itertuples(index=False)][:10]
        raise ManifestError(f"{where}: {len(keys)} duplicate (plate, well, field) key(s): {', '.join(shown)}")
    for i, (names, groups) in enumerate(zip(df["channel_names"], df["channel_groups"])):
        if len(names) != len(groups):
            raise ManifestError(f"{where}: {_row_label(df.iloc[i])} has {len(names)} channel_names {names} "
                                f"but {len(groups)} channel_groups {groups}")
        unknown = sorted(set(groups) - set(CHANNEL_GROUPS))
        if unknown:
            raise ManifestError(f"{where}: {_row_label(df.iloc[i])} has channel group(s) {unknown}; "
                                f"allowed: {list(CHANNEL_GROUPS)}")
    extra = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    return df[list(MANIFEST_COLUMNS) + extra]


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Validate and write a manifest atomically (temp file in the same directory, then ``os.replace``),
    so readers never see a half-written file and a crash leaves the previous version intact."""
    path = Path(path)
    df = _validate(df, f"manifest {str(path)!r}")
    columns = {}
    for name in df.columns:
        try:
            arrow_type = _SCHEMA.field(name).type if name in MANIFEST_COLUMNS else None  # extras: inferred
            columns[name] = pa.array(df[name].tolist(), type=arrow_type)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {str(path)!r}: column {name!r} cannot be stored: {exc}") from exc
    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest; list columns come back as Python lists of str."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise ManifestError(f"manifest {str(path)!r} is not a readable Parquet file: {exc}") from exc
    return _validate(df, f"manifest {str(path)!r}")


def check_manifest_against_plates(df: pd.DataFrame, storage_options=None) -> None:
    """Verify every plate in ``df`` opens, lists each row's well and field, and has each row's channels.

    Reads only plate metadata (one plate's channel list and well list per store), so it is cheap
    enough to run on the driver before any worker starts reading pixels.
    """
    for store_uri, rows in df.groupby("store_uri", sort=False):
        available = plate_channel_names(store_uri, storage_options)
        well_paths, field_count = plate_wells(store_uri, storage_options)
        wells = set(well_paths)
        for row in rows.itertuples(index=False):
            where = f"plate {store_uri!r} ({row.plate}), well {row.well}, field {row.field}"
            if f"{row.row}/{row.col}" not in wells:
                raise PlateError(f"{where}: well not in the plate (plate lists {len(wells)} wells)")
            if row.field < 0 or (field_count is not None and row.field >= field_count):
                raise PlateError(f"{where}: field index outside the plate's {field_count} fields")
            missing = [name for name in row.channel_names if name not in available]
            if missing:
                raise PlateError(f"{where}: channel(s) {missing} not in plate; available channels: {available}")

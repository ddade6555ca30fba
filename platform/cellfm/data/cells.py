"""Single cells (``data.crop_mode=cells``): a per-field table of cell centres, and the fixed-size crops
around them that the pipeline's read task cuts from each normalized field.

- Locations table (``data.cell_locations``, Parquet): one row per cell, columns plate, well, field, y, x
  (y, x in pixels of the full-resolution field). CellProfiler's per-object names are accepted and mapped:
  ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (or ``Metadata_Field``), ``Location_Center_Y``,
  ``Location_Center_X`` (also with an object prefix, e.g. ``Nuclei_Location_Center_X``, when only one object's
  centres are in the table). The field index is the manifest's.
- Crop: a ``size`` x ``size`` window whose top-left pixel is (round(y) - size // 2, round(x) - size // 2)
  (halves round up), so the centre pixel sits at (size // 2, size // 2). Edges: the part of a window outside
  the field is zero (after normalization: the darkest value for percentile/clahe, the mean for standardize);
  windows are never shifted, so a crop's centre is always its cell's centre.
- A field whose cells the table does not list gives no crop; a centre outside its field is refused.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pandas as pd

from cellfm.config import DataConfig

LOCATION_COLUMNS = ("plate", "well", "field", "y", "x")
# CellProfiler / pycytominer per-object column -> locations column.
CELLPROFILER_COLUMNS = {"Metadata_Plate": "plate", "Metadata_Well": "well", "Metadata_Site": "field",
                        "Metadata_Field": "field", "Location_Center_Y": "y", "Location_Center_X": "x"}
# Manifest columns added by `attach_cell_locations`: each field's centres (float64 arrays, table order).
CELLS_Y, CELLS_X = "cells_y", "cells_x"
# Columns of a crop's row in the pipeline's output: its centre.
CELL_Y, CELL_X = "cell_y", "cell_x"


class LocationsError(ValueError):
    """A cell locations table is unreadable, lacks a column, or names a plate/well/field the manifest lacks."""


def standard_locations(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """``table`` with CellProfiler names mapped to LOCATION_COLUMNS, those columns only, typed (plate, well str;
    field int64; y, x float64); LocationsError naming ``source`` and the column at fault."""
    renamed = {}
    for column in table.columns:
        target = CELLPROFILER_COLUMNS.get(column)
        if target is None and column.endswith(("_Location_Center_Y", "_Location_Center_X")):
            target = column[-1].lower()
        if target is not None and target not in table.columns:
            if target in renamed.values():
                raise LocationsError(f"cell locations {source}: two columns give {target!r}: "
                                     f"{[c for c, t in renamed.items() if t == target] + [column]}")
            renamed[column] = target
    table = table.rename(columns=renamed)
    missing = [c for c in LOCATION_COLUMNS if c not in table.columns]
    if missing:
        raise LocationsError(f"cell locations {source}: missing column(s) {missing}; need {list(LOCATION_COLUMNS)} "
                             f"(or CellProfiler's Metadata_Plate, Metadata_Well, Metadata_Site, Location_Center_Y, "
                             f"Location_Center_X)")
    out = pd.DataFrame({"plate": table["plate"].astype(str), "well": table["well"].astype(str)})
    for column, dtype in (("field", np.int64), ("y", np.float64), ("x", np.float64)):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if column == "field":
            bad |= values.fillna(0) % 1 != 0
        if bad.any():
            row = table.loc[bad].iloc[0]
            raise LocationsError(f"cell locations {source}: column {column!r} holds {str(row[column])!r} for plate "
                                 f"{row['plate']!r} well {row['well']} ({int(bad.sum())} bad row(s)); need numbers")
        out[column] = values.to_numpy(dtype=dtype)
    return out


@functools.lru_cache(maxsize=4)
def _read_cached(uri: str, options: tuple) -> pd.DataFrame:
    try:
        table = pd.read_parquet(uri, storage_options=dict(options) or None)
    except FileNotFoundError as exc:
        raise LocationsError(f"cell locations {uri}: not found (data.cell_locations)") from exc
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise LocationsError(f"cell locations {uri}: not a readable Parquet file: {type(exc).__name__}: {exc}") from exc
    return standard_locations(table, uri)


def read_cell_locations(uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The locations table at ``uri`` as ``standard_locations`` gives it (read once per process)."""
    return _read_cached(str(uri), tuple(sorted((storage_options or {}).items(), key=str)))


def location_problems(locations: pd.DataFrame, manifest: pd.DataFrame, source: str) -> list[str]:
    """One line per kind of mismatch between a standard locations table and the manifest: the first plate,
    well or field it names that the manifest lacks, and the first centre outside its field."""
    problems = []
    keys = locations[["plate", "well", "field"]]
    fields = manifest[["plate", "well", "field", "height", "width"]].astype({"plate": str, "well": str})
    # Several manifests may list a field (one table serves a job's manifests): one row per field.
    fields = fields.astype({"field": np.int64}).drop_duplicates(["plate", "well", "field"])
    for level, columns in (("plate", ["plate"]), ("well", ["plate", "well"]), ("field", ["plate", "well", "field"])):
        known = pd.MultiIndex.from_frame(fields[columns])
        unknown = ~pd.MultiIndex.from_frame(keys[columns]).isin(known)
        if unknown.any():
            row = keys[unknown].iloc[0]
            at = " ".join(f"{c} {row[c]!r}" if c == "plate" else f"{c} {row[c]}" for c in columns)
            problems.append(f"cell locations {source}: {at} is not in the manifest ({int(unknown.sum())} row(s))")
            return problems  # a finer level would repeat the same rows
    sizes = keys.merge(fields, on=["plate", "well", "field"], how="left")
    outside = ((locations["y"].to_numpy() < 0) | (locations["y"].to_numpy() > sizes["height"].to_numpy() - 1)
               | (locations["x"].to_numpy() < 0) | (locations["x"].to_numpy() > sizes["width"].to_numpy() - 1))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        row = locations.iloc[i]
        problems.append(f"cell locations {source}: plate {row['plate']!r} well {row['well']} field {row['field']}: "
                        f"centre (y {row['y']}, x {row['x']}) is outside the {int(sizes['height'].iloc[i])} x "
                        f"{int(sizes['width'].iloc[i])} field ({int(outside.sum())} row(s))")
    return problems


def attach_cell_locations(manifest: pd.DataFrame, locations: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``manifest`` (same index) with each field's centres in CELLS_Y / CELLS_X (float64 arrays in
    the table's order; empty for a field the table does not list)."""
    groups = locations.groupby(["plate", "well", "field"], sort=False).indices
    empty = np.zeros(0, dtype=np.float64)
    ys, xs = [], []
    for plate, well, field in zip(manifest["plate"].astype(str), manifest["well"].astype(str),
                                  manifest["field"].astype(np.int64)):
        idx = groups.get((plate, well, field))
        ys.append(locations["y"].to_numpy()[idx] if idx is not None else empty)
        xs.append(locations["x"].to_numpy()[idx] if idx is not None else empty)
    return manifest.assign(**{CELLS_Y: ys, CELLS_X: xs})


def with_cell_locations(manifest: pd.DataFrame, data: DataConfig, source: str = "the manifest") -> pd.DataFrame:
    """``manifest`` as ``data.crop_mode`` needs it: unchanged for fields (or when its centres are attached);
    for cells, with its centres attached from ``data.cell_locations``, LocationsError on a centre outside its
    field. The table may list other fields too (one table for a screen's training and held-out plates):
    preflight (``cellfm.preflight.cell_location_problems``) refuses the fields no manifest of the job lists."""
    if data.crop_mode != "cells" or CELLS_Y in manifest.columns:
        return manifest
    locations = read_cell_locations(data.cell_locations, data.storage_options or None)
    keys = pd.MultiIndex.from_frame(manifest[["plate", "well", "field"]].astype(
        {"plate": str, "well": str, "field": np.int64}))
    locations = locations[pd.MultiIndex.from_frame(locations[["plate", "well", "field"]]).isin(keys)]
    problems = location_problems(locations, manifest, data.cell_locations)
    if problems:
        raise LocationsError(problems[0])
    return attach_cell_locations(manifest, locations)


def locations_digest(locations: pd.DataFrame) -> str:
    """sha256 (16 hex) of a standard locations table's rows, whatever their order: part of the feature key."""
    rows = locations.sort_values(list(LOCATION_COLUMNS), ignore_index=True)
    return hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes()).hexdigest()[:16]


def crop_origin(centre: np.ndarray, size: int) -> np.ndarray:
    """Top-left pixel index of the windows around ``centre`` (pixels; halves round up)."""
    return np.floor(np.asarray(centre, dtype=np.float64) + 0.5).astype(np.int64) - size // 2


def crop_cells(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) field -> (n, C, size, size) crops around the n centres (``crop_origin``), same dtype, zero
    where a window leaves the field."""
    channels, height, width = image.shape
    out = np.zeros((len(ys), channels, size, size), dtype=image.dtype)
    for i, (y0, x0) in enumerate(zip(crop_origin(ys, size), crop_origin(xs, size))):
        top, left = max(y0, 0), max(x0, 0)
        bottom, right = min(y0 + size, height), min(x0 + size, width)
        if bottom > top and right > left:
            out[i, :, top - y0:bottom - y0, left - x0:right - x0] = image[:, top:bottom, left:right]
    return out


def cell_crop_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A loader output batch of fields (``image`` (N, C, H, W), per-field columns, CELLS_Y / CELLS_X) -> one
    row per cell: ``image`` (M, C, size, size), every other per-field column repeated per cell, CELL_Y / CELL_X
    the crop's centre; cells in field order, then table order."""
    ys, xs = batch.pop(CELLS_Y), batch.pop(CELLS_X)
    counts = np.array([len(y) for y in ys], dtype=np.int64)
    images = batch.pop("image")
    crops = [crop_cells(image, np.asarray(y), np.asarray(x), size) for image, y, x in zip(images, ys, xs)]
    out = {key: np.repeat(values, counts, axis=0) for key, values in batch.items()}
    out["image"] = (np.concatenate(crops) if crops else
                    np.zeros((0, images.shape[1], size, size), dtype=images.dtype))
    out[CELL_Y] = np.concatenate([np.asarray(y, dtype=np.float64) for y in ys]) if len(ys) else np.zeros(0)
    out[CELL_X] = np.concatenate([np.asarray(x, dtype=np.float64) for x in xs]) if len(xs) else np.zeros(0)
    return out


def cells_per_field(manifest: pd.DataFrame) -> np.ndarray:
    """How many crops each field of a manifest with attached centres gives."""
    return manifest[CELLS_Y].map(len).to_numpy(dtype=np.int64)

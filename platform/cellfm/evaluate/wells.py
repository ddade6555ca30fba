"""Well profiles, the input every evaluation protocol scores.

A model's features for one channel configuration arrive as a metadata DataFrame and a matrix with
one row per field (a `field` column present: fields are averaged per well) or per well. They leave
sorted by (plate, well), validated, and normalized as `eval.well_normalization` says, so the same
features give the same numbers whatever order they were read in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellfm.data.cells import CELL_X, CELL_Y
from cellfm.features.aggregate import WELL_KEYS, aggregate_wells, normalize_to_controls

# Metadata every protocol needs, per well.
REQUIRED_COLUMNS = ("plate", "well", "perturbation_id", "moa", "is_control")
# Used where present: HPA-style localization classes ("|" separates several) for localization_map.
OPTIONAL_COLUMNS = ("localization",)
# Several labels of one well (MoAs of a compound, compartments of a protein), as in JUMP's metadata.
LABEL_SEPARATOR = "|"


@dataclass(frozen=True)
class WellProfiles:
    """One model's wells: `meta` (REQUIRED_COLUMNS + the OPTIONAL_COLUMNS present, one row per well,
    sorted by plate and well) and `features` (n_wells, D) float64 in the same order."""

    meta: pd.DataFrame
    features: np.ndarray
    n_fields: int | None  # fields averaged into the wells (None: given per well)


def _row_name(row: pd.Series) -> str:
    field = f" field {row['field']}" if "field" in row else ""
    return f"plate {row['plate']} well {row['well']}{field}"


def _validate(meta: pd.DataFrame, features: np.ndarray, label_columns: list[str], source: str) -> None:
    missing = [c for c in dict.fromkeys([*REQUIRED_COLUMNS, *label_columns]) if c not in meta.columns]
    if missing:
        raise ValueError(f"{source}: metadata lacks column(s) {', '.join(missing)} (needs "
                         f"{', '.join(REQUIRED_COLUMNS)}, the eval.labels columns, and field for per-field features)")
    if features.ndim != 2 or len(features) != len(meta):
        raise ValueError(f"{source}: features must be (rows, D) with one row per metadata row; "
                         f"got shape {features.shape} for {len(meta)} rows")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ValueError(f"{source}: non-finite features at {_row_name(meta.iloc[int(np.argmax(bad))])}")
    # Per-cell rows (data.crop_mode=cells) share their field's key: a cell is told apart by its centre.
    keys = WELL_KEYS + [c for c in ("field", CELL_Y, CELL_X) if c in meta.columns]
    duplicated = meta.duplicated(keys)
    if duplicated.any():
        raise ValueError(f"{source}: {_row_name(meta[duplicated].iloc[0])} appears more than once")


def well_profiles(meta: pd.DataFrame, features: np.ndarray, normalization: str, label_columns: list[str] = (),
                  source: str = "features") -> WellProfiles:
    """Sort, validate, average fields per well (mean, as `aggregate_wells`) and normalize (`none` or
    `negcon`: per plate against its negative controls). `label_columns` (eval.labels) must be columns
    and are kept per well, as are the OPTIONAL_COLUMNS present. `source` names the input in errors."""
    meta, features = meta.reset_index(drop=True), np.asarray(features)
    _validate(meta, features, list(label_columns), source)
    optional = [c for c in dict.fromkeys([*OPTIONAL_COLUMNS, *label_columns])
                if c in meta.columns and c not in REQUIRED_COLUMNS]
    per_field = "field" in meta.columns
    order = meta.sort_values(WELL_KEYS + (["field"] if per_field else []), kind="mergesort").index.to_numpy()
    rows, rows_features = meta.loc[order].reset_index(drop=True), features[order].astype(np.float64)
    if per_field:
        wells, well_features = aggregate_wells(rows.assign(_features=list(rows_features)), "_features")
        if optional:
            first_values = rows.groupby(WELL_KEYS, sort=True)[optional].first().reset_index()
            wells = wells.merge(first_values, on=WELL_KEYS, how="left")
    else:
        wells, well_features = rows[list(REQUIRED_COLUMNS) + optional], rows_features
    wells = wells.astype({"plate": str, "well": str, "perturbation_id": str, "moa": str, "is_control": bool})
    for column in optional:
        wells[column] = wells[column].fillna("").astype(str)
    if normalization == "negcon":
        try:
            well_features = normalize_to_controls(well_features, wells)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc} (eval.well_normalization=none scores screens without "
                             "negative controls)") from exc
    elif normalization != "none":
        raise ValueError(f"{source}: unknown well normalization {normalization!r} (none | negcon)")
    return WellProfiles(wells.reset_index(drop=True), np.asarray(well_features, dtype=np.float64),
                        len(rows) if per_field else None)


def label_sets(values: pd.Series) -> list[list[str]]:
    """'a|b' -> ['a', 'b'] per row; empty strings give an empty list."""
    return [sorted({part.strip() for part in str(v).split(LABEL_SEPARATOR) if part.strip()}) for v in values]

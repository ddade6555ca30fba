"""A feature store entry's contents: one plate's embeddings (`PlateFeatures`) as the two xarray Datasets
stored in Zarr (fields: dims (field, feature), variable ``embedding``; wells: dims (well, feature), one
variable per stored aggregation) with the manifest's columns as coordinates, and as Parquet tables for
pycytominer / copairs (``Metadata_*`` columns, feature columns ``<model>_<i>``). Where entries live and
when they become visible is `cellfm.features.store`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# Manifest columns kept as coordinates (and Parquet metadata) when present; per well, all but the field's own.
# With data.crop_mode=cells the field level holds one row per cell, its centre in cell_y / cell_x.
FIELD_COORDS = ("plate", "well", "row", "col", "field", "site", "cell_y", "cell_x", "perturbation_id", "moa",
                "is_control", "dose", "cell_line", "batch", "source", "compound_split", "localization", "target",
                "channel_names")
FIELD_ONLY = ("field", "site", "cell_y", "cell_x")
# Parquet column names pycytominer expects for the plate/well/field keys; the rest are Metadata_<column>.
PARQUET_NAMES = {"plate": "Metadata_Plate", "well": "Metadata_Well", "field": "Metadata_Field"}
PERT_TYPE = "Metadata_pert_type"  # "negcon" for negative controls, "trt" otherwise (JUMP's convention)


@dataclass
class PlateFeatures:
    """One plate's embeddings, ready to store: `meta` one row per field (manifest columns, sorted by
    well and field), `embeddings` (n_fields, D) float32, `wells` the well metadata and `well_features`
    one (n_wells, D) matrix per stored variable, `lineage` JSON-able."""

    plate: str
    plate_version: str
    meta: pd.DataFrame
    embeddings: np.ndarray
    wells: pd.DataFrame
    well_features: dict[str, np.ndarray]
    feature_names: list[str]
    lineage: dict


def _coordinate_values(values: pd.Series) -> np.ndarray:
    """A manifest column as a coordinate: strings as variable-length (object) arrays, lists joined by ","."""
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        return np.array([",".join(v) if isinstance(v, (list, tuple, np.ndarray)) else str(v) for v in values],
                        dtype=object)
    return values.to_numpy()


def entry_datasets(key: str, entry: PlateFeatures):
    """(fields Dataset, wells Dataset) of an entry, as stored."""
    import xarray as xr

    features = np.array(entry.feature_names, dtype=object)
    attrs = {"cellfm": entry.lineage, "key": key, "plate": entry.plate, "plate_version": entry.plate_version}
    field_coords = {c: ("field", _coordinate_values(entry.meta[c])) for c in FIELD_COORDS
                    if c in entry.meta.columns and c != "field"}
    fields = xr.Dataset({"embedding": (("field", "feature"), entry.embeddings.astype(np.float32))},
                        coords={"field": entry.meta["field"].to_numpy(), "feature": features, **field_coords}, attrs=attrs)
    well_coords = {c: ("well", _coordinate_values(entry.wells[c])) for c in FIELD_COORDS
                   if c in entry.wells.columns and c not in FIELD_ONLY and c != "well"}
    well_variables = {name: (("well", "feature"), matrix.astype(np.float32)) for name, matrix in entry.well_features.items()}
    wells = xr.Dataset(well_variables,
                       coords={"well": _coordinate_values(entry.wells["well"]), "feature": features, **well_coords},
                       attrs=attrs)
    return fields, wells


def entry_digest(fields, wells) -> str:
    """sha256 of an entry's contents (every variable and coordinate: name, dtype, shape, values), the
    same for the same features whatever run wrote them."""
    digest = hashlib.sha256()
    for prefix, ds in (("fields", fields), ("wells", wells)):
        for name in sorted(map(str, ds.variables)):
            values = np.asarray(ds[name].values)
            digest.update(f"{prefix}/{name}/{values.shape}/{values.dtype.kind}\n".encode())
            if values.dtype == object or values.dtype.kind in "UT":
                digest.update("\0".join(map(str, values.ravel())).encode())
            else:
                digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def metadata_columns(meta: pd.DataFrame, level: str) -> pd.DataFrame:
    """Manifest metadata as pycytominer/copairs columns: Metadata_Plate/Well/Field, Metadata_<column>
    for the rest, and Metadata_pert_type (negcon | trt)."""
    columns = [c for c in FIELD_COORDS if c in meta.columns and (level == "field" or c not in FIELD_ONLY)]
    out = pd.DataFrame({PARQUET_NAMES.get(c, f"Metadata_{c}"): _coordinate_values(meta[c]) for c in columns})
    out[PERT_TYPE] = np.where(meta["is_control"].to_numpy(dtype=bool), "negcon", "trt")
    return out


def write_parquet(path: Path, meta: pd.DataFrame, features: np.ndarray, feature_names: list[str], lineage: str,
                  level: str) -> None:
    """The pycytominer/copairs table: metadata_columns + one float32 column per feature, lineage in the
    schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(metadata_columns(meta, level), preserve_index=False)
    for i, name in enumerate(feature_names):
        table = table.append_column(name, pa.array(features[:, i].astype(np.float32)))
    pq.write_table(table.replace_schema_metadata({b"cellfm": lineage.encode()}), path)


def write_run_files(folder: Path, entry: PlateFeatures, fields_ds, wells_ds) -> None:
    """An entry's files in a local folder: the two Zarr Datasets and the Parquet exports."""
    import zarr.storage

    fields_ds.to_zarr(zarr.storage.LocalStore(folder / "fields.zarr"), mode="w", zarr_format=3, consolidated=True)
    wells_ds.to_zarr(zarr.storage.LocalStore(folder / "wells.zarr"), mode="w", zarr_format=3, consolidated=True)
    lineage = json.dumps(entry.lineage, sort_keys=True)
    write_parquet(folder / "fields.parquet", entry.meta, entry.embeddings, entry.feature_names, lineage, level="field")
    for name, matrix in entry.well_features.items():
        write_parquet(folder / f"wells_{name}.parquet", entry.wells, matrix, entry.feature_names, lineage, level="well")


def coordinates_frame(ds, dim: str) -> pd.DataFrame:
    """The coordinates along `dim` as a DataFrame with the manifest's column names."""
    columns = {}
    for name in FIELD_COORDS:
        if name in ds.coords and ds[name].dims == (dim,):
            values = ds[name].values
            columns[name] = values.astype(object) if values.dtype.kind in "UT" else values
    return pd.DataFrame(columns)

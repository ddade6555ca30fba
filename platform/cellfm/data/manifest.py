"""The field manifest: one Parquet row per field, with the perturbation metadata OME-Zarr has no slot for.

Columns (``MANIFEST_COLUMNS``, in this order; extra columns are kept after them):
``channel_names``/``channel_groups`` are ``list<string>`` (group "context" or "concept", per C3R),
``field``/``height``/``width`` int64, ``is_control`` bool, ``dose`` float64, the rest strings.

Optional columns with a fixed type when present (``OPTIONAL_COLUMNS``), written after the required
ones: ``original_uris`` (``list<string>``: the source files a field was ingested from),
``localization`` (HPA-style subcellular class of the concept channel), ``compound_split``
(``train``/``heldout`` compounds for MoA evaluation), ``target``, ``site`` (the source's own
site/field id). Plates registered in place (``cellfm ingest --layout ome-zarr``) add
``channel_labels`` (``list<string>``: the plate array's channels in array order under the names the
manifest uses, "" for a channel left out; readers take them instead of omero's labels, which may
be missing or named otherwise), ``acquisition`` (the HCS acquisition id of the field), ``size_z``
(z-planes of the field) and ``content_version`` (the plate's content version when registered, as
the feature store computes it). Any other extra column is kept with an inferred type.

Manifests may live on object stores: ``read_manifest``/``write_manifest`` take ``s3://`` (any
fsspec URL) with ``storage_options``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellfm.config import CHANNEL_GROUPS
from cellfm.data.plate import PlateError, plate_channel_names, plate_wells, redact
from cellfm.storage import replacing, write_file

MANIFEST_COLUMNS: tuple[str, ...] = ("source", "plate", "well", "row", "col", "field", "store_uri",
    "channel_names", "channel_groups", "height", "width", "dtype",
    "perturbation_id", "moa", "is_control", "dose", "cell_line", "batch")

OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "original_uris": pa.list_(pa.string()),
    "localization": pa.string(),
    "compound_split": pa.string(),
    "target": pa.string(),
    "site": pa.string(),
    "channel_labels": pa.list_(pa.string()),
    "acquisition": pa.string(),
    "size_z": pa.int64(),
    "content_version": pa.string(),
}
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
    list_columns = [*_LIST_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in df.columns
                                      and OPTIONAL_COLUMNS[c] == pa.list_(pa.string()))]
    for col in list_columns:
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


def _is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def write_manifest(df: pd.DataFrame, path: str | Path, storage_options: dict | None = None) -> Path | str:
    """Validate and write a manifest whole (`cellfm.storage`: locally a temp file in the same folder renamed
    over it, remotely one PUT), so readers never see a half-written file and a failed write leaves the
    previous version intact. ``storage_options`` reach the fsspec filesystem of a remote URL (``s3://...``).
    """
    where = f"manifest {str(path)!r}"
    df = _validate(df, where)
    columns = {}
    for name in df.columns:
        try:
            arrow_type = (_SCHEMA.field(name).type if name in MANIFEST_COLUMNS
                          else OPTIONAL_COLUMNS.get(name))  # other extras: inferred
            columns[name] = pa.array(df[name].tolist(), type=arrow_type)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest {str(path)!r}: column {name!r} cannot be stored: {exc}") from exc
    table = pa.table(columns)
    remote = _is_remote(path)
    try:
        if remote:
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            write_file(path, buffer.getvalue(), storage_options)
            return path
        path = Path(str(path).removeprefix("file://"))
        with replacing(path) as tmp:
            pq.write_table(table, tmp)
        return path
    except Exception as exc:
        if not (remote or isinstance(exc, OSError)):
            raise
        raise ManifestError(f"{where}: cannot write: {redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc


def read_manifest(path: str | Path, storage_options: dict | None = None) -> pd.DataFrame:
    """Read and validate a manifest (local path or fsspec URL); list columns come back as lists of str."""
    if _is_remote(path):
        import fsspec

        try:
            with fsspec.open(path, "rb", **(storage_options or {})) as src:
                data = src.read()
        except FileNotFoundError as exc:
            raise ManifestError(f"manifest not found: {path}") from exc
        except Exception as exc:
            raise ManifestError(f"manifest {path!r}: cannot read: "
                                f"{redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
        try:
            df = pq.read_table(io.BytesIO(data)).to_pandas()
        except Exception as exc:
            raise ManifestError(f"manifest {path!r} is not a readable Parquet file: {exc}") from exc
        return _validate(df, f"manifest {path!r}")
    path = Path(str(path).removeprefix("file://"))
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise ManifestError(f"manifest {str(path)!r} is not a readable Parquet file: {exc}") from exc
    return _validate(df, f"manifest {str(path)!r}")


def check_manifest_against_plates(df: pd.DataFrame, storage_options=None) -> None:
    """Verify every plate in ``df`` opens, lists each row's well and field, and has each row's channels;
    ``PlateError`` lists every problem (one line each, naming plate/well/field).

    Reads only plate metadata (one plate's channel list and well list per store), so it is cheap
    enough to run on the driver before any worker starts reading pixels.
    """
    problems = manifest_problems(df, storage_options, deep=False)
    if problems:
        raise PlateError("\n".join(first_problems(problems)))


def first_problems(problems: list[str], limit: int = 20) -> list[str]:
    """At most ``limit`` problem lines, and one saying how many more there are."""
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def manifest_problems(df: pd.DataFrame, storage_options=None, where: str = "manifest", deep: bool = True) -> list[str]:
    """Every inconsistency between a manifest and its plates (not just the first), as messages
    naming plate/well/field: unreadable plates, wells or fields the plate lacks, channels the
    plate lacks, and (``deep``: opening every field's array) height/width/dtype differing from the
    stored field arrays.
    """
    from cellfm.data.plate import axis_names, ome_attrs, open_group, open_store

    problems: list[str] = []
    for store_uri, rows in df.groupby("store_uri", sort=False):
        try:
            available = (list(rows["channel_labels"].iloc[0]) if "channel_labels" in rows.columns
                         else plate_channel_names(store_uri, storage_options))
            well_paths, field_count = plate_wells(store_uri, storage_options)
        except PlateError as exc:
            problems.append(f"{where}: {exc} (referenced by {len(rows)} manifest row(s))")
            continue
        wells = set(well_paths)
        for row in rows.itertuples(index=False):
            at = f"plate {store_uri!r} ({row.plate}), well {row.well}, field {row.field}"
            if f"{row.row}/{row.col}" not in wells:
                problems.append(f"{at}: well not in the plate (plate lists {len(wells)} wells)")
                continue
            if row.field < 0 or (field_count is not None and row.field >= field_count):
                problems.append(f"{at}: field index outside the plate's {field_count} fields")
                continue
            missing = [name for name in row.channel_names if name not in available]
            if missing:
                problems.append(f"{at}: channel(s) {missing} not in plate; available channels: {available}")
            if not deep:
                continue
            try:
                group = open_group(open_store(store_uri, "r", storage_options), f"{row.row}/{row.col}/{row.field}")
                ome = ome_attrs(group)
                array = group[ome["multiscales"][0]["datasets"][0]["path"]]
                axes = axis_names(ome["multiscales"][0])
                height, width = array.shape[axes.index("y")], array.shape[axes.index("x")]
                if (height, width) != (row.height, row.width):
                    problems.append(f"{at}: manifest says {row.height} x {row.width} pixels, "
                                    f"plate stores {height} x {width}")
                if str(array.dtype) != row.dtype:
                    problems.append(f"{at}: manifest says dtype {row.dtype}, plate stores {array.dtype}")
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                problems.append(f"{at}: cannot open field array: {redact(f'{type(exc).__name__}: {exc}', storage_options)}")
    return problems


def manifest_unchanged(df: pd.DataFrame, path: str | Path, storage_options: dict | None = None) -> bool:
    """Whether the manifest at ``path`` already holds exactly ``df`` (what ``write_manifest`` would write):
    a rerun that would write the same file can write nothing."""
    try:
        old = read_manifest(path, storage_options)
    except ManifestError:
        return False
    new = _validate(df, f"manifest {str(path)!r}")
    if list(old.columns) != list(new.columns) or len(old) != len(new):
        return False

    def records(frame: pd.DataFrame) -> str:
        import json

        return json.dumps(frame.to_dict("records"), default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))

    return records(old) == records(new)


WELL_KEYS = ["plate", "well"]
_WELL_LABEL_COLUMNS = ("moa", "perturbation_id", "is_control", "localization", "compound_split")


def well_meta(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per (plate, well), sorted, with the manifest's label columns: the row order of every per-well
    feature table built outside the pipeline (ceilings, the CellProfiler-style baseline)."""
    columns = [*WELL_KEYS, *(c for c in _WELL_LABEL_COLUMNS if c in manifest.columns)]
    return manifest[columns].drop_duplicates(WELL_KEYS).sort_values(WELL_KEYS).reset_index(drop=True)

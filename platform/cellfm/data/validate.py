"""Validation at the edge: every problem in a plate store or manifest, each naming plate/well/field.

``plate_problems`` walks an OME-Zarr HCS plate (plate -> wells -> fields -> arrays) and collects
every problem instead of stopping at the first: malformed or missing OME metadata, duplicate wells
or fields, channel labels that disagree with the array, unsupported dtypes, fields whose shape or
channels differ from the rest of the plate, missing shards and (with ``deep=True``) corrupt or
unreadable chunks. ``open_plate`` runs the metadata checks (and, given a manifest, the manifest
checks) and raises one ``PlateError`` listing them all; ``validate_target`` is what
``jobs/validate.py`` runs on a plate, a manifest or a folder of them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from cellfm.data.manifest import ManifestError, manifest_problems, read_manifest
from cellfm.data.plate import (NO_CHANNEL_LABELS, READ_VERSIONS, SUPPORTED_DTYPES, PlateError, axis_names, ome_attrs,
                               open_group, open_store, plate_location, redact)


@dataclass(frozen=True)
class PlateInfo:
    """What ``open_plate`` found in a valid plate."""

    uri: str
    name: str
    wells: list[str]            # "B/03" paths in metadata order
    field_count: int
    channel_names: list[str]
    field_shape: tuple[int, int]
    dtype: str


def _err(exc: BaseException, storage_options) -> str:
    return redact(f"{type(exc).__name__}: {exc}", storage_options)


def _field_problems(uri: str, root, row: str, col: str, field_path: str, deep: bool, storage_options,
                    seen: dict, labels_given: bool = False) -> list[str]:
    """Problems of one field image; records its (channels, shape, dtype) in ``seen``. ``labels_given``:
    a manifest names the channels (``channel_labels``), so missing omero labels are no problem."""
    where = plate_location(uri, row, col, field_path)
    try:
        group = root[f"{row}/{col}/{field_path}"]
        ome = ome_attrs(group)
    except Exception as exc:  # noqa: BLE001
        return [f"{where}: field image group missing or unreadable: {_err(exc, storage_options)}"]
    if not isinstance(ome, dict) or "multiscales" not in ome:
        return [f"{where}: no OME 'multiscales' metadata"]
    problems = []
    if ome.get("version") not in READ_VERSIONS:
        problems.append(f"{where}: OME version {ome.get('version')!r}, expected one of {READ_VERSIONS}")
    try:
        multiscale = ome["multiscales"][0]
        axes = axis_names(multiscale)
        array_path = multiscale["datasets"][0]["path"]
    except (KeyError, IndexError, TypeError) as exc:
        return problems + [f"{where}: malformed multiscales metadata ({type(exc).__name__}: {exc})"]
    try:
        array = group[array_path]
    except Exception as exc:  # noqa: BLE001
        return problems + [f"{where}: image array {array_path!r} missing or unreadable: {_err(exc, storage_options)}"]
    if not isinstance(array, zarr.Array):
        return problems + [f"{where}: image path {array_path!r} is not an array"]
    if len(axes) != array.ndim:
        return problems + [f"{where}: {len(axes)} axes {axes} for an array of {array.ndim} dimensions"]
    if not {"c", "y", "x"} <= set(axes):
        return problems + [f"{where}: axes {axes} lack one of c, y, x"]
    unknown = [a for a in axes if a not in ("t", "c", "z", "y", "x")]
    if unknown:
        problems.append(f"{where}: unknown axis/axes {unknown} (axes {axes}); OME-Zarr images have axes among t, c, z, y, x")
    # A z-stack is read as one plane or a projection (data.z_plane / data.z_projection); a time series is no field.
    extra = [(a, s) for a, s in zip(axes, array.shape) if a not in ("c", "y", "x", "z") and s != 1]
    if extra:
        problems.append(f"{where}: non-singleton axes besides c, z, y, x: {extra}")
    labels = [ch.get("label") for ch in ome.get("omero", {}).get("channels", [])]
    n_channels = array.shape[axes.index("c")]
    if labels_given:
        labels = labels or [f"C{i}" for i in range(n_channels)]
    elif not labels:
        problems.append(f"{where}: {NO_CHANNEL_LABELS}")
    elif len(labels) != n_channels:
        problems.append(f"{where}: omero lists {len(labels)} channel labels {labels} "
                        f"but the array has {n_channels} channels")
    if any(not label for label in labels) or len(set(labels)) != len(labels):
        problems.append(f"{where}: channel labels must be non-empty and unique, got {labels}")
    dtype = str(array.dtype)
    if dtype not in SUPPORTED_DTYPES:
        problems.append(f"{where}: dtype {dtype} not supported (use one of {SUPPORTED_DTYPES})")
    shape = (int(array.shape[axes.index("y")]), int(array.shape[axes.index("x")]))
    signature = (tuple(labels), shape, dtype)
    if "first" not in seen:
        seen["first"] = (signature, where)
    elif signature != seen["first"][0]:
        (labels0, shape0, dtype0), where0 = seen["first"]
        problems.append(f"{where}: channels {list(labels)} / shape {shape} / dtype {dtype} differ from "
                        f"{where0} (channels {list(labels0)} / shape {shape0} / dtype {dtype0})")
    if deep:
        try:
            data = array[...]
            if not np.any(data != array.fill_value) and array.nchunks_initialized == 0:
                problems.append(f"{where}: field has no stored data (missing shard)")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{where}: corrupt or unreadable chunk: {_err(exc, storage_options)}")
    return problems


def plate_problems(uri: str, storage_options: dict | None = None, deep: bool = True,
                   labels_given: bool = False) -> list[str]:
    """Every problem found in the plate at ``uri`` (empty list: valid).

    ``deep=False`` checks metadata only; ``deep=True`` also decodes every chunk (checksums catch
    corruption) and reports fields whose shard is missing. ``labels_given``: a manifest names the
    plate's channels, so fields without omero labels are fine.
    """
    try:
        root = open_group(open_store(uri, "r", storage_options))
        ome = ome_attrs(root)
    except Exception as exc:  # noqa: BLE001
        return [f"{plate_location(uri)}: cannot open plate: {_err(exc, storage_options)}"]
    if not isinstance(ome, dict) or "plate" not in ome:
        return [f"{plate_location(uri)}: no OME 'plate' metadata (not an OME-Zarr HCS plate)"]
    problems = []
    if ome.get("version") not in READ_VERSIONS:
        problems.append(f"{plate_location(uri)}: OME version {ome.get('version')!r}, expected one of {READ_VERSIONS}")
    plate = ome["plate"]
    try:
        rows = [r["name"] for r in plate["rows"]]
        cols = [c["name"] for c in plate["columns"]]
        wells = plate["wells"]
    except (KeyError, TypeError) as exc:
        return problems + [f"{plate_location(uri)}: malformed plate metadata ({type(exc).__name__}: {exc})"]
    for kind, names in (("row", rows), ("column", cols)):
        dupes = sorted(n for n, k in Counter(names).items() if k > 1)
        if dupes:
            problems.append(f"{plate_location(uri)}: duplicate {kind} names {dupes}")
    paths = [w.get("path", "") for w in wells]
    for path, count in Counter(paths).items():
        if count > 1:
            row, _, col = path.partition("/")
            problems.append(f"{plate_location(uri, row, col)}: duplicate well (listed {count} times in the plate metadata)")
    field_count = plate.get("field_count")
    seen: dict = {}
    for well in wells:
        path = well.get("path", "")
        row, _, col = path.partition("/")
        where = plate_location(uri, row, col)
        if not row or not col or "/" in col:
            problems.append(f"{plate_location(uri)}: well path {path!r} is not 'row/column'")
            continue
        ri, ci = well.get("rowIndex"), well.get("columnIndex")
        if not (isinstance(ri, int) and 0 <= ri < len(rows) and rows[ri] == row
                and isinstance(ci, int) and 0 <= ci < len(cols) and cols[ci] == col):
            problems.append(f"{where}: rowIndex/columnIndex ({ri}, {ci}) do not point at row {row!r}, column {col!r}")
        try:
            well_ome = ome_attrs(root[path])
            images = [im["path"] for im in well_ome["well"]["images"]]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{where}: well group or its 'well' metadata missing: {_err(exc, storage_options)}")
            continue
        for image_path, count in Counter(images).items():
            if count > 1:
                problems.append(f"{plate_location(uri, row, col, image_path)}: duplicate field (listed {count} times)")
        if field_count is not None and len(images) > int(field_count):
            problems.append(f"{where}: {len(images)} fields but the plate's field_count is {field_count}")
        for image_path in dict.fromkeys(images):
            problems += _field_problems(uri, root, row, col, image_path, deep, storage_options, seen, labels_given)
    return problems


def open_plate(uri: str, storage_options: dict | None = None, manifest: pd.DataFrame | None = None,
               deep: bool = False) -> PlateInfo:
    """Open a plate after checking its OME metadata (and ``manifest``'s rows for this plate against
    it); raise one ``PlateError`` listing every problem, each naming plate/well/field."""
    problems = plate_problems(uri, storage_options, deep=deep)
    if manifest is not None and not problems:
        rows = manifest[manifest["store_uri"] == uri]
        problems += manifest_problems(rows, storage_options)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise PlateError(f"{plate_location(uri)}: {len(problems)} problem(s):\n  {shown}{more}")
    root = open_group(open_store(uri, "r", storage_options))
    plate = ome_attrs(root)["plate"]
    wells = [w["path"] for w in plate["wells"]]
    first = ome_attrs(root[wells[0]])["well"]["images"][0]["path"]
    group = root[f"{wells[0]}/{first}"]
    ome = ome_attrs(group)
    array = group[ome["multiscales"][0]["datasets"][0]["path"]]
    axes = axis_names(ome["multiscales"][0])
    return PlateInfo(
        uri=uri, name=str(plate.get("name", "")), wells=wells,
        field_count=int(plate.get("field_count") or len(ome_attrs(root[wells[0]])["well"]["images"])),
        channel_names=[c["label"] for c in ome["omero"]["channels"]],
        field_shape=(int(array.shape[axes.index("y")]), int(array.shape[axes.index("x")])), dtype=str(array.dtype),
    )


def _resolve_store_uris(df: pd.DataFrame, manifest_path: str) -> pd.DataFrame:
    if "://" in manifest_path:
        return df
    base = Path(manifest_path).resolve().parent
    df = df.copy()
    df["store_uri"] = [u if "://" in u or Path(u).is_absolute() else str(base / u) for u in df["store_uri"]]
    return df


def manifest_target_problems(path: str, storage_options: dict | None = None, deep: bool = True) -> list[str]:
    """Every problem of a manifest file and of the plates it references."""
    try:
        df = read_manifest(path, storage_options)
    except ManifestError as exc:
        return [str(exc)]
    df = _resolve_store_uris(df, path)
    problems = []
    for store_uri, rows in df.groupby("store_uri", sort=False):
        labels_given = "channel_labels" in rows.columns
        problems += plate_problems(store_uri, storage_options, deep=deep, labels_given=labels_given)
    return problems + manifest_problems(df, storage_options, where=f"manifest {path!r}")


def _is_plate(target: str, storage_options) -> bool:
    try:
        return "plate" in ome_attrs(open_group(open_store(target, "r", storage_options)))
    except Exception:  # noqa: BLE001
        return False


def validate_target(target: str, storage_options: dict | None = None, deep: bool = True) -> tuple[list[str], list[str]]:
    """Validate a plate, a manifest, or a local folder holding plates (``*.zarr``) and manifests
    (``*.parquet``). Returns (what was checked, every problem found)."""
    if target.endswith(".parquet"):
        return [target], manifest_target_problems(target, storage_options, deep)
    if _is_plate(target, storage_options) or target.rstrip("/").endswith(".zarr"):
        return [target], plate_problems(target, storage_options, deep)
    folder = Path(target)
    if "://" not in target and folder.is_dir():
        plates = sorted(str(p) for p in folder.rglob("*.zarr")
                        if p.is_dir() and ((p / "zarr.json").is_file() or (p / ".zattrs").is_file()))
        manifests = sorted(str(p) for p in folder.rglob("*.parquet") if not p.name.startswith("."))
        problems = []
        for plate in plates:
            problems += plate_problems(plate, storage_options, deep)
        for manifest in manifests:
            try:
                df = _resolve_store_uris(read_manifest(manifest), manifest)
                problems += manifest_problems(df, storage_options, where=f"manifest {manifest!r}")
            except ManifestError as exc:
                problems.append(str(exc))
        if not plates and not manifests:
            problems.append(f"{target!r}: no plates (*.zarr) or manifests (*.parquet) found")
        return plates + manifests, problems
    return [target], [f"{target!r}: not a plate, a manifest (.parquet) or a folder of them"]

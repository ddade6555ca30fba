"""Metadata joined to fields: metadata tables (CSV / TSV / Parquet, platemaps and well tables of CPG, JUMP /
pycytominer or the manifest's own column names) looked up per (plate, well), and the manifest's
perturbation columns drawn from a joined record (`perturbation_meta`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cellfm.data.ingest.plan import IngestError, split_well
from cellfm.data.plate import redact
from cellfm.storage import filesystem


def read_table(path: str | Path) -> pd.DataFrame:
    """A local CSV (TSV for .tsv / .txt) as strings; IngestError naming the file when missing or unreadable."""
    path = str(path)
    sep = "\t" if path.endswith((".tsv", ".txt")) else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise IngestError(f"metadata table not found: {path}") from None
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"metadata table {path}: cannot read: {type(exc).__name__}: {exc}") from exc


def first_value(record: Mapping[str, Any], names: Sequence[str], default: Any = "") -> Any:
    """The first of `names` that `record` holds a non-empty value for, else `default`."""
    for name in names:
        value = record.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != "":
            return value
    return default


def to_float(value: Any) -> float:
    """`value` as a float; NaN when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# Metadata columns perturbation_meta turns into manifest columns (not kept again as extra columns).
PERTURBATION_SOURCE_COLUMNS = frozenset({
    "perturbation_id", "broad_sample", "Metadata_broad_sample", "pert_iname", "is_control", "target", "gene",
    "Metadata_target", "Metadata_gene", "moa", "Metadata_moa", "dose", "mmoles_per_liter",
    "Metadata_mmoles_per_liter", "concentration", "cell_line", "Metadata_cell_line", "cell_type", "batch",
    "Metadata_Batch"})


def perturbation_meta(record: Mapping[str, Any], cell_line: str = "", batch: str = "") -> dict[str, Any]:
    """Manifest perturbation columns from a joined metadata record (CPG / JUMP column names or the
    manifest's own). A well without a treatment (empty ``broad_sample``) or with ``control_type``
    ``negcon`` is a negative control; positive controls are not."""
    if not record:  # no metadata for this well: treatment unknown (not a control)
        return {"perturbation_id": "", "moa": "", "is_control": False, "dose": float("nan"),
                "cell_line": cell_line, "batch": batch, "target": ""}
    pert = str(first_value(record, ("perturbation_id", "broad_sample", "Metadata_broad_sample", "pert_iname")))
    control_type = str(first_value(record, ("control_type", "Metadata_control_type"))).lower()
    solvent = str(first_value(record, ("solvent", "Metadata_solvent"), "DMSO"))
    explicit = str(first_value(record, ("is_control",), "")).lower()
    is_control = explicit in ("true", "1", "yes") or (explicit == "" and (not pert or control_type == "negcon"))
    target = str(first_value(record, ("target", "gene", "Metadata_target", "Metadata_gene")))
    moa = str(first_value(record, ("moa", "Metadata_moa", "target", "gene")))
    dose = to_float(first_value(record, ("dose", "mmoles_per_liter", "Metadata_mmoles_per_liter", "concentration"),
                            float("nan")))
    if is_control:
        moa = moa if explicit else "control"
        pert = pert or solvent
        dose = 0.0 if math.isnan(dose) else dose
    return {
        "perturbation_id": pert, "moa": moa, "is_control": bool(is_control), "dose": dose,
        "cell_line": str(first_value(record, ("cell_line", "Metadata_cell_line", "cell_type"), cell_line)),
        "batch": str(first_value(record, ("batch", "Metadata_Batch"), batch)), "target": target,
    }


def well_lookup(table: pd.DataFrame | None) -> dict[tuple[str | None, str], dict]:
    """(plate or None, normalized well) -> record, from a table with a well column (and maybe plate)."""
    if table is None:
        return {}
    well_col = next((c for c in ("well", "well_position", "Metadata_Well", "Well") if c in table.columns), None)
    if well_col is None:
        raise IngestError(f"well metadata table has no well column (well, well_position, Metadata_Well); "
                          f"columns: {list(table.columns)}")
    plate_col = next((c for c in ("plate", "Metadata_Plate", "Assay_Plate_Barcode", "Plate") if c in table.columns),
                     None)
    lookup = {}
    for rec in table.to_dict("records"):
        row, col = split_well(rec[well_col], "well metadata table")
        lookup[(rec[plate_col] if plate_col else None), f"{row}{col}"] = rec
    return lookup


def join_well_metadata(plate: str, row: str, col: str, *lookups: dict, compounds: dict | None = None) -> dict[str, Any]:
    """The metadata of one well: the records of `lookups` (keyed by (plate, well), or (None, well) for every plate)
    merged in order, over the `compounds` record of its treatment (`broad_sample` / `perturbation_id`)."""
    record: dict[str, Any] = {}
    for lookup in lookups:
        record |= lookup.get((plate, f"{row}{col}"), lookup.get((None, f"{row}{col}"), {}))
    if compounds:
        pert = str(first_value(record, ("broad_sample", "perturbation_id", "Metadata_broad_sample")))
        record = compounds.get(pert, {}) | record
    return record


# Platemap column names of JUMP / pycytominer (and the manifest's own) for the join keys.
PLATEMAP_PLATE_COLUMNS = ("plate", "Metadata_Plate", "Assay_Plate_Barcode", "Plate")
PLATEMAP_WELL_COLUMNS = ("well", "Metadata_Well", "well_position", "Metadata_well_position", "Well")


def read_platemap(path: str | Path, column_map: Mapping[str, str] | None = None,
                  storage_options=None) -> pd.DataFrame:
    """A platemap (CSV / TSV / Parquet, local or fsspec URL) as strings, its columns renamed by
    ``column_map`` (their name -> ours, e.g. ``{"Barcode": "plate", "Pos": "well"}``)."""
    path = str(path)
    try:
        if path.endswith(".parquet"):
            fs, inner = filesystem(path, storage_options)
            with fs.open(inner, "rb") as src:
                table = pd.read_parquet(src)
            table = table.astype(str).replace({"nan": "", "None": ""})
        else:
            fs, inner = filesystem(path, storage_options)
            with fs.open(inner, "rb") as src:
                table = pd.read_csv(src, sep="\t" if path.endswith((".tsv", ".txt")) else ",", dtype=str,
                                    keep_default_na=False)
    except FileNotFoundError:
        raise IngestError(f"platemap not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any reader's error: the file is unreadable
        raise IngestError(f"platemap {path}: cannot read: {redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
    unknown = sorted(set(column_map or {}) - set(table.columns))
    if unknown:
        raise IngestError(f"platemap {path}: --column-map names column(s) {unknown} it lacks; columns: {list(table.columns)}")
    return table.rename(columns=dict(column_map or {}))


def platemap_lookup(table: pd.DataFrame, plates: Mapping[str, list[str]], where: str) -> dict[tuple[str, str], dict]:
    """(plate, well as the plate names it) -> platemap record, for every well of ``plates`` (plate -> wells).

    Wells match whatever their spelling ("B3", "B03", "r02c03"). Joined on plate + well, or on well
    alone for a platemap without a plate column (one layout for every plate). Refused (IngestError,
    one line per problem naming plate and well): a (plate, well) listed twice, a plate well the
    platemap lacks."""
    well_col = next((c for c in PLATEMAP_WELL_COLUMNS if c in table.columns), None)
    if well_col is None:
        raise IngestError(f"{where}: no well column (one of {list(PLATEMAP_WELL_COLUMNS)}; --column-map renames "
                          f"another); columns: {list(table.columns)}")
    plate_col = next((c for c in PLATEMAP_PLATE_COLUMNS if c in table.columns), None)
    records: dict[tuple[str | None, str], list[dict]] = defaultdict(list)
    for rec in table.to_dict("records"):
        records[(str(rec[plate_col]) if plate_col else None), "".join(split_well(rec[well_col], where))].append(rec)
    problems = []
    for (plate, well), recs in records.items():
        if len(recs) > 1 and (plate is None or plate in plates):
            problems.append(f"{where}: plate {plate if plate else '(every plate)'!r}, well {well}: listed "
                            f"{len(recs)} times (one row per plate and well)")
    lookup, missing = {}, defaultdict(list)
    for plate, wells in plates.items():
        for well in wells:
            key = (plate if plate_col else None), "".join(split_well(well, f"plate {plate!r}"))
            if key in records:
                lookup[plate, well] = records[key][0]
            else:
                missing[plate].append(well)
    for plate, wells in missing.items():
        problems.append(f"{where}: plate {plate!r}: {len(wells)} well(s) not in the platemap: "
                        f"{', '.join(wells[:10])}{' ...' if len(wells) > 10 else ''}")
    if problems:
        raise IngestError("\n".join(problems))
    return lookup


"""Ingestion: public screen layouts -> OME-Zarr plates + a Parquet manifest, in parallel on Ray, resumable;
and existing OME-Zarr plates registered in place (a manifest only).

Existing OME-Zarr HCS plates (0.4 on Zarr v2 or 0.5 on Zarr v3, local or ``s3://``) are registered
in place by ``plan_ome_zarr`` + ``register_ome_zarr``: every field of every well is listed from the
plate metadata (no pixel read, nothing copied), with channel names from ``omero.channels[].label``
or a channel map, and well metadata joined from a platemap (JUMP / pycytominer ``Metadata_Plate`` /
``Metadata_Well`` names, or a column map). Each plate's content version (the feature store's
listing digest) goes into the manifest, so a rerun on unchanged plates writes nothing and a changed
plate rewrites its rows.

Three layouts are planned into one ``IngestPlan`` (plates, and per field the source files of each
channel plus its perturbation metadata):

* ``plan_cpg``: Cell Painting Gallery style TIFF folders described by ``load_data.csv``
  (``FileName_Orig<Ch>``, ``PathName_Orig<Ch>``, ``Metadata_Plate/Well/Site``), a per-source channel
  mapping (``OrigDNA`` -> ``DNA`` ...), joined with CPG platemaps (``barcode_platemap.csv`` +
  ``platemap/<name>.txt``), compound metadata (``broad_sample`` -> name, target, MoA, control type) and
  any well-level table.
* ``plan_chammi``: CHAMMI single-cell strips, PNG/TIFF of ``H x (W*C)`` (channel ``k`` in columns
  ``k*W .. (k+1)*W``, ``W = channel_width``), described by ``enriched_meta.csv``
  (``file_path``, ``channel_width``, ``Label``, ``train_test_split``, plate/well columns ...).
* ``plan_generic``: a glob plus a filename regex with named groups ``plate``, ``well`` (or ``row`` and
  ``col``), ``site`` and ``channel``.

``run_ingestion`` writes the plan: one plate per source plate (``<out>/<plate>.zarr``, ``s3://`` or
local), each field by exactly one Ray task (one writer per shard). A field's shard is written in
one atomic operation (a local rename / one S3 PUT) and only then its completion marker
``<out>/_ingest_state/<plate>/<row><col>_<field>.json`` (holding the SHA-256 of the field's
pixels). A rerun skips fields whose marker exists and whose stored pixels still hash to it, and
writes the rest, so a run killed at any point finishes to the same plates as a clean run. The
manifest is written last, atomically.

Bad inputs raise ``IngestError`` naming plate/well/site/file: missing files, channel sets that
differ between fields of a plate, channels absent from the mapping, duplicate fields, images whose
shape or dtype differ from the plate's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellfm.data.manifest import MANIFEST_COLUMNS, write_manifest
from cellfm.data.plate import PlateError, create_plate, read_field, redact, write_field
from cellfm.data.stores import filesystem, join
from cellfm.progress import eta_seconds, format_duration

log = logging.getLogger(__name__)

CPG_CHANNEL_MAP: dict[str, str | None] = {
    "OrigDNA": "DNA", "OrigER": "ER", "OrigRNA": "RNA", "OrigAGP": "AGP", "OrigMito": "Mito",
}
# CHAMMI sub-datasets: channel order in the strips and which channel is the "concept" (C3R groups).
CHAMMI_CHANNELS: dict[str, list[str]] = {
    "CP": ["DNA", "ER", "RNA", "AGP", "Mito"],
    "HPA": ["Microtubules", "Protein", "Nucleus", "ER"],
    "Allen": ["Nucleus", "Membrane", "Protein"],
}
CONCEPT_CHANNELS = frozenset({"Protein"})
STATE_DIR = "_ingest_state"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class IngestError(ValueError):
    """Bad ingestion input; the message names plate/well/site/file."""


# ----------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Plane:
    """Where one channel plane of a field comes from."""

    uri: str
    channel: str
    strip_index: int | None = None   # CHAMMI strips: channel k in columns k*W .. (k+1)*W
    strip_width: int | None = None


@dataclass
class FieldSpec:
    plate: str
    row: str
    col: str
    field: int
    site: str
    planes: list[Plane]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.row}{self.col}_{self.field}"

    def where(self) -> str:
        return f"plate {self.plate!r}, well {self.row}{self.col}, site {self.site}"


@dataclass
class PlatePlan:
    name: str
    channel_names: list[str]
    channel_groups: list[str]
    wells: list[tuple[str, str]]
    n_fields: int
    shape: tuple[int, int]
    dtype: str

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class IngestPlan:
    source: str
    plates: dict[str, PlatePlan]
    fields: list[FieldSpec]


def split_well(well: str, where: str = "") -> tuple[str, str]:
    """("B", "03") from "B03", "B3", "b03" or "r02c03"; IngestError otherwise."""
    text = str(well).strip()
    match = re.fullmatch(r"([A-Za-z]{1,2})0*(\d{1,3})", text)
    if match:
        return match.group(1).upper(), f"{int(match.group(2)):02d}"
    match = re.fullmatch(r"[rR]0*(\d{1,3})[cC]0*(\d{1,3})", text)
    if match and int(match.group(1)) >= 1:
        index = int(match.group(1)) - 1
        row = chr(ord("A") + index) if index < 26 else "A" + chr(ord("A") + index - 26)
        return row, f"{int(match.group(2)):02d}"
    raise IngestError(f"{where}: cannot parse well name {well!r} (expected e.g. 'B03' or 'r02c03')")


def _check_plate_name(name: str, where: str) -> str:
    name = str(name).strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise IngestError(f"{where}: plate name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def _number_fields(rows: list[dict], where_kind: str = "site") -> list[dict]:
    """Give each (plate, well) its fields 0..n-1 in site order; check duplicates and raggedness."""
    by_well: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_well[r["plate"], r["row"], r["col"]].append(r)
    for (plate, row, col), items in by_well.items():
        sites = Counter(str(r["site"]) for r in items)
        dupes = [s for s, n in sites.items() if n > 1]
        if dupes:
            raise IngestError(f"plate {plate!r}, well {row}{col}, {where_kind} {dupes[0]}: duplicate field "
                              f"(listed {sites[dupes[0]]} times)")
        items.sort(key=lambda r: _site_key(r["site"]))
        for i, r in enumerate(items):
            r["field"] = i
    return rows


def _site_key(site: Any) -> tuple:
    text = str(site)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _probe(plane: Plane, where: str, storage_options) -> tuple[tuple[int, int], str]:
    """(H, W) and dtype of a plane (the plate's first), or IngestError naming `where` (plate, well,
    site) and the file."""
    try:
        image = _load_plane(plane, storage_options)
    except Exception as exc:  # noqa: BLE001 - any decoder's error: the file is unreadable
        raise IngestError(f"{where}, channel {plane.channel}, file {plane.uri}: cannot read the plate's first image "
                          f"(it sets the plate's field shape and dtype): "
                          f"{redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
    return tuple(int(s) for s in image.shape), str(image.dtype)


def _build_plan(source: str, rows: list[dict], channel_groups: Callable[[list[str]], list[str]],
                storage_options=None, check_files: bool = True) -> IngestPlan:
    """Rows (plate, row, col, site, planes, meta) -> IngestPlan, checking the inputs."""
    if not rows:
        raise IngestError(f"{source}: no fields found in the input")
    rows = _number_fields(rows)
    by_plate: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_plate[r["plate"]].append(r)
    if check_files:
        missing = [(r, p.uri) for r in rows for p in r["planes"] if "://" not in p.uri and not Path(p.uri).is_file()]
        if missing:
            shown = "; ".join(f"plate {r['plate']!r}, well {r['row']}{r['col']}, site {r['site']}: "
                              f"missing file {uri}" for r, uri in missing[:10])
            raise IngestError(f"{source}: {len(missing)} input file(s) missing: {shown}"
                              + (" ..." if len(missing) > 10 else ""))
    plates, fields = {}, []
    for plate, items in by_plate.items():
        first = items[0]
        channels = [p.channel for p in first["planes"]]
        if len(set(channels)) != len(channels):
            raise IngestError(f"plate {plate!r}, well {first['row']}{first['col']}, site {first['site']}: "
                              f"duplicate channel(s) {channels}")
        for r in items[1:]:
            these = [p.channel for p in r["planes"]]
            if set(these) != set(channels):
                raise IngestError(
                    f"plate {plate!r}, well {r['row']}{r['col']}, site {r['site']}: inconsistent channel set "
                    f"{sorted(these)}; well {first['row']}{first['col']} site {first['site']} of the same plate "
                    f"has {sorted(channels)} (missing {sorted(set(channels) - set(these))}, "
                    f"extra {sorted(set(these) - set(channels))}; first file {r['planes'][0].uri})")
            r["planes"] = sorted(r["planes"], key=lambda p: channels.index(p.channel))
        fields_per_well = Counter((r["row"], r["col"]) for r in items)
        if len(set(fields_per_well.values())) > 1:
            (row, col), n = min(fields_per_well.items(), key=lambda kv: kv[1])
            raise IngestError(f"plate {plate!r}, well {row}{col}: {n} field(s) while other wells of the plate have "
                              f"{max(fields_per_well.values())}; every well of a plate needs the same sites")
        shape, dtype = _probe(first["planes"][0], f"plate {plate!r}, well {first['row']}{first['col']}, "
                                                  f"site {first['site']}", storage_options)
        wells = list(dict.fromkeys((r["row"], r["col"]) for r in items))
        plates[plate] = PlatePlan(plate, channels, channel_groups(channels), wells,
                                  max(fields_per_well.values()), shape, dtype)
        fields += [FieldSpec(plate, r["row"], r["col"], r["field"], str(r["site"]), r["planes"], r["meta"])
                   for r in items]
    return IngestPlan(source, plates, fields)


def _default_groups(channels: list[str]) -> list[str]:
    return ["concept" if c in CONCEPT_CHANNELS else "context" for c in channels]


# ----------------------------------------------------------------------------------------------
# Metadata tables


def _read_table(path: str | Path) -> pd.DataFrame:
    path = str(path)
    sep = "\t" if path.endswith((".tsv", ".txt")) else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise IngestError(f"metadata table not found: {path}") from None
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"metadata table {path}: cannot read: {type(exc).__name__}: {exc}") from exc


def _first(record: Mapping[str, Any], names: Sequence[str], default: Any = "") -> Any:
    for name in names:
        value = record.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != "":
            return value
    return default


def _to_float(value: Any) -> float:
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
    pert = str(_first(record, ("perturbation_id", "broad_sample", "Metadata_broad_sample", "pert_iname")))
    control_type = str(_first(record, ("control_type", "Metadata_control_type"))).lower()
    solvent = str(_first(record, ("solvent", "Metadata_solvent"), "DMSO"))
    explicit = str(_first(record, ("is_control",), "")).lower()
    is_control = explicit in ("true", "1", "yes") or (explicit == "" and (not pert or control_type == "negcon"))
    target = str(_first(record, ("target", "gene", "Metadata_target", "Metadata_gene")))
    moa = str(_first(record, ("moa", "Metadata_moa", "target", "gene")))
    dose = _to_float(_first(record, ("dose", "mmoles_per_liter", "Metadata_mmoles_per_liter", "concentration"),
                            float("nan")))
    if is_control:
        moa = moa if explicit else "control"
        pert = pert or solvent
        dose = 0.0 if math.isnan(dose) else dose
    return {
        "perturbation_id": pert, "moa": moa, "is_control": bool(is_control), "dose": dose,
        "cell_line": str(_first(record, ("cell_line", "Metadata_cell_line", "cell_type"), cell_line)),
        "batch": str(_first(record, ("batch", "Metadata_Batch"), batch)), "target": target,
    }


def _cpg_platemaps(platemaps: str | Path | None) -> dict[str, pd.DataFrame]:
    """Plate barcode -> platemap table, from a CPG ``metadata/platemaps/<batch>/`` folder."""
    if platemaps is None:
        return {}
    folder = Path(platemaps)
    barcode = _read_table(folder / "barcode_platemap.csv")
    maps: dict[str, pd.DataFrame] = {}
    out = {}
    for rec in barcode.to_dict("records"):
        name = rec["Plate_Map_Name"]
        if name not in maps:
            candidates = [folder / "platemap" / f"{name}{ext}" for ext in (".txt", ".tsv", ".csv")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise IngestError(f"plate {rec['Assay_Plate_Barcode']!r}: platemap {name!r} not found under "
                                  f"{folder / 'platemap'}")
            maps[name] = _read_table(found)
        out[rec["Assay_Plate_Barcode"]] = maps[name]
    return out


def _well_lookup(table: pd.DataFrame | None) -> dict[tuple[str | None, str], dict]:
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


def _join(plate: str, row: str, col: str, *lookups: dict, compounds: dict | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for lookup in lookups:
        record |= lookup.get((plate, f"{row}{col}"), lookup.get((None, f"{row}{col}"), {}))
    if compounds:
        pert = str(_first(record, ("broad_sample", "perturbation_id", "Metadata_broad_sample")))
        record = compounds.get(pert, {}) | record
    return record


def _compound_lookup(path: str | Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    table = _read_table(path)
    key = next((c for c in ("broad_sample", "perturbation_id", "Metadata_broad_sample") if c in table.columns), None)
    if key is None:
        raise IngestError(f"compound metadata {path}: no broad_sample / perturbation_id column; "
                          f"columns: {list(table.columns)}")
    return {rec[key]: rec for rec in table.to_dict("records")}


# ----------------------------------------------------------------------------------------------
# Layouts


def plan_cpg(load_data: str | Path | Sequence[str | Path], channel_map: Mapping[str, str | None] | None = None,
             image_root: str | Path | None = None, platemaps: str | Path | None = None,
             compound_metadata: str | Path | None = None, well_metadata: str | Path | None = None,
             source: str = "cpg", cell_line: str = "", batch: str = "", storage_options=None) -> IngestPlan:
    """Plan a Cell Painting Gallery style screen from one or more ``load_data.csv`` files.

    ``channel_map`` maps load_data channel suffixes (``OrigDNA``) to stain names; a suffix mapped
    to None is skipped; a suffix absent from the map is an error. Files are
    ``PathName_<Ch>/FileName_<Ch>``, or ``image_root/FileName_<Ch>`` when ``image_root`` is given.
    """
    channel_map = dict(CPG_CHANNEL_MAP if channel_map is None else channel_map)
    paths = [load_data] if isinstance(load_data, (str, Path)) else list(load_data)
    tables = []
    for path in paths:
        table = _read_table(path)
        table["_load_data"] = str(path)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    for needed in ("Metadata_Plate", "Metadata_Well", "Metadata_Site"):
        if needed not in table.columns:
            raise IngestError(f"load_data {paths[0]}: missing column {needed!r}; columns: {list(table.columns)[:20]}")
    suffixes = [c[len("FileName_"):] for c in table.columns if c.startswith("FileName_")]
    if not suffixes:
        raise IngestError(f"load_data {paths[0]}: no FileName_<channel> columns")
    first = table.iloc[0]
    for suffix in suffixes:
        if suffix not in channel_map:
            raise IngestError(
                f"plate {first['Metadata_Plate']!r}, well {first['Metadata_Well']}, site {first['Metadata_Site']}: "
                f"channel {suffix!r} (file {first[f'FileName_{suffix}']}) is not in the channel mapping "
                f"{sorted(channel_map)}; map it to a stain name or to null to skip it")
        if image_root is None and f"PathName_{suffix}" not in table.columns:
            raise IngestError(f"load_data {paths[0]}: FileName_{suffix} has no PathName_{suffix} column "
                              f"(or pass image_root)")
    kept = [s for s in channel_map if s in suffixes and channel_map[s]]  # plate channel order: the map's
    names = [channel_map[s] for s in kept]
    if len(set(names)) != len(names):
        raise IngestError(f"channel mapping sends several load_data channels to one name: "
                          f"{dict(zip(kept, names))}")
    plate_maps = _cpg_platemaps(platemaps)
    compounds = _compound_lookup(compound_metadata)
    wells_table = _well_lookup(_read_table(well_metadata)) if well_metadata else {}
    rows = []
    for rec in table.to_dict("records"):
        plate = _check_plate_name(rec["Metadata_Plate"], f"load_data {rec['_load_data']}")
        where = f"plate {plate!r}, well {rec['Metadata_Well']}, site {rec['Metadata_Site']}"
        row, col = split_well(rec["Metadata_Well"], where)
        planes = []
        for suffix, name in zip(kept, names):
            filename = rec.get(f"FileName_{suffix}", "")
            if not filename:
                raise IngestError(f"{where}: empty FileName_{suffix}")
            base = str(image_root) if image_root is not None else rec[f"PathName_{suffix}"]
            planes.append(Plane(join(base, filename) if "://" in base else str(Path(base) / filename), name))
        platemap = _well_lookup(plate_maps[plate]) if plate in plate_maps else {}
        joined = _join(plate, row, col, platemap, wells_table, compounds=compounds)
        meta = perturbation_meta(joined, cell_line, batch) | {"site": str(rec["Metadata_Site"])}
        rows.append({"plate": plate, "row": row, "col": col, "site": rec["Metadata_Site"], "planes": planes,
                     "meta": meta})
    return _build_plan(source, rows, _default_groups, storage_options)


def plan_chammi(root: str | Path, meta_csv: str = "enriched_meta.csv", subset: str | None = None,
                channel_names: Sequence[str] | None = None, plate_column: str = "Plate", well_column: str = "Well",
                label_column: str = "Label", source: str = "chammi", storage_options=None) -> IngestPlan:
    """Plan a CHAMMI sub-dataset folder: ``root/enriched_meta.csv`` + strip images under ``root``'s
    parent (``file_path`` is relative to the CHAMMI root, e.g. ``CP/...``) or under ``root``.

    Each crop becomes one field of its (plate, well), in ``file_path`` order. ``Label`` goes to
    ``moa`` (and ``perturbation_id`` unless a ``Treatment`` column exists); ``cell_type`` to
    ``cell_line``; ``train_test_split`` is kept as a column.
    """
    root = Path(root)
    table = _read_table(root / meta_csv)
    needed = ["file_path", "channel_width", plate_column, well_column, label_column]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise IngestError(f"{root / meta_csv}: missing column(s) {missing} (columns: {list(table.columns)}); "
                          f"set plate_column / well_column / label_column for this file")
    subset = subset or root.name
    channels = list(channel_names or CHAMMI_CHANNELS.get(subset, []))
    if not channels:
        raise IngestError(f"{root}: unknown CHAMMI subset {subset!r}; pass channel_names "
                          f"(known subsets: {sorted(CHAMMI_CHANNELS)})")
    rows = []
    for rec in table.to_dict("records"):
        plate = _check_plate_name(rec[plate_column], f"{root / meta_csv}")
        where = f"plate {plate!r}, well {rec[well_column]}, file {rec['file_path']}"
        row, col = split_well(rec[well_column], where)
        path = root.parent / rec["file_path"]
        if not path.is_file() and (root / rec["file_path"]).is_file():
            path = root / rec["file_path"]
        try:
            width = int(rec["channel_width"])
        except ValueError:
            raise IngestError(f"{where}: channel_width {rec['channel_width']!r} is not an integer") from None
        planes = [Plane(str(path), name, k, width) for k, name in enumerate(channels)]
        label = str(rec[label_column])
        meta = {"perturbation_id": str(rec.get("Treatment") or label), "moa": label, "is_control": False,
                "dose": _to_float(rec.get("Dose", "nan")), "cell_line": str(rec.get("cell_type", "")),
                "batch": str(rec.get("Batch", "")), "site": str(rec.get("Key", rec.get("ID", rec["file_path"]))),
                "train_test_split": str(rec.get("train_test_split", ""))}
        rows.append({"plate": plate, "row": row, "col": col, "site": rec["file_path"], "planes": planes, "meta": meta})
    return _build_plan(source, rows, _default_groups, storage_options)


def plan_generic(pattern: str, regex: str, channel_map: Mapping[str, str | None] | None = None,
                 well_metadata: str | Path | None = None, source: str = "generic", cell_line: str = "",
                 batch: str = "", strict: bool = True, storage_options=None) -> IngestPlan:
    """Plan from files matching a glob ``pattern`` whose names match ``regex`` with named groups
    ``plate``, ``well`` (or ``row`` + ``col``), ``site`` and ``channel``. The regex is matched
    against the path relative to the glob's fixed prefix. ``strict``: files that do not match
    are an error (else skipped)."""
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise IngestError(f"filename regex {regex!r} is invalid: {exc}") from exc
    groups = set(compiled.groupindex)
    if not ({"plate", "site", "channel"} <= groups and ("well" in groups or {"row", "col"} <= groups)):
        raise IngestError(f"filename regex {regex!r} needs named groups plate, well (or row and col), site, channel; "
                          f"it has {sorted(groups)}")
    fs, glob_path = filesystem(pattern, storage_options)
    files = sorted(fs.glob(glob_path))
    protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
    prefix = re.split(r"[*?\[]", glob_path)[0]
    prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else ""
    if not files:
        raise IngestError(f"no files match {pattern!r}")
    wells_table = _well_lookup(_read_table(well_metadata)) if well_metadata else {}
    by_field: dict[tuple, dict] = {}
    unmatched = []
    for path in files:
        rel = path[len(prefix):]
        match = compiled.search(rel)
        if match is None:
            unmatched.append(path)
            continue
        parts = match.groupdict()
        plate = _check_plate_name(parts["plate"], f"file {path}")
        well = parts.get("well") or f"{parts['row']}{parts['col']}"
        where = f"plate {plate!r}, well {well}, site {parts['site']}, file {protocol}{path}"
        row, col = split_well(well, where)
        channel = parts["channel"]
        if channel_map is not None:
            if channel not in channel_map:
                raise IngestError(f"{where}: channel {channel!r} is not in the channel mapping {sorted(channel_map)}")
            channel = channel_map[channel]
            if not channel:
                continue
        key = (plate, row, col, parts["site"])
        entry = by_field.setdefault(key, {"plate": plate, "row": row, "col": col, "site": parts["site"], "planes": []})
        if any(p.channel == channel for p in entry["planes"]):
            raise IngestError(f"{where}: channel {channel!r} given twice for this field")
        entry["planes"].append(Plane(f"{protocol}{path}", channel))
    if unmatched and strict:
        raise IngestError(f"{len(unmatched)} file(s) match the glob but not the regex {regex!r}, e.g. "
                          f"{unmatched[:3]}; fix the regex or pass strict=False to skip them")
    order = list(channel_map.values()) if channel_map else None
    rows = []
    for entry in by_field.values():
        entry["planes"].sort(key=lambda p: (order.index(p.channel) if order and p.channel in order else 0, p.channel))
        joined = _join(entry["plate"], entry["row"], entry["col"], wells_table)
        entry["meta"] = perturbation_meta(joined, cell_line, batch) | {"site": str(entry["site"])}
        rows.append(entry)
    return _build_plan(source, rows, _default_groups, storage_options, check_files=False)


# ----------------------------------------------------------------------------------------------
# Reading sources


def _read_bytes(uri: str, storage_options) -> bytes:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as src:
        return src.read()


def _load_plane(plane: Plane, storage_options=None) -> np.ndarray:
    """One (H, W) plane from a TIFF/PNG (or a CHAMMI strip's channel)."""
    suffix = Path(plane.uri.split("?")[0]).suffix.lower()
    try:
        data = _read_bytes(plane.uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file {plane.uri}") from None
    if suffix in (".tif", ".tiff"):
        import tifffile

        image = tifffile.imread(io.BytesIO(data))
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            image = np.asarray(img)
    image = np.squeeze(image)
    if image.ndim != 2:
        raise ValueError(f"file {plane.uri}: expected a single-plane image, got shape {image.shape}")
    if plane.strip_index is not None:
        width = plane.strip_width
        if image.shape[1] % width:
            raise ValueError(f"file {plane.uri}: strip width {image.shape[1]} is not a multiple of "
                             f"channel_width {width}")
        n = image.shape[1] // width
        if plane.strip_index >= n:
            raise ValueError(f"file {plane.uri}: strip holds {n} channel(s) of width {width}, "
                             f"channel {plane.channel!r} is number {plane.strip_index + 1}")
        image = image[:, plane.strip_index * width:(plane.strip_index + 1) * width]
    return image


def load_field(spec: FieldSpec, plan: PlatePlan, storage_options=None) -> np.ndarray:
    """The (C, H, W) field of ``spec``; IngestError naming plate/well/site/file on any problem."""
    planes = []
    for plane in spec.planes:
        try:
            image = _load_plane(plane, storage_options)
        except Exception as exc:  # noqa: BLE001
            raise IngestError(f"{spec.where()}, channel {plane.channel}: {redact(str(exc), storage_options)}") from exc
        if image.shape != tuple(plan.shape) or str(image.dtype) != plan.dtype:
            raise IngestError(f"{spec.where()}, file {plane.uri}: shape {image.shape} dtype {image.dtype}, but the "
                              f"plate's fields are {tuple(plan.shape)} {plan.dtype}")
        planes.append(image)
    return np.stack(planes)


# ----------------------------------------------------------------------------------------------
# Writing


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _ingest_fields(specs: list[FieldSpec], plans: dict[str, PlatePlan], plate_uris: dict[str, str],
                   state_dirs: dict[str, str], storage_options, field_delay_s: float) -> list[tuple[str, str, str]]:
    """Write each field (the only writer of its shard) then its marker. Returns (plate, key, error or "")."""
    results = []
    for spec in specs:
        try:
            image = load_field(spec, plans[spec.plate], storage_options)
            if field_delay_s:
                time.sleep(field_delay_s)
            write_field(plate_uris[spec.plate], spec.row, spec.col, spec.field, image, storage_options)
            marker = {"sha256": _digest(image), "sources": [p.uri for p in spec.planes]}
            fs, path = filesystem(join(state_dirs[spec.plate], f"{spec.key}.json"), storage_options)
            fs.pipe_file(path, json.dumps(marker).encode())
            results.append((spec.plate, spec.key, ""))
        except (IngestError, PlateError) as exc:
            results.append((spec.plate, spec.key, str(exc)))
        except Exception as exc:  # noqa: BLE001
            results.append((spec.plate, spec.key, f"{spec.where()}: {redact(f'{type(exc).__name__}: {exc}', storage_options)}"))
    return results


def _field_is_done(spec: FieldSpec, plate_uri: str, state_dir: str, storage_options, verify: bool) -> bool:
    fs, path = filesystem(join(state_dir, f"{spec.key}.json"), storage_options)
    try:
        marker = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return False
    if not verify:
        return True
    try:
        image, _ = read_field(plate_uri, spec.row, spec.col, spec.field, storage_options=storage_options)
    except PlateError:
        return False
    return _digest(image) == marker.get("sha256")


def _prepare_plate(plan: PlatePlan, plate_uri: str, state_dir: str, storage_options) -> bool:
    """Create the plate unless a previous run created it from the same plan. True if reused."""
    fs, plan_path = filesystem(join(state_dir, "plan.json"), storage_options)
    try:
        if fs.cat_file(plan_path).decode() == plan.fingerprint():
            return True
    except FileNotFoundError:
        pass
    fs_state, state_path = filesystem(state_dir, storage_options)
    if fs_state.exists(state_path):
        fs_state.rm(state_path, recursive=True)
    create_plate(plate_uri, plan.name, plan.wells, plan.n_fields, plan.channel_names, plan.shape,
                 dtype=plan.dtype, storage_options=storage_options)
    fs.pipe_file(plan_path, plan.fingerprint().encode())  # only after the plate exists
    return False


def manifest_rows(plan: IngestPlan, plate_uris: Mapping[str, str]) -> pd.DataFrame:
    records = []
    for spec in plan.fields:
        pp = plan.plates[spec.plate]
        meta = dict(spec.meta)
        record = {
            "source": plan.source, "plate": spec.plate, "well": f"{spec.row}{spec.col}", "row": spec.row,
            "col": spec.col, "field": spec.field, "store_uri": plate_uris[spec.plate],
            "channel_names": list(pp.channel_names), "channel_groups": list(pp.channel_groups),
            "height": pp.shape[0], "width": pp.shape[1], "dtype": pp.dtype,
            "perturbation_id": meta.pop("perturbation_id", ""), "moa": meta.pop("moa", ""),
            "is_control": bool(meta.pop("is_control", False)), "dose": float(meta.pop("dose", float("nan"))),
            "cell_line": meta.pop("cell_line", ""), "batch": meta.pop("batch", ""),
            "original_uris": list(dict.fromkeys(p.uri for p in spec.planes)),
        }
        records.append(record | {k: str(v) for k, v in meta.items()})
    df = pd.DataFrame(records)
    return df.sort_values(["plate", "row", "col", "field"], key=lambda s: s.map(_sort_key) if s.name in ("row", "col") else s,
                          kind="stable").reset_index(drop=True)


def _sort_key(name: str) -> tuple[int, str]:
    return len(name), name


@dataclass
class IngestReport:
    plates: list[str]
    written: int
    skipped: int
    manifest: str
    seconds: float


def run_ingestion(plan: IngestPlan, out: str, manifest_path: str | Path, storage_options: dict | None = None,
                  use_ray: bool = True, fields_per_task: int = 4, verify: bool = True, field_delay_s: float = 0.0,
                  progress: Callable[[str], None] | None = print) -> IngestReport:
    """Write ``plan`` into plates under ``out`` (local folder or ``s3://`` prefix) and the manifest.

    Fields already written and verified by an earlier run are skipped. Each Ray task writes whole
    fields (never part of one), so every shard has exactly one writer.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    local = "://" not in out
    if local:
        out = str(Path(out).absolute())
        Path(out).mkdir(parents=True, exist_ok=True)
    plate_uris = {name: join(out, f"{name}.zarr") for name in plan.plates}
    state_dirs = {name: join(out, STATE_DIR, name) for name in plan.plates}
    for name, pp in plan.plates.items():
        reused = _prepare_plate(pp, plate_uris[name], state_dirs[name], storage_options)
        say(f"[ingest] plate {name}: {len(pp.wells)} wells x {pp.n_fields} fields, channels {pp.channel_names}, "
            f"{pp.shape[0]}x{pp.shape[1]} {pp.dtype} ({'resuming' if reused else 'created'} {plate_uris[name]})")
    pending = [s for s in plan.fields
               if not _field_is_done(s, plate_uris[s.plate], state_dirs[s.plate], storage_options, verify)]
    skipped = len(plan.fields) - len(pending)
    say(f"[ingest] {len(plan.fields)} fields: {skipped} already written and verified, {len(pending)} to write")
    batches = [pending[i:i + fields_per_task] for i in range(0, len(pending), max(1, fields_per_task))]
    errors: list[str] = []
    done = 0

    def report(results):
        nonlocal done
        for _plate, _key, error in results:
            done += 1
            if error:
                errors.append(error)
        elapsed = time.perf_counter() - started
        say(f"[ingest] {done}/{len(pending)} fields written ({done / max(elapsed, 1e-9):.1f} fields/s, "
            f"{len(errors)} error(s)) | ETA {format_duration(eta_seconds(done, len(pending), elapsed))}")

    if use_ray and batches:
        import ray

        from cellfm.runtime import start_embedded_ray

        if not ray.is_initialized():
            start_embedded_ray(num_cpus=None, log_to_driver=False)
        task = ray.remote(num_cpus=1)(_ingest_fields)
        plans_ref = ray.put(plan.plates)
        refs = [task.remote(batch, plans_ref, plate_uris, state_dirs, storage_options, field_delay_s)
                for batch in batches]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            report(ray.get(ready[0]))
    else:
        for batch in batches:
            report(_ingest_fields(batch, plan.plates, plate_uris, state_dirs, storage_options, field_delay_s))
    if errors:
        shown = "\n  ".join(errors[:20])
        raise IngestError(f"{len(errors)} field(s) failed (the other {len(pending) - len(errors)} are written; "
                          f"a rerun resumes):\n  {shown}" + ("\n  ..." if len(errors) > 20 else ""))
    df = manifest_rows(plan, plate_uris)
    write_manifest(df, manifest_path if "://" in str(manifest_path) else Path(manifest_path), storage_options)
    seconds = time.perf_counter() - started
    say(f"[ingest] done: {len(pending)} written, {skipped} skipped, {len(plan.plates)} plate(s), "
        f"manifest {manifest_path} ({len(df)} rows) in {seconds:.1f} s")
    return IngestReport(sorted(plan.plates), len(pending), skipped, str(manifest_path), seconds)


# ----------------------------------------------------------------------------------------------
# Registering OME-Zarr plates in place

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


@dataclass(frozen=True)
class _FieldInfo:
    """What registration records of one field image (its level-0 array)."""

    row: str
    col: str
    field: int
    acquisition: str
    labels: list[str] | None   # omero labels, None when absent
    n_channels: int
    height: int
    width: int
    size_z: int
    dtype: str


def _field_info(root, uri: str, row: str, col: str, image: dict) -> _FieldInfo:
    """Metadata of one well image; IngestError naming plate/well/field for what cellfm cannot read."""
    from cellfm.data.plate import _SUPPORTED_DTYPES, axis_names, ome_attrs

    path = str(image.get("path", ""))
    where = f"plate {uri!r}, well {row}{col}, field {path}"
    if not path.isdigit():
        raise IngestError(f"{where}: image path {path!r} is not a field number (0, 1, ...)")
    try:
        group = root[f"{row}/{col}/{path}"]
        ome = ome_attrs(group)
        multiscale = ome["multiscales"][0]
        array = group[multiscale["datasets"][0]["path"]]
        axes = axis_names(multiscale)
    except Exception as exc:  # noqa: BLE001 - any missing key or node: the image is unreadable
        raise IngestError(f"{where}: cannot open the field image: {type(exc).__name__}: {exc}") from exc
    unknown = [a for a in axes if a not in ("t", "c", "z", "y", "x")]
    if unknown or not {"y", "x"} <= set(axes):
        raise IngestError(f"{where}: axes {axes}: " + (f"unknown axis {unknown[0]!r}" if unknown else "no y and x")
                          + "; OME-Zarr images have axes among t, c, z, y, x")
    sizes = dict(zip(axes, (int(s) for s in array.shape)))
    if sizes.get("t", 1) != 1:
        raise IngestError(f"{where}: {sizes['t']} time points; a time series is not a field")
    if str(array.dtype) not in _SUPPORTED_DTYPES:
        raise IngestError(f"{where}: dtype {array.dtype} not supported (use one of {_SUPPORTED_DTYPES})")
    channels = ome.get("omero", {}).get("channels") or []
    labels = [str(ch.get("label", "")) for ch in channels] or None
    acquisition = "" if image.get("acquisition") is None else str(image["acquisition"])
    return _FieldInfo(row, col, int(path), acquisition, labels, sizes.get("c", 1), sizes["y"], sizes["x"],
                      sizes.get("z", 1), str(array.dtype))


def _channel_names(info: _FieldInfo, channel_map: Mapping[str, str | None] | None, uri: str) -> tuple[list[str], list[str]]:
    """(names cellfm uses for the kept channels, the array's channels under those names, "" = left out).

    Without a map the omero labels are the names. A map renames each channel, keyed by its label or
    (labels missing) its index "0", "1", ...; null leaves a channel out; a channel the map lacks is refused."""
    where = f"plate {uri!r}, well {info.row}{info.col}, field {info.field}"
    if channel_map is None:
        if info.labels is None:
            raise IngestError(f"{where}: no omero channel labels; name the {info.n_channels} channels with "
                              f"--channel-map '{{\"0\": \"DNA\", ...}}' (keys: channel indices)")
        if len(info.labels) != info.n_channels:
            raise IngestError(f"{where}: omero lists {len(info.labels)} labels {info.labels} for {info.n_channels} channels")
        return list(info.labels), list(info.labels)
    keys = info.labels if info.labels is not None and len(info.labels) == info.n_channels else \
        [str(i) for i in range(info.n_channels)]
    missing = [k for i, k in enumerate(keys) if k not in channel_map and str(i) not in channel_map]
    if missing:
        raise IngestError(f"{where}: channel(s) {missing} not in --channel-map {sorted(channel_map)}; map each "
                          f"(by label or index) to a stain name, or to null to leave it out")
    mapped = [channel_map[k] if k in channel_map else channel_map[str(i)] for i, k in enumerate(keys)]
    labels = [str(name) if name else "" for name in mapped]
    names = [name for name in labels if name]
    if not names or len(set(names)) != len(names):
        raise IngestError(f"{where}: --channel-map gives channel names {labels}; they must be non-empty and unique")
    return names, labels


def _plate_fields(uri: str, acquisition: str | None, storage_options) -> tuple[str, list[_FieldInfo]]:
    """(plate name, every field of the plate's wells, of one acquisition or all) from the plate metadata."""
    from cellfm.data.plate import ome_attrs, open_group, open_store

    try:
        root = open_group(open_store(uri, "r", storage_options))
        plate = ome_attrs(root)["plate"]
        well_paths = [w["path"] for w in plate["wells"]]
    except Exception as exc:  # noqa: BLE001
        raise IngestError(f"plate {uri!r}: not an OME-Zarr HCS plate: "
                          f"{redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
    name = _check_plate_name(plate.get("name") or Path(uri.rstrip("/")).name.removesuffix(".zarr"), f"plate {uri!r}")
    known = [str(a.get("id")) for a in plate.get("acquisitions") or []]
    if acquisition is not None and acquisition not in known:
        raise IngestError(f"plate {uri!r}: no acquisition {acquisition!r} (the plate lists {known or 'none'})")
    jobs = []
    for path in well_paths:
        row, _, col = str(path).partition("/")
        try:
            images = ome_attrs(root[path])["well"]["images"]
        except Exception as exc:  # noqa: BLE001
            raise IngestError(f"plate {uri!r}, well {row}{col}: well metadata missing or unreadable: "
                              f"{type(exc).__name__}: {exc}") from exc
        jobs += [(row, col, image) for image in images
                 if acquisition is None or str(image.get("acquisition")) == acquisition]
    if not jobs:
        raise IngestError(f"plate {uri!r}: no fields" + (f" of acquisition {acquisition!r}" if acquisition else ""))
    if "://" not in uri:
        return name, [_field_info(root, uri, *job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # remote metadata: one request per document, many in flight
        return name, list(pool.map(lambda job: _field_info(root, uri, *job), jobs))


def plan_ome_zarr(plates: Sequence[str], platemap: str | Path | None = None,
                  channel_map: Mapping[str, str | None] | None = None, column_map: Mapping[str, str] | None = None,
                  acquisition: str | None = None, source: str = "ome-zarr", cell_line: str = "", batch: str = "",
                  storage_options=None) -> pd.DataFrame:
    """The manifest of existing OME-Zarr HCS plates (0.4 or 0.5, local or fsspec URLs), registered in place.

    One row per field of every well (of ``acquisition``, or of all acquisitions as separate fields),
    with the level-0 shape, dtype and channel names (omero labels or ``channel_map``), joined with the
    platemap on plate + well, and each plate's ``content_version`` (its listing digest, as the feature
    store computes it). Reads metadata only, never pixels."""
    from cellfm.data.content_version import plate_content_version

    found = {}
    for uri in plates:
        uri = uri if "://" in uri else str(Path(uri).absolute())
        name, infos = _plate_fields(uri, acquisition, storage_options)
        if name in {n for n, _ in found.values()}:
            raise IngestError(f"plate {uri!r}: plate name {name!r} is also the name of another plate given")
        found[uri] = (name, infos)
    lookup = {}
    if platemap is not None:
        wells = {name: list(dict.fromkeys(f"{i.row}{i.col}" for i in infos)) for name, infos in found.values()}
        lookup = platemap_lookup(read_platemap(platemap, column_map, storage_options), wells, f"platemap {platemap}")
    key_columns = set(PLATEMAP_PLATE_COLUMNS + PLATEMAP_WELL_COLUMNS)
    records = []
    for uri, (name, infos) in found.items():
        version = plate_content_version(uri, pd.DataFrame(columns=["well", "field"]), storage_options)
        for info in infos:
            names, labels = _channel_names(info, channel_map, uri)
            record = lookup.get((name, f"{info.row}{info.col}"), {})
            meta = perturbation_meta(record, cell_line, batch)
            taken = (key_columns | set(MANIFEST_COLUMNS) | set(meta) | PERTURBATION_SOURCE_COLUMNS
                     | {"channel_labels", "acquisition", "size_z", "content_version"})
            extra = {k: str(v) for k, v in record.items() if k not in taken}
            records.append({
                "source": source, "plate": name, "well": f"{info.row}{info.col}", "row": info.row, "col": info.col,
                "field": info.field, "store_uri": uri, "channel_names": names, "channel_groups": _default_groups(names),
                "height": info.height, "width": info.width, "dtype": info.dtype,
                **meta,
                "channel_labels": labels, "acquisition": info.acquisition, "size_z": info.size_z,
                "content_version": version, **extra,
            })
    df = pd.DataFrame(records)
    if not (channel_map is not None or (df["channel_labels"].map(tuple) != df["channel_names"].map(tuple)).any()):
        df = df.drop(columns="channel_labels")  # omero labels name every channel: readers need nothing more
    if not df["acquisition"].astype(bool).any():
        df = df.drop(columns="acquisition")
    return df.sort_values(["plate", "row", "col", "field"],
                          key=lambda s: s.map(_sort_key) if s.name in ("row", "col") else s,
                          kind="stable").reset_index(drop=True)


def register_ome_zarr(df: pd.DataFrame, manifest_path: str | Path, storage_options=None,
                      progress: Callable[[str], None] | None = print) -> bool:
    """Write the manifest ``df`` of registered plates, unless ``manifest_path`` holds exactly these rows
    already (a rerun: nothing written). Returns whether it wrote."""
    from cellfm.data.manifest import manifest_unchanged

    say = progress or (lambda _msg: None)
    for plate, rows in df.groupby("plate", sort=False):
        say(f"[ingest] plate {plate}: {rows['well'].nunique()} wells, {len(rows)} fields, channels "
            f"{list(rows['channel_names'].iloc[0])}, {rows['height'].iloc[0]}x{rows['width'].iloc[0]} "
            f"{rows['dtype'].iloc[0]}, z {rows['size_z'].max()}, content version {rows['content_version'].iloc[0]} "
            f"(registered in place: {rows['store_uri'].iloc[0]})")
    if manifest_unchanged(df, manifest_path, storage_options):
        say(f"[ingest] manifest {manifest_path} already holds these {len(df)} fields (plates unchanged): nothing written")
        return False
    write_manifest(df, manifest_path if "://" in str(manifest_path) else Path(manifest_path), storage_options)
    say(f"[ingest] wrote manifest {manifest_path}: {len(df)} fields of {df['plate'].nunique()} plate(s); no pixel copied")
    return True

"""The Cell Painting Gallery layout: TIFF folders described by ``load_data.csv`` (``FileName_Orig<Ch>``,
``PathName_Orig<Ch>``, ``Metadata_Plate/Well/Site``), a per-source channel mapping (``OrigDNA`` -> ``DNA``
...), joined with CPG platemaps (``barcode_platemap.csv`` + ``platemap/<name>.txt``), compound metadata
(``broad_sample`` -> name, target, MoA, control type) and any well-level table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from cellfm.data.ingest.images import Plane
from cellfm.data.ingest.metadata import join_well_metadata, perturbation_meta, read_table, well_lookup
from cellfm.data.ingest.plan import IngestError, IngestPlan, build_plan, check_plate_name, default_groups, split_well
from cellfm.storage import join

# load_data channel suffix -> stain name: the default channel mapping of a CPG screen.
CPG_CHANNEL_MAP: dict[str, str | None] = {
    "OrigDNA": "DNA", "OrigER": "ER", "OrigRNA": "RNA", "OrigAGP": "AGP", "OrigMito": "Mito",
}


def _cpg_platemaps(platemaps: str | Path | None) -> dict[str, pd.DataFrame]:
    """Plate barcode -> platemap table, from a CPG ``metadata/platemaps/<batch>/`` folder."""
    if platemaps is None:
        return {}
    folder = Path(platemaps)
    barcode = read_table(folder / "barcode_platemap.csv")
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
            maps[name] = read_table(found)
        out[rec["Assay_Plate_Barcode"]] = maps[name]
    return out


def _compound_lookup(path: str | Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    table = read_table(path)
    key = next((c for c in ("broad_sample", "perturbation_id", "Metadata_broad_sample") if c in table.columns), None)
    if key is None:
        raise IngestError(f"compound metadata {path}: no broad_sample / perturbation_id column; "
                          f"columns: {list(table.columns)}")
    return {rec[key]: rec for rec in table.to_dict("records")}


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
        table = read_table(path)
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
    wells_table = well_lookup(read_table(well_metadata)) if well_metadata else {}
    rows = []
    for rec in table.to_dict("records"):
        plate = check_plate_name(rec["Metadata_Plate"], f"load_data {rec['_load_data']}")
        where = f"plate {plate!r}, well {rec['Metadata_Well']}, site {rec['Metadata_Site']}"
        row, col = split_well(rec["Metadata_Well"], where)
        planes = []
        for suffix, name in zip(kept, names):
            filename = rec.get(f"FileName_{suffix}", "")
            if not filename:
                raise IngestError(f"{where}: empty FileName_{suffix}")
            base = str(image_root) if image_root is not None else rec[f"PathName_{suffix}"]
            planes.append(Plane(join(base, filename) if "://" in base else str(Path(base) / filename), name))
        platemap = well_lookup(plate_maps[plate]) if plate in plate_maps else {}
        joined = join_well_metadata(plate, row, col, platemap, wells_table, compounds=compounds)
        meta = perturbation_meta(joined, cell_line, batch) | {"site": str(rec["Metadata_Site"])}
        rows.append({"plate": plate, "row": row, "col": col, "site": rec["Metadata_Site"], "planes": planes,
                     "meta": meta})
    return build_plan(source, rows, default_groups, storage_options)


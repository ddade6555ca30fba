"""The ingestion plan: the plates to write and, per field, the source plane of each channel plus its
perturbation metadata (`IngestPlan`). Every source layout (`cpg`, `chammi`, `generic`) lists rows and hands
them to `build_plan`, which numbers the fields and checks what every layout must satisfy, raising
`IngestError` naming plate/well/site/file: duplicate fields, channel sets that differ between fields of a
plate, wells of a plate with different site counts, missing files, an unreadable first image."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellfm.data.ingest.images import Plane, load_plane
from cellfm.data.plate import redact

# The stains that are C3R "concept" channels (the rest are "context").
CONCEPT_CHANNELS = frozenset({"Protein"})


class IngestError(ValueError):
    """Bad ingestion input; the message names plate/well/site/file."""


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


def check_plate_name(name: str, where: str) -> str:
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
        image = load_plane(plane, storage_options)
    except Exception as exc:  # noqa: BLE001 - any decoder's error: the file is unreadable
        raise IngestError(f"{where}, channel {plane.channel}, file {plane.uri}: cannot read the plate's first image "
                          f"(it sets the plate's field shape and dtype): "
                          f"{redact(f'{type(exc).__name__}: {exc}', storage_options)}") from exc
    return tuple(int(s) for s in image.shape), str(image.dtype)


def build_plan(source: str, rows: list[dict], channel_groups: Callable[[list[str]], list[str]],
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


def default_groups(channels: list[str]) -> list[str]:
    """The C3R group of each channel: concept for `CONCEPT_CHANNELS`, else context."""
    return ["concept" if c in CONCEPT_CHANNELS else "context" for c in channels]


def in_plate_order(df: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows sorted by plate, row, column and field (rows and columns by length, then name: B before
    AA), index reset."""
    return df.sort_values(["plate", "row", "col", "field"],
                          key=lambda s: s.map(_sort_key) if s.name in ("row", "col") else s,
                          kind="stable").reset_index(drop=True)


def _sort_key(name: str) -> tuple[int, str]:
    return len(name), name


"""The generic layout: a glob (local or fsspec URL) plus a filename regex with named groups ``plate``,
``well`` (or ``row`` and ``col``), ``site`` and ``channel``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from cellfm.data.ingest.images import Plane
from cellfm.data.ingest.metadata import join_well_metadata, perturbation_meta, read_table, well_lookup
from cellfm.data.ingest.plan import IngestError, IngestPlan, build_plan, check_plate_name, default_groups, split_well
from cellfm.storage import filesystem


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
    wells_table = well_lookup(read_table(well_metadata)) if well_metadata else {}
    by_field: dict[tuple, dict] = {}
    unmatched = []
    for path in files:
        rel = path[len(prefix):]
        match = compiled.search(rel)
        if match is None:
            unmatched.append(path)
            continue
        parts = match.groupdict()
        plate = check_plate_name(parts["plate"], f"file {path}")
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
        joined = join_well_metadata(entry["plate"], entry["row"], entry["col"], wells_table)
        entry["meta"] = perturbation_meta(joined, cell_line, batch) | {"site": str(entry["site"])}
        rows.append(entry)
    return build_plan(source, rows, default_groups, storage_options, check_files=False)


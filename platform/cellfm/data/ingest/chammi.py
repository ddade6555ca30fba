"""The CHAMMI layout: single-cell strips, PNG/TIFF of ``H x (W*C)`` (channel ``k`` in columns
``k*W .. (k+1)*W``, ``W = channel_width``), described by ``enriched_meta.csv`` (``file_path``,
``channel_width``, ``Label``, ``train_test_split``, plate/well columns ...)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cellfm.data.ingest.images import Plane
from cellfm.data.ingest.metadata import read_table, to_float
from cellfm.data.ingest.plan import IngestError, IngestPlan, build_plan, check_plate_name, default_groups, split_well

# CHAMMI sub-datasets: channel order in the strips (plan.CONCEPT_CHANNELS says which are C3R "concept" channels).
CHAMMI_CHANNELS: dict[str, list[str]] = {
    "CP": ["DNA", "ER", "RNA", "AGP", "Mito"],
    "HPA": ["Microtubules", "Protein", "Nucleus", "ER"],
    "Allen": ["Nucleus", "Membrane", "Protein"],
}


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
    table = read_table(root / meta_csv)
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
        plate = check_plate_name(rec[plate_column], f"{root / meta_csv}")
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
                "dose": to_float(rec.get("Dose", "nan")), "cell_line": str(rec.get("cell_type", "")),
                "batch": str(rec.get("Batch", "")), "site": str(rec.get("Key", rec.get("ID", rec["file_path"]))),
                "train_test_split": str(rec.get("train_test_split", ""))}
        rows.append({"plate": plate, "row": row, "col": col, "site": rec["file_path"], "planes": planes, "meta": meta})
    return build_plan(source, rows, default_groups, storage_options)


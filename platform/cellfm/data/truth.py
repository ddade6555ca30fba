"""Ground truth of a synthetic plate, written beside it by the generator: what each field's cells are.

For a plate ``<screen>/plates/<name>.zarr`` the generator writes

* ``<screen>/truth/<name>.cells.parquet``: one row per cell of every field (``CELL_COLUMNS``): where
  it is, how many pixels its cell and nucleus cover, whether it responds to the well's treatment,
  and the morphology parameters the renderer drew it with (nucleus size/shape, ER swelling,
  mitochondrial fragmentation, stress fibres, nucleoli; for a protein screen the protein's
  compartments and expression);
* ``<screen>/truth/<name>.labels.zarr``: a Zarr v3 group with one ``(2, H, W)`` uint32 array per
  field at ``{row}/{col}/{field}``: channel 0 the nucleus labels, channel 1 the cell labels (0 =
  background; label k is the table's ``cell_id`` k).

They live in a sibling folder, not inside the plate, so the plate's files (and the pinned screen
digests) are exactly those of a screen written without them, and the plate stays plain OME-Zarr.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from cellfm.data.plate import open_store

LABEL_CHANNELS = ("nuclei", "cells")
# Morphology parameters of a cell, as `cellfm.data.synthetic.cells.Cells` holds them (responders carry the
# well's phenotype).
PARAMETER_COLUMNS = ("cell_radius", "cell_elongation", "nucleus_radius", "nucleus_elongation",
                     "nucleus_irregularity", "dna_content", "er_swelling", "mito_fragmentation", "stress_fibres",
                     "nucleoli_count", "nucleoli_size")
CELL_COLUMNS = ("plate", "well", "field", "cell_id", "centre_y", "centre_x", "nucleus_y", "nucleus_x", "cell_area",
                "nucleus_area", "responder", *PARAMETER_COLUMNS, "protein_localization", "protein_secondary",
                "protein_secondary_fraction", "protein_expression")


def truth_uris(store_uri: str) -> tuple[str, str]:
    """(cells table, label group) URIs of the plate at ``store_uri`` (``.../plates/<name>.zarr``)."""
    remote = "://" in store_uri
    path = PurePosixPath(store_uri.split("://", 1)[1] if remote else store_uri.rstrip("/"))
    if path.parent.name != "plates" or path.suffix != ".zarr":
        raise ValueError(f"plate {store_uri!r} is not a synthetic screen's plates/<name>.zarr: no ground truth")
    base = path.parent.parent / "truth" / path.stem
    prefix = store_uri.split("://", 1)[0] + "://" if remote else ""
    return f"{prefix}{base}.cells.parquet", f"{prefix}{base}.labels.zarr"


def field_truth(context: dict, plate: str, well: str, field: int, nucleoli_size: tuple[float, float],
                protein=None) -> tuple[pd.DataFrame, np.ndarray]:
    """One field's cell table and ``(2, H, W)`` labels from the renderer's ``context``.

    ``nucleoli_size``: (responder, non-responder) Gaussian width the renderer used; ``protein``:
    the well's `Protein`, if any.
    """
    cells, owner = context["cells"], context["owner"]
    n = len(cells.cy)
    ids = (owner + 1).astype(np.uint32)
    labels = np.stack([np.where(context["nucleus"], ids, 0), np.where(context["cell"], ids, 0)]).astype(np.uint32)
    cell_area = np.bincount(owner[context["cell"]], minlength=n)
    nucleus_area = np.bincount(owner[context["nucleus"]], minlength=n)
    table = pd.DataFrame({
        "plate": plate, "well": well, "field": field, "cell_id": np.arange(1, n + 1),
        "centre_y": cells.cy, "centre_x": cells.cx, "nucleus_y": cells.ny, "nucleus_x": cells.nx,
        "cell_area": cell_area, "nucleus_area": nucleus_area, "responder": cells.responder,
        "cell_radius": np.sqrt(cells.a * cells.b), "cell_elongation": cells.a / cells.b,
        "nucleus_radius": np.sqrt(cells.na * cells.nb), "nucleus_elongation": cells.na / cells.nb,
        "nucleus_irregularity": cells.irregularity, "dna_content": cells.dna_content, "er_swelling": cells.swelling,
        "mito_fragmentation": cells.fragmentation, "stress_fibres": cells.fibres,
        "nucleoli_count": cells.nucleoli, "nucleoli_size": np.where(cells.responder, *nucleoli_size),
        "protein_localization": protein.localization if protein else "",
        "protein_secondary": protein.secondary if protein else "",
        "protein_secondary_fraction": protein.secondary_fraction if protein else 0.0,
        "protein_expression": context["protein_expression"] if protein else 0.0,
    }, columns=list(CELL_COLUMNS))
    return table, labels


def write_plate_truth(store_uri: str, tables: list[pd.DataFrame], labels: dict[tuple[str, str, int], np.ndarray],
                      storage_options: dict | None = None) -> None:
    """Write a plate's cell table and label images (``labels``: (row, col, field) -> (2, H, W))."""
    cells_uri, labels_uri = truth_uris(store_uri)
    if "://" not in cells_uri:
        Path(cells_uri).parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(open_store(labels_uri, "w", storage_options), mode="w", zarr_format=3)
    group.attrs["channels"] = list(LABEL_CHANNELS)
    for (row, col, field), image in labels.items():
        group.create_array(f"{row}/{col}/{field}", data=image, chunks=image.shape,
                           compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
    pd.concat(tables, ignore_index=True).to_parquet(cells_uri, index=False, storage_options=storage_options)


def read_cells(store_uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    """The cell table of the plate at ``store_uri``."""
    return pd.read_parquet(truth_uris(store_uri)[0], storage_options=storage_options)


def read_labels(store_uri: str, row: str, col: str, field: int,
                storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus labels, cell labels) of one field, each (H, W) uint32."""
    group = zarr.open_group(open_store(truth_uris(store_uri)[1], "r", storage_options), mode="r")
    image = group[f"{row}/{col}/{field}"][...]
    return image[0], image[1]


def cell_locations(manifest: pd.DataFrame, storage_options: dict | None = None) -> pd.DataFrame:
    """A locations table (plate, well, field, y, x: ``data.cell_locations``) of the manifest's fields from their
    plates' ground truth: every cell with pixels in its field and its centre inside it (the renderer also
    places cells centred just outside, of which a field shows only an edge). Rows follow the manifest's fields."""
    tables = []
    for store_uri, rows in manifest.groupby("store_uri", sort=False):
        cells = read_cells(str(store_uri), storage_options)
        fields = rows[["plate", "well", "field", "height", "width"]].astype({"field": np.int64})
        cells = cells.astype({"field": np.int64}).merge(fields, on=["plate", "well", "field"])
        inside = ((cells["cell_area"] > 0) & (cells["centre_y"] >= 0) & (cells["centre_y"] <= cells["height"] - 1)
                  & (cells["centre_x"] >= 0) & (cells["centre_x"] <= cells["width"] - 1))
        tables.append(cells.loc[inside, ["plate", "well", "field", "centre_y", "centre_x"]]
                      .rename(columns={"centre_y": "y", "centre_x": "x"}))
    return pd.concat(tables, ignore_index=True)

"""Make "a lab's plates" to follow docs/bring-your-own-plates.md without plates of your own: the plates of a
cellfm synthetic screen rewritten by another library (ngff-zarr) as OME-Zarr 0.4 HCS plates on Zarr v2,
each field a 2-plane z-stack (the field, then a plane of half its intensity: the max projection is the
field) with the lab's own stain names, plus a JUMP-style platemap (Metadata_Plate, Metadata_Well, ...).

    python docs/examples/make_04_plates.py SCREEN_DIR OUT_DIR
"""

import sys
from pathlib import Path

import ngff_zarr as nz
import numpy as np
import pandas as pd

from cellfm.data.plate import read_field

LAB_NAMES = {"DNA": "Hoechst 33342", "ER": "Concanavalin A", "RNA": "SYTO 14", "AGP": "Phalloidin",
             "Mito": "MitoTracker"}


def plate_order(name: str) -> tuple[int, str]:
    return len(name), name


def write_04_plate(rows: pd.DataFrame, uri: str) -> None:
    wells = list(dict.fromkeys(zip(rows["row"], rows["col"])))
    row_names = sorted({r for r, _ in wells}, key=plate_order)
    col_names = sorted({c for _, c in wells}, key=plate_order)
    plate = nz.Plate(
        rows=[nz.PlateRow(name=r) for r in row_names], columns=[nz.PlateColumn(name=c) for c in col_names],
        wells=[nz.PlateWell(path=f"{r}/{c}", rowIndex=row_names.index(r), columnIndex=col_names.index(c))
               for r, c in wells],
        name=rows["plate"].iloc[0], field_count=int(rows["field"].max()) + 1, version="0.4")
    with nz.HCSPlateWriter(uri, plate) as writer:
        for r in rows.itertuples():
            field, names = read_field(r.store_uri, r.row, r.col, r.field)
            stack = np.stack([field, field // 2], axis=1)  # (c, z, y, x)
            image = nz.to_ngff_image(stack, dims=["c", "z", "y", "x"], channel_names=[LAB_NAMES[n] for n in names],
                                     scale={"z": 2.0, "y": 0.65, "x": 0.65})
            multiscales = nz.to_multiscales(image, scale_factors=[2])
            multiscales.metadata.omero = nz.compute_omero_from_multiscales(multiscales)
            writer.write_well_image(multiscales, r.row, r.col, r.field)


def main(screen: str, out: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    platemap = []
    for split in ("train", "heldout"):
        manifest = pd.read_parquet(Path(screen) / f"{split}.parquet")
        write_04_plate(manifest, str(Path(out) / f"{manifest['plate'].iloc[0]}.zarr"))
        for r in manifest.drop_duplicates(["plate", "well"]).itertuples():
            platemap.append({"Metadata_Plate": r.plate, "Metadata_Well": r.well,
                             "Metadata_broad_sample": "" if r.is_control else r.perturbation_id,
                             "Metadata_control_type": "negcon" if r.is_control else "",
                             "Metadata_moa": "" if r.is_control else r.moa, "Metadata_mmoles_per_liter": r.dose,
                             "Metadata_cell_line": r.cell_line, "Metadata_Batch": r.batch})
    pd.DataFrame(platemap).to_csv(Path(out) / "platemap.csv", index=False)


if __name__ == "__main__":
    main(*sys.argv[1:])

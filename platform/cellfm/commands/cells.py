"""`cellfm cells`: write the cell locations table (data.cell_locations) of a synthetic screen's fields."""

from __future__ import annotations

import argparse

DESCRIPTION = "Write the cell locations table (data.cell_locations) of synthetic screen manifests from their ground truth."
EXAMPLES = """examples:
  cellfm cells demo_output/screen/train.parquet demo_output/screen/heldout.parquet \\
      --output demo_output/screen/cells.parquet

One row per cell whose centre lies in its field: plate, well, field, y, x (the generator's cell centres,
from OUT_DIR/truth/<plate>.cells.parquet). Then train or embed single cells with
data.crop_mode=cells data.cell_locations=demo_output/screen/cells.parquet."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("manifests", nargs="+", help="manifests of a synthetic screen (cellfm synth)")
    parser.add_argument("--output", required=True, help="the Parquet table to write")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from cellfm.data.pipeline.dataset import load_manifests
    from cellfm.data.truth import cell_locations
    from cellfm.paths import check_paths
    from cellfm.storage import replacing

    check_paths(outputs={"--output": args.output})
    manifest = load_manifests(args.manifests, check_plates=False)
    manifest = manifest.drop_duplicates(["plate", "well", "field"])
    table = cell_locations(manifest)
    output = Path(args.output)
    with replacing(output) as partial:  # nothing half-written
        table.to_parquet(partial, index=False)
    per_field = table.groupby(["plate", "well", "field"]).size().reindex(
        pd.MultiIndex.from_frame(manifest[["plate", "well", "field"]].astype({"field": "int64"})), fill_value=0)
    print(f"[cells] {len(table)} cells in {len(manifest)} fields of {manifest['plate'].nunique()} plate(s) "
          f"({per_field.min()}-{per_field.max()} per field, mean {per_field.mean():.1f}) -> {output}")
    return 0

"""Known ceilings of a synthetic screen: what a well-level probe can reach at best.

* `oracle_features`: the generator's ground truth (`cellfm.data.truth`) per well: the mean of every
  per-cell morphology parameter the configuration's stains show (`visible_parameters`), cells per
  field and the fraction of responding cells; for a protein screen also the protein's compartments.
  No image model can know more about a well than this.
Every feature function here returns its rows in `cellfm.data.manifest.well_meta` order.

The supervised CNN ceiling is `cellfm.evaluate.supervised_cnn`; the CellProfiler-style baseline is
`cellfm.features.morphology`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellfm.data.manifest import WELL_KEYS, well_meta
from cellfm.data.synthetic.catalog import LOCALIZATIONS, visible_parameters
from cellfm.data.truth import read_cells

def oracle_feature_names(channels: list[str]) -> list[str]:
    """Column names of `oracle_features` for a configuration with stains ``channels``."""
    names = [*visible_parameters(channels), "cells_per_field", "responder_fraction"]
    if "Protein" in channels:
        names += [f"protein_in_{loc}" for loc in LOCALIZATIONS] + ["protein_log_expression"]
    return names


def _cell_features(cells: pd.DataFrame, channels: list[str]) -> pd.DataFrame:
    """Per-cell values of the oracle's features (cells_per_field: 1 per cell, summed later)."""
    out = cells[visible_parameters(channels)].astype(float)
    out["responder_fraction"] = cells["responder"].astype(float)
    if "Protein" in channels:
        for loc in LOCALIZATIONS:
            fraction = cells["protein_secondary_fraction"].astype(float)
            out[f"protein_in_{loc}"] = (np.where(cells["protein_localization"] == loc, 1.0 - fraction, 0.0)
                                       + np.where(cells["protein_secondary"] == loc, fraction, 0.0))
        out["protein_log_expression"] = np.log(cells["protein_expression"].astype(float))
    return out


def oracle_features(manifest: pd.DataFrame, storage_options: dict | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(`well_meta`, (wells, features) float64) of the ground truth of every plate in ``manifest``
    (one configuration). Only cells with at least one pixel in their field count."""
    channels = list(manifest["channel_names"].iloc[0])
    meta = well_meta(manifest)
    tables = []
    for store_uri in manifest["store_uri"].unique():
        cells = read_cells(store_uri, storage_options)
        cells = cells[cells["cell_area"] > 0]
        per_cell = _cell_features(cells.reset_index(drop=True), channels)
        per_cell[WELL_KEYS] = cells[WELL_KEYS].to_numpy()
        fields = cells.groupby(WELL_KEYS)["field"].nunique()
        well = per_cell.groupby(WELL_KEYS).mean()
        well["cells_per_field"] = per_cell.groupby(WELL_KEYS).size() / fields
        tables.append(well)
    wells = pd.concat(tables)
    # A well whose fields hold no visible cell gets NaN features; fail here rather than in a probe.
    features = wells.reindex(pd.MultiIndex.from_frame(meta[WELL_KEYS]))[oracle_feature_names(channels)]
    if features.isna().any().any():
        missing = features[features.isna().any(axis=1)].index[0]
        raise ValueError(f"plate {missing[0]}, well {missing[1]}: no ground-truth cells (is the truth/ folder there?)")
    return meta, features.to_numpy(np.float64)

"""How much each configuration of the synthetic family can tell, at each screen difficulty: the known
ceilings (oracle, supervised CNN), the field's baseline (CellProfiler-style cp-measure) and the
model-free floor (intensity statistics), all scored by one leave-one-plate-out probe.

    python benchmarks/screen_calibration.py                              # every configuration, both difficulties
    python benchmarks/screen_calibration.py --configs cp5 --difficulties clear   # one cell (results are merged)

Per configuration and difficulty: a screen of `--train-plates` training and `--heldout-plates` held-out plates
(generate_family_screen, seed 0). Wells are restricted to the labels the configuration's stains can reveal
(`revealed_labels`: brightfield shows no ER or mitochondria, so its ER-stress and uncoupler wells are left
out; docs/screens.md). On the held-out plates' wells:

* oracle: the generator's per-cell parameters (those the stains show) averaged per well (cellfm.evaluate.ceilings);
* cnn: a small CNN trained on the training plates' fields and labels; its penultimate features per well
  (cellfm.evaluate.supervised_cnn);
* cp_measure: CellProfiler measurements on the generator's nucleus/cell masks, median per field, mean per
  well (cellfm.features.morphology);
* intensity: per channel mean, std and percentiles of the normalized field (cellfm.features.embed.IntensityStatistics).

Probe: the leave-one-plate-out probe of `cellfm evaluate` (cellfm.evaluate.plate_probes.lopo_probe_scores):
each held-out plate in turn is the test plate; features are standardized per plate (each plate's own mean
and sd), a logistic regression is trained on the other held-out plates' wells and predicts the test plate's;
every well is predicted once; top-1 +- binomial standard error over all wells.
The calibration bars of the clear screen: oracle >= 0.9, cnn >= 0.8, intensity <= chance + 0.15 (chance =
the most frequent label's share).

Writes benchmarks/results/screen_calibration.json, merging cells computed by earlier runs with the same layout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellfm.config import DataConfig
from cellfm.data.manifest import read_manifest
from cellfm.data.synthetic.catalog import FAMILY_CONFIGS, ScreenLayout, revealed_labels, screen_difficulty
from cellfm.data.synthetic.screens import generate_family_screen
from cellfm.data.manifest import WELL_KEYS, well_meta
from cellfm.evaluate.ceilings import oracle_features
from cellfm.evaluate.plate_probes import lopo_probe_scores
from cellfm.evaluate.supervised_cnn import CNNSettings, cnn_well_features, train_supervised_cnn
from cellfm.features.embed import IntensityStatistics
from cellfm.features.morphology import well_morphology
from cellfm.storage import write_file
from cellfm.train.in_memory import load_normalized_fields

RESULTS = Path(__file__).parent / "results" / "screen_calibration.json"
BARS = {"oracle": ("min", 0.9), "cnn": ("min", 0.8), "intensity": ("max_over_chance", 0.15)}


def intensity_well_features(fields: torch.Tensor, manifest: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    with torch.no_grad():
        per_field = pd.DataFrame(IntensityStatistics()(fields).numpy())
    per_field[WELL_KEYS] = manifest[WELL_KEYS].to_numpy()
    meta = well_meta(manifest)
    return meta, per_field.groupby(WELL_KEYS).mean().reindex(pd.MultiIndex.from_frame(meta[WELL_KEYS])).to_numpy()


MEASURES = ("oracle", "intensity", "cnn", "cp_measure")


def calibrate(config: str, difficulty: str, layout: ScreenLayout, root: Path, cnn: CNNSettings,
              measures: tuple[str, ...] = MEASURES) -> dict:
    started = time.perf_counter()
    paths = generate_family_screen(root / f"{config}-{difficulty}", config, layout, seed=0, difficulty=difficulty)
    generated = time.perf_counter() - started
    labels = revealed_labels(FAMILY_CONFIGS[config].channels)
    train, heldout = (read_manifest(paths[split]) for split in ("train", "heldout"))
    train, heldout = (df[df["moa"].isin(labels)].reset_index(drop=True) for df in (train, heldout))
    data = DataConfig()
    train_fields, heldout_fields = load_normalized_fields(train, data), load_normalized_fields(heldout, data)
    timings, rows = {"generate_s": round(generated, 1)}, {}

    def timed(name, fn):
        t = time.perf_counter()
        meta, features = fn()
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
        rows[name] = lopo_probe_scores(features, meta["moa"].to_numpy(), meta["plate"].to_numpy())
        print(f"  {config}/{difficulty} {name}: {rows[name]['top1']:.3f} +- {rows[name]['top1_se']:.3f} "
              f"({timings[f'{name}_s']} s)", flush=True)

    features = {
        "oracle": lambda: oracle_features(heldout),
        "intensity": lambda: intensity_well_features(heldout_fields, heldout),
        "cnn": lambda: cnn_well_features(train_supervised_cnn(train_fields, train["moa"].tolist(), cnn)[0],
                                         heldout_fields, heldout),
        "cp_measure": lambda: well_morphology(heldout),
    }
    for name in measures:
        timed(name, features[name])
    wells = well_meta(heldout)
    chance = float(wells["moa"].value_counts(normalize=True).max())
    bars = {name: (rows[name]["top1"] <= chance + bar if rule == "max_over_chance" else rows[name]["top1"] >= bar)
            for name, (rule, bar) in BARS.items() if name in rows}
    return {"labels": labels, "chance": chance, "scores": rows, "bars_met": bars, "timings": timings,
            "screen_revision": screen_difficulty(difficulty).revision}


def current_cells(cells: dict) -> dict:
    """{config: {difficulty: cell}} less the cells measured on an older revision of their screen (cells from
    before revisions: revision 1)."""
    return {config: kept for config, by_difficulty in cells.items()
            if (kept := {d: cell for d, cell in by_difficulty.items()
                         if cell.get("screen_revision", 1) == screen_difficulty(d).revision})}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(FAMILY_CONFIGS), choices=list(FAMILY_CONFIGS))
    parser.add_argument("--difficulties", nargs="+", default=["subtle", "clear"], choices=["subtle", "clear"])
    parser.add_argument("--train-plates", type=int, default=3)
    parser.add_argument("--heldout-plates", type=int, default=3)
    parser.add_argument("--replicates", type=int, default=2, help="wells per compound (protein) per plate")
    parser.add_argument("--controls", type=int, default=4, help="DMSO wells per plate")
    parser.add_argument("--fields", type=int, default=2, help="fields per well")
    parser.add_argument("--field-size", type=int, default=128)
    parser.add_argument("--cnn-epochs", type=int, default=CNNSettings.epochs)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    layout = ScreenLayout(n_train_plates=args.train_plates, n_heldout_plates=args.heldout_plates, n_unseen_plates=0,
                          replicates_per_plate=args.replicates, controls_per_plate=args.controls,
                          fields_per_well=args.fields, field_size=args.field_size)
    cnn = CNNSettings(epochs=args.cnn_epochs)
    # The probe is part of the settings: cells scored by another probe are not merged with these.
    settings = {"layout": layout.__dict__, "cnn": cnn.__dict__, "seed": 0, "probe": "lopo_probe_scores"}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            for difficulty in args.difficulties:
                cell = calibrate(config, difficulty, layout, Path(tmp), cnn, tuple(args.measures))
                # Re-read just before writing: runs of other configurations may have added cells.
                results = json.loads(args.output.read_text()) if args.output.is_file() else {}
                if results.get("settings") != settings:
                    results = {"settings": settings, "cells": {}}
                results["cells"] = current_cells(results["cells"])
                results["cells"].setdefault(config, {})[difficulty] = cell
                results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                results["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0],
                                      "torch_threads": torch.get_num_threads()}
                write_file(args.output, json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

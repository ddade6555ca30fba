"""Model-free sanity baseline: how well raw per-channel intensity statistics separate the labels
(MoA; localization for hpa4) of held-out wells, for each synthetic family configuration.

    python benchmarks/intensity_baseline.py      # writes benchmarks/results/intensity_baseline.json

Per field and channel: mean, std and the 1/5/25/50/75/95/99th percentiles of the raw uint16
pixels (log1p); averaged per well. A standardized logistic regression is fit on the wells of the
training plate and scored on the wells of the held-out plate (another imaging batch):
``all``: every treatment; ``heldout_treatments``: fit on the training compounds (proteins) only,
scored on the held-out compounds (proteins) of the held-out plate, i.e. treatments the probe never
saw. ``*_plate_centered``: the same after subtracting each plate's mean feature vector (over all its
wells, controls included), which removes plate-level gain/offset: what intensity statistics carry
once batch effects are normalized away. Negative-control wells are excluded from fitting and
scoring (MoA of treated wells only). Chance = majority class.
A trained encoder should beat these numbers clearly; raw intensity must not solve the task.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellfm.data.manifest import read_manifest
from cellfm.data.plate import read_field
from cellfm.data.synthetic.catalog import FAMILY_CONFIGS, ScreenLayout
from cellfm.data.synthetic.screens import generate_family_screen

LAYOUT = ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=3,
                      controls_per_plate=4, fields_per_well=2, field_size=96)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
SEED = 0


def well_features(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in df.itertuples():
        image, _ = read_field(r.store_uri, r.row, r.col, r.field)
        flat = np.log1p(image.reshape(image.shape[0], -1).astype(np.float32))
        stats = np.concatenate([flat.mean(1), flat.std(1), *np.percentile(flat, PERCENTILES, axis=1)])
        rows.append({"plate": r.plate, "well": r.well, "moa": r.moa, "split": r.compound_split,
                     "control": r.is_control, **{f"f{i}": v for i, v in enumerate(stats)}})
    return pd.DataFrame(rows).groupby(["plate", "well", "moa", "split", "control"]).mean().reset_index()


def _score(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    cols = [c for c in train.columns if c.startswith("f")]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    model.fit(train[cols], train["moa"])
    accuracy = float((model.predict(test[cols]) == test["moa"]).mean())
    chance = float(test["moa"].value_counts(normalize=True).max())
    return {"accuracy": round(accuracy, 3), "chance": round(chance, 3), "n_train_wells": len(train),
            "n_test_wells": len(test), "n_classes": int(test["moa"].nunique())}


def main() -> dict:
    results: dict = {"layout": LAYOUT.__dict__, "seed": SEED, "features": "per channel: mean, std, percentiles "
                     f"{list(PERCENTILES)} of log1p(raw pixels), well-averaged", "configs": {}}
    with tempfile.TemporaryDirectory(prefix="cellfm-baseline-") as tmp:
        for name, cfg in FAMILY_CONFIGS.items():
            started = time.perf_counter()
            paths = generate_family_screen(Path(tmp) / name, name, LAYOUT, seed=SEED)
            raw = {split: well_features(read_manifest(paths[split])) for split in ("train", "heldout")}
            centered = {}
            for split, df in raw.items():
                cols = [c for c in df.columns if c.startswith("f")]
                centered[split] = df.copy()
                centered[split][cols] = df[cols] - df[cols].mean()
            scores = {}
            for suffix, feats in (("", raw), ("_plate_centered", centered)):
                train, test = feats["train"][~feats["train"]["control"]], feats["heldout"][~feats["heldout"]["control"]]
                scores["all" + suffix] = _score(train, test)
                scores["heldout_treatments" + suffix] = _score(train[train["split"] == "train"],
                                                               test[test["split"] == "heldout"])
            results["configs"][name] = {
                "label": cfg.label, "channels": list(cfg.channels), **scores,
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(name, json.dumps(results["configs"][name]), flush=True)
    out = Path(__file__).parent / "results" / "intensity_baseline.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

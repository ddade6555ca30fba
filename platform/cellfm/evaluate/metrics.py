"""Well-level aggregation, negative-control normalization and the logistic-regression probe
(seed 000 Table 1: top-1 accuracy and weighted precision on held-out wells)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, precision_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

WELL_KEYS = ["plate", "well"]


def aggregate_wells(fields: pd.DataFrame, embedding_column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean field embedding per (plate, well); returns the well metadata and an (n_wells, D) matrix.
    Fields are summed in (plate, well, field) order, so the result does not depend on the order the rows
    arrived in (a float sum does)."""
    fields = fields.sort_values([*WELL_KEYS, "field"], kind="stable")
    grouped = fields.groupby(WELL_KEYS, sort=True)
    meta = grouped[["perturbation_id", "moa", "is_control"]].first().reset_index()
    features = np.stack([np.mean(np.stack(rows.to_numpy()), axis=0) for _, rows in grouped[embedding_column]])
    return meta, features


def normalize_to_controls(features: np.ndarray, meta: pd.DataFrame, eps: float = 1e-6) -> np.ndarray:
    """Per plate, standardize each feature by the plate's negative-control wells (pycytominer's
    'normalize to negcon'): removes plate effects that would otherwise leak into the probe."""
    out = np.empty_like(features, dtype=np.float64)
    for plate, idx in meta.groupby("plate").indices.items():
        controls = features[idx][meta["is_control"].to_numpy()[idx]]
        if len(controls) < 2:
            raise ValueError(f"plate {plate}: need at least 2 negative-control wells to normalize, found {len(controls)}")
        mu, sd = controls.mean(axis=0), controls.std(axis=0)
        out[idx] = (features[idx] - mu) / (sd + eps)
    return out


def fixed_well_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of wells; the same seed gives the same split for every encoder."""
    index = np.arange(len(labels))
    return train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)


def logistic_regression_scores(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                               test_idx: np.ndarray) -> dict:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(features[train_idx], labels[train_idx])
    predicted = probe.predict(features[test_idx])
    truth = labels[test_idx]
    return {
        "top1": float(accuracy_score(truth, predicted)),
        "weighted_precision": float(precision_score(truth, predicted, average="weighted", zero_division=0)),
        "n_train_wells": int(len(train_idx)),
        "n_test_wells": int(len(test_idx)),
        "n_classes": int(len(np.unique(labels))),
    }


def repeated_split_scores(features: np.ndarray, labels: np.ndarray, test_fraction: float,
                          seeds: list[int]) -> dict:
    """The probe on several fixed stratified splits (one per seed, the same for every encoder).
    With tens of test wells one split moves by a well or two between encoders; the mean over
    splits (with its standard deviation) is what encoders are compared on."""
    runs = [logistic_regression_scores(features, labels, *fixed_well_split(labels, test_fraction, seed))
            for seed in seeds]
    summary = {key: float(np.mean([r[key] for r in runs])) for key in ("top1", "weighted_precision")}
    summary.update({f"{key}_sd": float(np.std([r[key] for r in runs])) for key in ("top1", "weighted_precision")})
    summary.update({key: runs[0][key] for key in ("n_train_wells", "n_test_wells", "n_classes")})
    summary["top1_per_split"] = [r["top1"] for r in runs]
    return summary

"""The logistic-regression probe (seed 000 Table 1: top-1 accuracy and weighted precision on held-out
wells). Well aggregation and negative-control normalization live in cellfm.features.aggregate."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, precision_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def fixed_well_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of wells; the same seed gives the same split for every encoder."""
    index = np.arange(len(labels))
    return train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)


def probe_predictions(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                      test_idx: np.ndarray) -> np.ndarray:
    """The linear probe (standardized features, multinomial logistic regression) trained on the
    train wells; its predicted labels for the test wells."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(features[train_idx], labels[train_idx])
    return probe.predict(features[test_idx])


def classification_scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    """Seed 000 Table 1's two numbers: top-1 accuracy and precision averaged over classes weighted
    by their number of test wells."""
    return {
        "top1": float(accuracy_score(truth, predicted)),
        "weighted_precision": float(precision_score(truth, predicted, average="weighted", zero_division=0)),
    }


def logistic_regression_scores(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                               test_idx: np.ndarray) -> dict:
    predicted = probe_predictions(features, labels, train_idx, test_idx)
    return {
        **classification_scores(labels[test_idx], predicted),
        "n_train_wells": int(len(train_idx)),
        "n_test_wells": int(len(test_idx)),
        "n_classes": int(len(np.unique(labels))),
    }


def split_summary(runs: list[dict], keys: tuple[str, ...] = ("top1", "weighted_precision")) -> dict:
    """Mean and standard deviation over splits of each score in `keys`, and the first key per split."""
    summary = {key: float(np.mean([r[key] for r in runs])) for key in keys}
    summary.update({f"{key}_sd": float(np.std([r[key] for r in runs])) for key in keys})
    summary[f"{keys[0]}_per_split"] = [r[keys[0]] for r in runs]
    return summary


def repeated_split_scores(features: np.ndarray, labels: np.ndarray, test_fraction: float,
                          seeds: list[int]) -> dict:
    """The probe on several fixed stratified splits (one per seed, the same for every encoder).
    With tens of test wells one split moves by a well or two between encoders; the mean over
    splits (with its standard deviation) is what encoders are compared on."""
    runs = [logistic_regression_scores(features, labels, *fixed_well_split(labels, test_fraction, seed))
            for seed in seeds]
    summary = split_summary(runs)
    summary.update({key: runs[0][key] for key in ("n_train_wells", "n_test_wells", "n_classes")})
    return summary


def standard_error(values) -> float:
    """Standard error of the mean of independent measurements: sd (ddof=1) / sqrt(n); needs n >= 2."""
    array = np.asarray(values, dtype=float)
    if len(array) < 2:
        raise ValueError(f"a standard error needs two or more values, got {len(array)}")
    return float(array.std(ddof=1) / np.sqrt(len(array)))


def compare_scores(a: float, se_a: float, b: float, se_b: float) -> dict:
    """a - b, its standard error sqrt(se_a² + se_b²) and the direction every quality claim states: "higher"
    or "lower" only when the difference exceeds two standard errors, else "within noise". The errors are
    combined as if independent; for two models scored on the same wells that errs on the cautious side."""
    difference = a - b
    se = float(np.hypot(se_a, se_b))
    direction = "within noise" if abs(difference) <= 2 * se else ("higher" if difference > 0 else "lower")
    return {"difference": float(difference), "standard_error": se, "direction": direction}

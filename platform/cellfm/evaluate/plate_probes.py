"""The well-level logistic probe across several held-out plates, with standard errors.

One plate of 56 wells is a coarse instrument: a probe tested on 28 wells moves in steps of 0.036, and
an encoder's score moves from plate to plate by more than that. Two protocols use every plate instead:

- per-plate probe (`cellfm.evaluate.protocols.per_plate_probe`): the fixed-split probe (eval.n_splits
  stratified splits) run within each plate alone; the score is the mean over plates with its standard
  error over plates, sd(ddof=1) / sqrt(n_plates) (`per_plate_summary`).
- leave-one-plate-out probe (`lopo_probe_scores`): features z-scored within each plate (so a plate's
  offset is no cue), then for each plate a probe trained on every other plate's wells predicts its
  wells. Every well is tested exactly once; top-1 is the share of all wells predicted right, with the
  binomial standard error over wells sqrt(p (1 - p) / n) (the standard error over plates is reported
  beside it).
"""

from __future__ import annotations

import math

import numpy as np

from cellfm.evaluate.metrics import classification_scores, probe_predictions, standard_error
from cellfm.evaluate.splits import leave_one_plate_out


def standardize_per_plate(features: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Each feature z-scored within each plate: (x - plate mean) / plate sd (ddof 0); a feature constant
    on a plate is 0 there."""
    plates = np.asarray(plates).astype(str)
    out = np.empty(features.shape, dtype=np.float64)
    for plate in np.unique(plates):
        rows = plates == plate
        values = features[rows].astype(np.float64)
        sd = values.std(axis=0)
        out[rows] = (values - values.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return out


def binomial_standard_error(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent wells: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def too_few_plates(plates: np.ndarray) -> str | None:
    """Why a protocol across plates cannot run on these wells' plates (fewer than two), or None."""
    n = len(set(np.asarray(plates).astype(str)))
    return None if n >= 2 else f"needs two or more plates, found {n}"


def lopo_probe_scores(features: np.ndarray, labels: np.ndarray, plates: np.ndarray) -> dict:
    """The leave-one-plate-out probe (see the module docstring) of `labels` on wells (rows of `features`)
    of `plates`: top1 and weighted precision over all wells, top1_se (binomial, over wells),
    top1_se_plates and top1_per_plate; {"skipped": reason} with one plate, or when the other plates of
    some plate hold a single class (nothing to train a probe on)."""
    labels, plates = np.asarray(labels).astype(str), np.asarray(plates).astype(str)
    reason = too_few_plates(plates)
    if reason:
        return {"skipped": f"leave-one-plate-out probe {reason}"}
    standardized = standardize_per_plate(features, plates)
    predicted = np.empty(len(labels), dtype=object)
    per_plate = {}
    for plate, train, test in leave_one_plate_out(plates):
        plate = str(plate)
        if len(set(labels[train])) < 2:
            return {"skipped": f"the plates other than {plate!r} hold a single class; a probe needs two"}
        predicted[test] = probe_predictions(standardized, labels, train, test)
        per_plate[plate] = float(np.mean(predicted[test] == labels[test]))
    predicted = predicted.astype(str)
    scores = classification_scores(labels, predicted)
    return {
        **scores,
        "top1_se": binomial_standard_error(scores["top1"], len(labels)),
        "top1_se_plates": standard_error(list(per_plate.values())),
        "top1_per_plate": per_plate,
        "n_test_wells": int(len(labels)),
        "n_plates": len(per_plate),
        "n_classes": int(len(np.unique(labels))),
    }


def per_plate_summary(runs: dict[str, dict]) -> dict:
    """{plate: the fixed-split probe's result on that plate's wells} -> top1 and weighted precision as the
    mean over plates, each with its standard error over plates (`<key>_se`), and top1 per plate."""
    out = {}
    for key in ("top1", "weighted_precision"):
        values = [r[key] for r in runs.values()]
        out[key], out[f"{key}_se"] = float(np.mean(values)), standard_error(values)
    return {**out, "top1_per_plate": {p: r["top1"] for p, r in runs.items()}, "n_plates": len(runs),
            "n_test_wells_per_plate": next(iter(runs.values()))["n_test_wells"],
            "n_classes": max(r["n_classes"] for r in runs.values())}

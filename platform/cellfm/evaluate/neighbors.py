"""1-nearest-neighbour classification with leave-one-plate-out splits (the CHAMMI protocol).

Each plate in turn is the test set; every one of its wells takes the label of its nearest well (by
cosine distance) on the other plates. Predictions of all plates are pooled and scored with macro-F1
over the classes present, as CHAMMI's benchmark does. A label that only plate effects make
recognisable within a plate is no help here, so this reads as generalization across batches.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from cellfm.evaluate.splits import leave_one_plate_out


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float64).tiny)


def lopo_nearest_neighbors(features: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """For each well, the index of its nearest well (largest cosine similarity; the lowest index on
    ties) among the wells of all other plates."""
    unit = _unit_rows(np.asarray(features, dtype=np.float64))
    neighbor = np.empty(len(unit), dtype=np.int64)
    for _, train, test in leave_one_plate_out(plates):
        neighbor[test] = train[np.argmax(unit[test] @ unit[train].T, axis=1)]
    return neighbor


def nn_lopo_scores(features: np.ndarray, labels: np.ndarray, plates: np.ndarray) -> dict:
    """Macro-F1 (and accuracy) of 1-NN predictions pooled over the leave-one-plate-out folds."""
    n_plates = len(set(np.asarray(plates).astype(str)))
    if n_plates < 2:
        return {"skipped": f"leave-one-plate-out needs two or more plates, found {n_plates}"}
    labels = np.asarray(labels).astype(str)
    predicted = labels[lopo_nearest_neighbors(features, plates)]
    return {
        "macro_f1": float(f1_score(labels, predicted, labels=np.unique(labels), average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(labels, predicted)),
        "n_plates": n_plates,
        "n_classes": int(len(np.unique(labels))),
    }

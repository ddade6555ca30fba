"""Probes on wells whose compound (or protein) the probe never saw in training.

The fixed well splits of seed 000 Table 1 (`metrics.repeated_split_scores`) put replicate wells of
one compound on both sides, so a probe can score by recognising the compound. Here no compound is on
both sides (`splits.compound_held_out_split`): the MoA probe has to predict the mechanism of an
unseen compound, and the localization probe the compartments of an unseen protein (HPA style).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, confusion_matrix
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellfm.evaluate.metrics import classification_scores, probe_predictions, split_summary
from cellfm.evaluate.splits import compound_held_out_split
from cellfm.evaluate.wells import label_sets


def _testable(groups: np.ndarray, labels: np.ndarray) -> list[str]:
    """Labels carried by at least two compounds: the only ones a compound-held-out split can test."""
    compounds = pd.DataFrame({"group": groups, "label": labels}).drop_duplicates()
    counts = compounds.groupby("label")["group"].nunique()
    return sorted(counts[counts >= 2].index)


def compound_held_out_scores(features: np.ndarray, meta: pd.DataFrame, label: str, test_fraction: float,
                             seeds: list[int]) -> dict:
    """Logistic-regression top-1 / weighted precision on `label` (MoA) over compound-held-out splits
    (one per seed; compounds = `perturbation_id`), negative controls excluded; mean +- sd over splits,
    and the confusion matrix summed over the splits' test wells (rows: truth, columns: prediction)."""
    treated = ~meta["is_control"].to_numpy()
    groups = meta["perturbation_id"].to_numpy()[treated].astype(str)
    labels = meta[label].to_numpy()[treated].astype(str)
    tested = _testable(groups, labels)
    if not tested:
        return {"skipped": f"no {label} has two or more compounds to hold one out"}
    features = features[treated]
    classes = sorted(set(labels))
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    runs = []
    for seed in seeds:
        train, test = compound_held_out_split(groups, labels, test_fraction, seed)
        predicted = probe_predictions(features, labels, train, test)
        runs.append({**classification_scores(labels[test], predicted),
                     "n_test_compounds": len(set(groups[test]))})
        counts += confusion_matrix(labels[test], predicted, labels=classes)
    return {
        **split_summary(runs),
        "n_classes": len(classes),
        "n_tested_classes": len(tested),
        "n_compounds": len(set(groups)),
        "n_test_compounds": runs[0]["n_test_compounds"],
        "confusion": {"classes": classes, "counts": counts.tolist()},
    }


def multilabel_average_precision(truth: np.ndarray, scores: np.ndarray) -> dict:
    """HPA-style multi-label mAP: per class (column) the average precision of ranking the wells by
    the class's score (mean over the class's positive wells of the precision at their rank); the mAP
    is the mean over classes with at least one positive well. `truth` (n, C) bool, `scores` (n, C)."""
    present = np.flatnonzero(truth.any(axis=0))
    per_class = [float(average_precision_score(truth[:, c], scores[:, c])) for c in present]
    return {"map": float(np.mean(per_class)), "per_class": dict(zip(present.tolist(), per_class))}


def localization_map_scores(features: np.ndarray, meta: pd.DataFrame, column: str, test_fraction: float,
                            seeds: list[int]) -> dict:
    """Multi-label localization mAP of a one-vs-rest logistic regression over protein-held-out splits
    (compounds/proteins = `perturbation_id`, stratified by the label set); wells with an empty
    `column` are left out. Mean +- sd over splits, and the per-class AP averaged over splits."""
    sets = label_sets(meta[column]) if column in meta.columns else []
    labelled = np.array([bool(s) for s in sets], dtype=bool)
    if not labelled.any():
        return {"skipped": f"no well has a {column} label"}
    sets = [s for s, keep in zip(sets, labelled) if keep]
    classes = sorted({c for s in sets for c in s})
    truth = np.array([[c in s for c in classes] for s in sets], dtype=bool)
    groups = meta["perturbation_id"].to_numpy()[labelled].astype(str)
    strata = np.array(["|".join(s) for s in sets])
    if not _testable(groups, strata):
        return {"skipped": f"no {column} class has two or more proteins to hold one out"}
    features = features[labelled]
    runs, per_class = [], {c: [] for c in classes}
    for seed in seeds:
        train, test = compound_held_out_split(groups, strata, test_fraction, seed)
        probe = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=5000)))
        probe.fit(features[train], truth[train])
        scores = probe.decision_function(features[test]).reshape(len(test), len(classes))
        result = multilabel_average_precision(truth[test], scores)
        runs.append(result)
        for c, ap in result["per_class"].items():
            per_class[classes[c]].append(ap)
    return {
        **split_summary(runs, keys=("map",)),
        "n_classes": len(classes),
        "per_class_ap": {c: float(np.mean(v)) for c, v in per_class.items() if v},
    }

"""The evaluation probe: scores over repeated fixed splits."""

import numpy as np
import pandas as pd
import pytest

from cellfm.evaluate.metrics import fixed_well_split, logistic_regression_scores, repeated_split_scores
from cellfm.evaluate.wells import well_profiles


def _wells(n_per_class: int = 8, n_classes: int = 4, separation: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"c{k}" for k in range(n_classes)], n_per_class)
    centers = rng.normal(size=(n_classes, 6)) * separation
    features = centers[np.repeat(np.arange(n_classes), n_per_class)] + rng.normal(size=(len(labels), 6))
    return features, labels


def test_repeated_splits_average_the_single_split_scores():
    features, labels = _wells(separation=0.7)
    seeds = [3, 4, 5]
    summary = repeated_split_scores(features, labels, 0.5, seeds)
    singles = [logistic_regression_scores(features, labels, *fixed_well_split(labels, 0.5, s))["top1"] for s in seeds]
    assert summary["top1_per_split"] == singles
    assert summary["top1"] == pytest.approx(np.mean(singles))
    assert summary["top1_sd"] == pytest.approx(np.std(singles))
    assert summary["n_test_wells"] == 16 and summary["n_train_wells"] == 16 and summary["n_classes"] == 4
    # Splits differ between seeds (otherwise averaging would buy nothing) and are stratified.
    first, second = fixed_well_split(labels, 0.5, 3)[1], fixed_well_split(labels, 0.5, 4)[1]
    assert set(first) != set(second)
    assert all((labels[first] == c).sum() == 4 for c in np.unique(labels))


def test_probe_separates_separable_wells_and_not_shuffled_labels():
    features, labels = _wells(separation=10.0)
    assert repeated_split_scores(features, labels, 0.5, [0, 1, 2])["top1"] == 1.0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert repeated_split_scores(features, shuffled, 0.5, list(range(10)))["top1"] < 0.5


def test_well_means_do_not_depend_on_the_order_rows_arrive_in():
    """Ray Data returns embedded fields in any order; a float sum depends on its order (here catastrophically:
    1e16 + 1 - 1e16). Wells are averaged in (plate, well, field) order, so every row order gives the same
    bits."""
    values = [1e16, 1.0, -1e16]
    meta = pd.DataFrame({"plate": ["P"] * 3, "well": ["A01"] * 3, "field": [0, 1, 2],
                         "perturbation_id": ["x"] * 3, "moa": ["m"] * 3, "is_control": [False] * 3})
    features = np.array(values)[:, None]
    in_order = well_profiles(meta, features, "none").features
    for order in ([2, 0, 1], [1, 2, 0], [0, 2, 1]):
        shuffled = well_profiles(meta.iloc[order], features[order], "none").features
        assert shuffled.tobytes() == in_order.tobytes(), order
    unsorted = [np.mean(features[order], axis=0) for order in ([0, 1, 2], [0, 2, 1])]
    assert unsorted[0].tobytes() != unsorted[1].tobytes()  # without the sort these orders disagree

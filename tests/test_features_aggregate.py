"""Well aggregation and per-plate normalization against negative controls, on hand-computed values."""

import numpy as np
import pandas as pd
import pytest

from cellfm.features.aggregate import MAD_TO_SD, aggregate_wells, normalize_to_controls, well_aggregates


def _fields():
    # Plate B listed first and wells out of order: the result is sorted by (plate, well).
    meta = pd.DataFrame({
        "plate": ["B", "A", "A", "A", "A", "A"],
        "well": ["A01", "A02", "A01", "A01", "A02", "A01"],
        "field": [0, 0, 0, 1, 1, 2],
        "perturbation_id": ["x", "DMSO", "y", "y", "DMSO", "y"],
        "moa": ["m", "control", "n", "n", "control", "n"],
        "is_control": [False, True, False, False, True, False],
        "dose": [1.0, 0.0, 2.0, 2.0, 0.0, 2.0],
    })
    features = np.array([[7.0, 7.0], [0.0, 4.0], [1.0, 10.0], [2.0, 20.0], [2.0, 6.0], [9.0, 30.0]], dtype=np.float32)
    return meta, features


def test_well_mean_and_median_per_plate_and_well():
    meta, features = _fields()
    wells, out = well_aggregates(meta, features, ("mean", "median"), well_columns=("perturbation_id", "is_control", "dose"))
    assert wells[["plate", "well"]].values.tolist() == [["A", "A01"], ["A", "A02"], ["B", "A01"]]
    assert wells["perturbation_id"].tolist() == ["y", "DMSO", "x"] and wells["dose"].tolist() == [2.0, 0.0, 1.0]
    # A01: fields (1, 10), (2, 20), (9, 30); A02: (0, 4), (2, 6); B/A01: (7, 7).
    np.testing.assert_allclose(out["mean"], [[4.0, 20.0], [1.0, 5.0], [7.0, 7.0]])
    np.testing.assert_allclose(out["median"], [[2.0, 20.0], [1.0, 5.0], [7.0, 7.0]])
    with pytest.raises(ValueError, match="unknown well aggregation"):
        well_aggregates(meta, features, ("max",))


def test_aggregate_wells_of_an_embedding_column():
    meta, features = _fields()
    fields = meta.assign(embedding=list(features))
    wells, mean = aggregate_wells(fields, "embedding")
    assert list(wells.columns) == ["plate", "well", "perturbation_id", "moa", "is_control"]
    np.testing.assert_allclose(mean, [[4.0, 20.0], [1.0, 5.0], [7.0, 7.0]])
    np.testing.assert_allclose(aggregate_wells(fields, "embedding", method="median")[1][0], [2.0, 20.0])
    labelled, _ = aggregate_wells(fields, "embedding", ["dose", "moa"])
    assert list(labelled.columns) == ["plate", "well", "perturbation_id", "moa", "is_control", "dose"]
    assert labelled["dose"].tolist() == [2.0, 0.0, 1.0]


def test_standardize_each_plate_by_its_controls():
    meta = pd.DataFrame({"plate": ["A"] * 4 + ["B"] * 4, "is_control": [True, True, False, False] * 2})
    features = np.array([[1.0], [3.0], [5.0], [2.0], [10.0], [14.0], [12.0], [20.0]])
    out = normalize_to_controls(features, meta)
    # Plate A controls: mean 2, sd 1; plate B controls: mean 12, sd 2.
    np.testing.assert_allclose(out[:, 0], [-1, 1, 3, 0, -1, 1, 0, 4], atol=1e-5)
    with pytest.raises(ValueError, match="plate A"):
        normalize_to_controls(features[:4], meta.iloc[:4].assign(is_control=[True, False, False, False]))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_to_controls(features, meta, method="zscore")


def test_robust_mad_uses_control_median_and_scaled_mad():
    meta = pd.DataFrame({"plate": ["A"] * 5, "is_control": [True, True, True, False, False]})
    # First feature: controls 1, 2, 4 -> median 2, |dev| 1, 0, 2 -> MAD 1. Second: constant controls.
    features = np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [10.0, 0.0], [2.0, 3.0]])
    out = normalize_to_controls(features, meta, eps=1e-12, method="robust_mad")
    np.testing.assert_allclose(out[:, 0], np.array([-1.0, 0.0, 2.0, 8.0, 0.0]) / MAD_TO_SD, rtol=1e-9)
    # A constant control feature has MAD 0: only eps is left in the denominator.
    np.testing.assert_allclose(out[4, 1], 3.0 / 1e-12)
    # One outlying control moves the median/MAD little (it would move mean/sd a lot).
    outlier = np.array([[1.0], [2.0], [4.0], [1000.0], [10.0]])
    meta4 = pd.DataFrame({"plate": ["A"] * 5, "is_control": [True, True, True, True, False]})
    mad = normalize_to_controls(outlier, meta4, method="robust_mad")[4, 0]
    # Controls 1, 2, 4, 1000: median 3, |dev| 2, 1, 1, 997 -> MAD 1.5.
    assert mad == pytest.approx((10 - 3) / (MAD_TO_SD * 1.5 + 1e-6))


def _spherize_controls():
    # Zero-mean controls whose covariance (ddof 1) is [[2, 1], [1, 2]]: eigenvalues 3 (along (1, 1)) and 1.
    s, t = 1.5, np.sqrt(0.75)
    return np.array([[s, s], [-s, -s], [t, -t], [-t, t]])


def test_spherize_is_zca_on_the_controls():
    controls = _spherize_controls()
    np.testing.assert_allclose(np.cov(controls, rowvar=False), [[2.0, 1.0], [1.0, 2.0]])
    meta = pd.DataFrame({"plate": ["A"] * 5, "is_control": [True] * 4 + [False]})
    features = np.vstack([controls, [[1.0, 0.0]]])
    out = normalize_to_controls(features, meta, eps=0.0, method="spherize", spherize_regularization=0.0)
    # W = U diag(1/sqrt(3), 1) U^T with U = [[1, 1], [1, -1]] / sqrt(2).
    a, b = 1 / np.sqrt(3), 1.0
    expected_w = 0.5 * np.array([[a + b, a - b], [a - b, a + b]])
    np.testing.assert_allclose(out[4], np.array([1.0, 0.0]) @ expected_w, rtol=1e-9)
    # Whitened controls have identity covariance; the ZCA map is symmetric (no rotation).
    np.testing.assert_allclose(np.cov(out[:4], rowvar=False), np.eye(2), atol=1e-9)
    # Regularized: eigenvalues raised by 0.5 * mean(3, 1) = 1 -> 4 and 2.
    reg = normalize_to_controls(features, meta, eps=0.0, method="spherize", spherize_regularization=0.5)
    a, b = 1 / 2, 1 / np.sqrt(2)
    np.testing.assert_allclose(reg[4], np.array([1.0, 0.0]) @ (0.5 * np.array([[a + b, a - b], [a - b, a + b]])), rtol=1e-9)


def test_spherize_fewer_controls_than_features_stays_finite():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 10))
    meta = pd.DataFrame({"plate": ["A"] * 6, "is_control": [True, True, True, False, False, False]})
    out = normalize_to_controls(features, meta, method="spherize")
    assert np.isfinite(out).all()
    # Directions the 3 controls never vary in are scaled by 1/sqrt(regularization * mean eigenvalue), not 1/sqrt(eps).
    assert np.abs(out).max() < 100


def test_wells_carry_every_label_column_asked_for():
    # eval.labels may name any manifest column (e.g. HPA's localization), not only perturbation/MoA.
    fields = pd.DataFrame({"plate": ["P"] * 4, "well": ["A01", "A01", "B02", "B02"],
                           "perturbation_id": ["x", "x", "y", "y"], "moa": ["m", "m", "n", "n"],
                           "is_control": [False] * 4, "localization": ["er", "er", "nucleus", "nucleus"],
                           "emb": [np.array([1.0, 0.0]), np.array([3.0, 2.0]), np.array([0.0, 1.0]), np.array([0.0, 3.0])]})
    meta, features = aggregate_wells(fields, "emb", ["localization", "moa"])
    assert meta["localization"].tolist() == ["er", "nucleus"] and meta["moa"].tolist() == ["m", "n"]
    np.testing.assert_allclose(features, [[2.0, 1.0], [0.0, 2.0]])

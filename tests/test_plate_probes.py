"""The probes across plates (per plate, leave one plate out) against hand-computed cases, their standard
errors, the two-standard-error rule every quality claim uses, and how they reach the report and preflight."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cellfm.config import EvalConfig
from cellfm.evaluate.metrics import compare_scores, probe_predictions, standard_error
from cellfm.evaluate.plate_probes import binomial_standard_error, lopo_probe_scores, standardize_per_plate
from cellfm.evaluate.protocols import evaluate_features, fixed_split_probe
from cellfm.evaluate.report import markdown_report
from cellfm.evaluate.splits import leave_one_plate_out
from cellfm.evaluate.wells import WellProfiles, well_profiles
from cellfm.preflight import evaluation_manifest_problems


def test_features_are_z_scored_within_each_plate():
    features = np.array([[0.0, 5.0], [2.0, 5.0], [100.0, 1.0], [104.0, 3.0]])
    plates = np.array(["A", "A", "B", "B"])
    # A: column 0 mean 1, sd 1; column 1 constant (-> 0). B: mean 102, sd 2; mean 2, sd 1.
    np.testing.assert_allclose(standardize_per_plate(features, plates),
                               [[-1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])


# Three plates, one feature, classes a, a, b, b on each. A and B standardize to -1, -1, +1, +1 (B sits at
# an offset of 100 and a doubled scale: raw, a probe trained on A and C calls all of B "b"). C = [0, 3, 1, 4]
# (mean 2, sd sqrt(2.5)) standardizes to [-1.26, 0.63, -0.63, 1.26]. The training sets of every fold are
# mirror-symmetric (x -> -x swaps a and b), so the probe's boundary is at 0 and each well is predicted by the
# sign of its standardized value: A and B all right, C's middle two wrong. 10 of 12 wells right.
HAND_FEATURES = np.array([0, 0, 2, 2, 100, 100, 104, 104, 0, 3, 1, 4], dtype=float)[:, None]
HAND_LABELS = np.array(list("aabb" * 3))
HAND_PLATES = np.repeat(["A", "B", "C"], 4)


def test_leave_one_plate_out_probe_by_hand():
    result = lopo_probe_scores(HAND_FEATURES, HAND_LABELS, HAND_PLATES)
    assert result["top1_per_plate"] == {"A": 1.0, "B": 1.0, "C": 0.5}
    assert result["top1"] == pytest.approx(10 / 12)
    assert result["top1_se"] == pytest.approx(math.sqrt((10 / 12) * (2 / 12) / 12))  # 0.1076
    # sd of (1, 1, 0.5) with ddof 1 is 0.2887; over sqrt(3) plates: 0.1667.
    assert result["top1_se_plates"] == pytest.approx(np.std([1, 1, 0.5], ddof=1) / math.sqrt(3))
    assert result["n_test_wells"] == 12 and result["n_plates"] == 3 and result["n_classes"] == 2
    # Without the per-plate standardization plate B is mispredicted: standardizing is what scores it.
    train, test = np.r_[0:4, 8:12], np.arange(4, 8)
    assert list(probe_predictions(HAND_FEATURES, HAND_LABELS, train, test)) == ["b"] * 4


def test_every_well_is_tested_exactly_once_and_never_trained_on_its_own_plate():
    plates = np.array(["P2", "P1", "P3", "P1", "P2", "P3", "P3"])
    tested = np.concatenate([test for _, _, test in leave_one_plate_out(plates)])
    assert sorted(tested.tolist()) == list(range(len(plates)))
    for plate, train, test in leave_one_plate_out(plates):
        assert set(plates[test]) == {plate} and plate not in set(plates[train])


def test_lopo_probe_needs_two_plates_and_two_training_classes():
    assert lopo_probe_scores(HAND_FEATURES[:4], HAND_LABELS[:4], HAND_PLATES[:4]) == {
        "skipped": "leave-one-plate-out probe needs two or more plates, found 1"}
    labels = np.array(list("aaaa") + list("abab"))
    assert lopo_probe_scores(HAND_FEATURES[:8], labels, HAND_PLATES[:8]) == {
        "skipped": "the plates other than 'B' hold a single class; a probe needs two"}


def test_standard_errors():
    assert binomial_standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error([0.4, 0.5, 0.6]) == pytest.approx(0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="two or more values"):
        standard_error([0.5])


def test_a_difference_counts_only_beyond_two_standard_errors():
    # se = sqrt(0.03² + 0.04²) = 0.05: 0.11 is beyond 2 se, 0.09 is not.
    assert compare_scores(0.61, 0.03, 0.50, 0.04) == pytest.approx(
        {"difference": 0.11, "standard_error": 0.05, "direction": "higher"})
    assert compare_scores(0.50, 0.03, 0.61, 0.04)["direction"] == "lower"
    assert compare_scores(0.59, 0.03, 0.50, 0.04)["direction"] == "within noise"


def _screen(seed: int, n_plates: int = 3) -> tuple[pd.DataFrame, np.ndarray]:
    """Wells of 3 MoAs (4 wells each) per plate with a per-plate offset; the MoA moves feature 0."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    for p in range(n_plates):
        for i, moa in enumerate(np.repeat(["m0", "m1", "m2"], 4)):
            rows.append({"plate": f"P{p}", "well": f"W{i:02d}", "perturbation_id": f"{moa}-c{i % 2}", "moa": moa,
                         "is_control": False})
            features.append(rng.normal(size=4) + [int(moa[1]) * 1.5, 0, 0, 0] + 10 * p)
    return pd.DataFrame(rows), np.array(features)


def test_evaluate_reports_per_plate_and_lopo_probes_with_standard_errors():
    meta, x = _screen(0)
    cfg = EvalConfig(protocols=["per_plate_probe", "lopo_probe"], labels=["moa"], well_normalization="none",
                     n_splits=2)
    block = evaluate_features({"m": (meta, x)}, cfg)
    profiles = well_profiles(meta, x, "none", ["moa"])
    # Per plate: the fixed-split probe on that plate's wells alone; mean and standard error over the 3 plates.
    per_plate = [fixed_split_probe(WellProfiles(profiles.meta[rows].reset_index(drop=True), profiles.features[rows],
                                                None), "moa", cfg)["top1"]
                 for rows in (profiles.meta["plate"] == p for p in ("P0", "P1", "P2"))]
    details = block["details"]["m"]
    assert details["per_plate_probe"]["moa"]["top1_per_plate"] == dict(zip(("P0", "P1", "P2"), per_plate))
    assert block["metrics"]["m"]["per_plate_probe_moa_top1"] == pytest.approx(np.mean(per_plate))
    assert block["spread"]["m"]["per_plate_probe_moa_top1"] == pytest.approx(standard_error(per_plate))
    lopo = lopo_probe_scores(profiles.features, profiles.meta["moa"].to_numpy(), profiles.meta["plate"].to_numpy())
    assert block["metrics"]["m"]["lopo_probe_moa_top1"] == lopo["top1"]
    assert block["spread"]["m"]["lopo_probe_moa_top1"] == lopo["top1_se"] > 0
    assert block["chance"]["lopo_probe_moa_top1"] == pytest.approx(1 / 3)
    # The report states each as value ± standard error.
    report = {"results": {"seen": {"manifest": "m.parquet", "channels": ["DNA"], **block}}, "baselines": [],
              "well_normalization": "none", "channel_readout": "per_channel", "split_seeds": [0, 1], "compound_split_seeds": [0, 1],
              "test_fraction": 0.5, "copairs": {"null_size": 10, "threshold": 0.05},
              "metric_titles": {"per_plate_probe_moa_top1": "per-plate", "lopo_probe_moa_top1": "lopo"}}
    text = markdown_report(report)
    assert f"| lopo | {lopo['top1']:.3f} ± {lopo['top1_se']:.3f} |" in text
    assert f"| per-plate | {np.mean(per_plate):.3f} ± {standard_error(per_plate):.3f} |" in text
    assert "Features: per channel (each channel embedded alone" in text


def test_one_plate_skips_the_protocols_across_plates_with_the_reason():
    meta, x = _screen(1, n_plates=1)
    cfg = EvalConfig(protocols=["probe", "per_plate_probe", "lopo_probe"], labels=["moa"], well_normalization="none",
                     n_splits=2)
    block = evaluate_features({"m": (meta, x)}, cfg)
    assert block["details"]["m"]["lopo_probe"]["moa"] == {
        "skipped": "leave-one-plate-out probe needs two or more plates, found 1"}
    assert "skipped" in block["details"]["m"]["per_plate_probe"]["moa"]
    assert block["metrics"]["m"]["lopo_probe_moa_top1"] is None and block["metrics"]["m"]["probe_moa_top1"] > 0


def test_preflight_one_line_when_only_protocols_across_plates_are_asked_of_one_plate(tiny_screen):
    from cellfm.config import load_config
    from cellfm.data.manifest import read_manifest

    manifest = read_manifest(tiny_screen["heldout"])
    plate = manifest["plate"].iloc[0]
    cfg = load_config(None, ["eval.protocols=[lopo_probe]"])
    lines = [p for p in evaluation_manifest_problems(cfg, manifest, "eval.manifests.seen=s.parquet") if "plates" in p]
    assert lines == [f"eval.protocols=['lopo_probe'] needs two or more plates (a standard error over plates, or plates "
                     f"to leave out), but eval.manifests.seen=s.parquet has 1 ({plate}); add held-out plates or use "
                     "the fixed-split probe"]
    # With another protocol to score, the report runs and says why the others were skipped.
    cfg.eval.protocols = ["probe", "lopo_probe"]
    assert not [p for p in evaluation_manifest_problems(cfg, manifest, "m") if "plates" in p]

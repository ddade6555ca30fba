"""Evaluation protocols against values derived by hand on small fixtures, copairs's own numbers on an
exported Parquet, the split rules, and the `evaluate_features` seam (no Ray)."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from cellfm.config import ConfigError, EvalConfig, load_config
from cellfm.evaluate.metrics import classification_scores
from cellfm.evaluate.neighbors import lopo_nearest_neighbors, nn_lopo_scores
from cellfm.evaluate.probes import compound_held_out_scores, localization_map_scores, multilabel_average_precision
from cellfm.evaluate.protocols import evaluate_features
from cellfm.evaluate.retrieval import moa_consistency, replicate_retrieval
from cellfm.evaluate.run import checkpoints_from_args
from cellfm.evaluate.splits import compound_held_out_split, leave_one_plate_out
from cellfm.evaluate.wells import well_profiles

NULL = {"null_size": 10000, "threshold": 0.05, "seed": 0}


def wells(rows: list[tuple]) -> pd.DataFrame:
    """(plate, well, perturbation_id, moa) rows; perturbation 'DMSO' marks a negative control."""
    meta = pd.DataFrame(rows, columns=["plate", "well", "perturbation_id", "moa"])
    return meta.assign(is_control=meta["perturbation_id"] == "DMSO")


def at_angle(degrees: float, scale: float = 1.0) -> np.ndarray:
    return scale * np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])


# ---------------------------------------------------------------------------------------------
# Classification scores and probes


def test_classification_scores_by_hand():
    # truth a a b b c, predicted a b b b c: top-1 4/5. Precision a = 1/1, b = 2/3 (3 predicted, 2
    # right), c = 1/1; weighted by true support (2, 2, 1): (2 * 1 + 2 * 2/3 + 1 * 1) / 5 = 13/15.
    scores = classification_scores(np.array(list("aabbc")), np.array(list("abbbc")))
    assert scores["top1"] == pytest.approx(4 / 5)
    assert scores["weighted_precision"] == pytest.approx(13 / 15)


def _impostor_screen():
    """MoAs m0 (compounds A1, A2, A3), m1 (B1, B2, B3), m2 (C1, C2), 3 wells each at their MoA's
    corner of the simplex, no noise; A3 is an impostor: labelled m0 but drawn at m1's corner. Two
    DMSO wells sit at m0's corner and would be m0's nearest class if controls were probed."""
    corners = {"m0": [4, 0, 0], "m1": [0, 4, 0], "m2": [0, 0, 4]}
    compounds = [("A1", "m0", "m0"), ("A2", "m0", "m0"), ("A3", "m0", "m1"), ("B1", "m1", "m1"), ("B2", "m1", "m1"),
                 ("B3", "m1", "m1"), ("C1", "m2", "m2"), ("C2", "m2", "m2"), ("DMSO", "control", "m0")]
    rows, x = [], []
    for compound, moa, drawn_at in compounds:
        for r in range(3 if compound != "DMSO" else 2):
            rows.append(("P1", f"{compound}-{r}", compound, moa))
            x.append(corners[drawn_at])
    return wells(rows), np.array(x, dtype=float)


def test_compound_held_out_probe_by_hand():
    """test_fraction 0.5 holds out int(0.5 n) = 1 compound of each MoA: 9 test wells per split. A split
    that holds out A3 predicts m1 for its 3 wells (top-1 6/9; weighted precision: m0 0 (never
    predicted), m1 3/6, m2 1, each with 3 true wells: (0 + 1.5 + 3) / 9 = 1/2); one that keeps A3 for
    training still predicts m1 at m1's corner (6 B wells outvote 3 A3 wells) and is right everywhere."""
    meta, x = _impostor_screen()
    seeds = list(range(6))
    result = compound_held_out_scores(x, meta, "moa", 0.5, seeds)
    treated = meta[~meta["is_control"]].reset_index(drop=True)
    a3_held_out = [bool("A3" in set(treated["perturbation_id"].to_numpy()[
        compound_held_out_split(treated["perturbation_id"].to_numpy(), treated["moa"].to_numpy(), 0.5, s)[1]]))
        for s in seeds]
    assert 0 < sum(a3_held_out) < len(seeds)  # the fixture exercises both cases
    assert result["top1_per_split"] == pytest.approx([2 / 3 if held else 1.0 for held in a3_held_out])
    assert result["weighted_precision"] == pytest.approx(np.mean([0.5 if held else 1.0 for held in a3_held_out]))
    assert result["n_classes"] == 3 and result["n_test_compounds"] == 3  # controls are not a class
    # Confusion summed over splits: each split tests 3 wells per MoA; A3's wells land in column m1.
    n = sum(a3_held_out)
    assert result["confusion"] == {"classes": ["m0", "m1", "m2"],
                                   "counts": [[3 * (len(seeds) - n), 3 * n, 0], [0, 3 * len(seeds), 0],
                                              [0, 0, 3 * len(seeds)]]}


@pytest.mark.parametrize("seed", range(200))
def test_compound_held_out_split_never_puts_a_compound_on_both_sides(seed):
    """Property over seeds, on a screen whose MoAs have 1 to 5 compounds of 1 to 4 wells each."""
    rng = np.random.default_rng(1000 + seed)
    groups, labels = [], []
    for m in range(5):
        for c in range(m + 1):  # MoA m has m + 1 compounds
            n_wells = int(rng.integers(1, 5))
            groups += [f"m{m}-c{c}"] * n_wells
            labels += [f"m{m}"] * n_wells
    order = rng.permutation(len(groups))
    groups, labels = np.array(groups)[order], np.array(labels)[order]
    test_fraction = float(rng.uniform(0.2, 0.8))
    train, test = compound_held_out_split(groups, labels, test_fraction, seed)
    assert sorted(np.concatenate([train, test])) == list(range(len(groups)))
    assert not set(groups[train]) & set(groups[test])
    for m in range(5):
        n = m + 1
        held = {g for g in groups[test] if g.startswith(f"m{m}-")}
        # A single-compound MoA stays on the train side; the others keep >= 1 compound to train on.
        assert len(held) == (0 if n == 1 else min(n - 1, max(1, int(test_fraction * n))))
    assert np.array_equal(test, compound_held_out_split(groups, labels, test_fraction, seed)[1])  # deterministic


def test_compound_held_out_split_differs_between_seeds_and_rejects_two_labels_per_compound():
    groups = np.repeat([f"c{i}" for i in range(8)], 2)
    labels = np.repeat(["a"] * 4 + ["b"] * 4, 2)
    assert len({tuple(compound_held_out_split(groups, labels, 0.5, s)[1]) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="compound 'c0' has wells labelled 'a' and 'b'"):
        compound_held_out_split(groups, np.where(np.arange(16) == 1, "b", labels), 0.5, 0)


def test_multilabel_average_precision_by_hand():
    # Class 0: scores rank wells 0 (+), 1, 2 (+), 3 -> AP = (1/1 + 2/3) / 2 = 5/6.
    # Class 1: scores rank wells 1 (+), 2, 0, 3 (+) -> AP = (1/1 + 2/4) / 2 = 3/4.
    # Class 2 has no positive well and is left out: mAP = (5/6 + 3/4) / 2 = 19/24.
    truth = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2], [0.3, 0.6, 0.3], [0.1, 0.1, 0.4]])
    result = multilabel_average_precision(truth, scores)
    assert result["per_class"] == pytest.approx({0: 5 / 6, 1: 3 / 4})
    assert result["map"] == pytest.approx(19 / 24)


def _localization_screen(noise: float = 0.05):
    """Proteins of 3 label sets (nucleus, cytosol, both), 2 proteins each, 3 wells per protein; a
    well's features are the sum of its compartments' prototypes (+ small noise)."""
    rng = np.random.default_rng(0)
    prototype = {"nucleus": np.array([3.0, 0]), "cytosol": np.array([0, 3.0])}
    rows, x = [], []
    for label in ("nucleus", "cytosol", "cytosol|nucleus"):
        for p in range(2):
            for r in range(3):
                rows.append(("P1", f"{label}-{p}-{r}", f"{label}-{p}", label))
                x.append(sum(prototype[c] for c in label.split("|")) + noise * rng.normal(size=2))
    meta = wells(rows)
    return meta.assign(localization=meta["moa"]), np.array(x)


def test_localization_map_is_one_on_separable_proteins_and_skipped_without_labels():
    """Each compartment is one feature direction (no other dimensions to overfit), so a class's
    one-vs-rest probe scores wells by their coordinate along its direction, positives first:
    AP = 1 per class and split, mAP = 1 (by hand)."""
    meta, x = _localization_screen()
    result = localization_map_scores(x, meta, "localization", 0.5, [0, 1, 2])
    assert result["map_per_split"] == pytest.approx([1.0, 1.0, 1.0])
    assert result["per_class_ap"] == pytest.approx({"cytosol": 1.0, "nucleus": 1.0})
    assert result["n_classes"] == 2
    # Shuffled features no longer rank held-out proteins: mAP drops below 1.
    shuffled = localization_map_scores(np.random.default_rng(1).permutation(x), meta, "localization", 0.5, [0, 1, 2])
    assert shuffled["map"] < 0.95
    assert "skipped" in localization_map_scores(x, meta.drop(columns="localization"), "localization", 0.5, [0])
    assert "skipped" in localization_map_scores(x, meta.assign(localization=""), "localization", 0.5, [0])


# ---------------------------------------------------------------------------------------------
# 1-NN leave-one-plate-out


def test_nn_lopo_macro_f1_by_hand():
    """Plate P1: x at 0 deg, y at 90, z at 45; plate P2: x at 5.7 (x100 length: cosine ignores it),
    y at 59.0, z at 16.7. Nearest across plates: P1-x -> P2-x, P1-y -> P2-y (59 is the closest to 90),
    P1-z -> P2-y (14 deg away), P2-x -> P1-x, P2-y -> P1-z (14), P2-z -> P1-x (16.7).
    Predicted x y y x z x for truth x y z x y z: x F1 = 2*(2/3*1)/(2/3+1) = 0.8, y (P 1/2, R 1/2) 0.5,
    z 0; macro-F1 = 1.3/3; accuracy 3/6."""
    meta = wells([("P1", "a", "x", "x"), ("P1", "b", "y", "y"), ("P1", "c", "z", "z"),
                  ("P2", "a", "x", "x"), ("P2", "b", "y", "y"), ("P2", "c", "z", "z")])
    x = np.stack([at_angle(0), at_angle(90), at_angle(45), 100 * np.array([1, 0.1]), np.array([0.6, 1.0]),
                  np.array([1.0, 0.3])])
    assert lopo_nearest_neighbors(x, meta["plate"].to_numpy()).tolist() == [3, 4, 4, 0, 2, 0]
    result = nn_lopo_scores(x, meta["perturbation_id"].to_numpy(), meta["plate"].to_numpy())
    assert result["macro_f1"] == pytest.approx(1.3 / 3)
    assert result["accuracy"] == pytest.approx(0.5)
    assert "skipped" in nn_lopo_scores(x[:3], np.array(list("xyz")), np.array(["P1"] * 3))


def test_lopo_nearest_neighbour_is_never_on_the_held_out_plate():
    """Every well has an exact twin on its own plate (the nearest overall); the neighbour must still
    come from another plate, and be the most similar well there."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8))
    x = np.concatenate([base, base + 1e-9])
    plates = np.tile(rng.choice(["P1", "P2", "P3"], size=30), 2)
    neighbor = lopo_nearest_neighbors(x, plates)
    assert (plates[neighbor] != plates).all()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(x)):
        others = np.flatnonzero(plates != plates[i])
        assert neighbor[i] == others[np.argmax(unit[others] @ unit[i])]
    assert [(p, len(te)) for p, _, te in leave_one_plate_out(plates)] == [
        (p, int((plates == p).sum())) for p in ("P1", "P2", "P3")]


# ---------------------------------------------------------------------------------------------
# Retrieval (copairs)


def test_replicate_map_and_fraction_retrieved_by_hand():
    """Plate P1: controls at 90 and 180 deg; compound A at 0 and 10; compound B at 100 and 150.
    Each query ranks its replicate against its own plate's 2 controls (positives 1, total 3):
    A0: A(10) C(90) C(180) -> AP 1; A10: A(10) C(80) C(170) -> 1;
    B100: C(10) B(50) C(80) -> 1/2; B150: C(30) B(50) C(60) -> 1/2. mAP A = 1, B = 1/2, mean 0.75.
    Plate P2's controls at 1 and 95 deg would outrank A's replicate if controls of other plates
    counted (neg_sameby=plate).
    Null: with 1 positive among 3, a random ranking gives AP 1, 1/2 or 1/3 with probability 1/3 each
    (and a perturbation's null is the mean of identical configurations, the same law). p(A) =
    (#null > 1 + 1)/(N + 1) = 1/(N + 1); p(B) = P(null > 1/2) ~ 1/3. Benjamini-Hochberg over 2 tests:
    2/(N + 1) < 0.05 and ~1/3 > 0.05: fraction retrieved 1/2."""
    meta = wells([("P1", "c1", "DMSO", "control"), ("P1", "c2", "DMSO", "control"), ("P1", "a1", "A", "m"),
                  ("P1", "a2", "A", "m"), ("P1", "b1", "B", "m"), ("P1", "b2", "B", "m"),
                  ("P2", "c1", "DMSO", "control"), ("P2", "c2", "DMSO", "control")])
    x = np.stack([at_angle(a) for a in (90, 180, 0, 10, 100, 150, 1, 95)])
    result = replicate_retrieval(meta, x, **NULL)
    assert result["per_group"]["A"]["map"] == pytest.approx(1.0)
    assert result["per_group"]["B"]["map"] == pytest.approx(0.5)
    assert result["map"] == pytest.approx(0.75)
    assert result["per_group"]["A"]["corrected_p_value"] == pytest.approx(2 / 10001)
    assert result["per_group"]["B"]["corrected_p_value"] == pytest.approx(1 / 3, abs=0.02)
    assert result["fraction_retrieved"] == 0.5 and result["n_perturbations"] == 2
    assert "skipped" in replicate_retrieval(meta[~meta["is_control"]], x[~meta["is_control"].to_numpy()], **NULL)


def test_moa_consistency_by_hand():
    """Consensus profile = median of a compound's 2 wells, (cos, sin, +-0.5) -> (cos, sin, 0) at angle:
    P 0, Q 50 (MoA m1); R 90, S 20 (m2); T 180, U 190 (m3). Each queries the other 5 (1 positive):
    P: S(20) Q(50) .. -> 1/2; Q: S(30) R(40) P(50) -> 1/3; R: Q(40) S(70) .. -> 1/2;
    S: P(20) Q(30) R(70) -> 1/3; T: U(10) -> 1; U: T(10) -> 1.
    mAP m1 = m2 = 5/12, m3 = 1; mean 11/18. The DMSO wells (at 52 deg, next to Q) are left out;
    counted, they would drop Q's AP. Null with 1 positive among 5: AP 1, 1/2, 1/3, 1/4, 1/5 equally
    likely: p(m3) = 1/(N + 1), p(m1) = p(m2) = P(null > 5/12) ~ 2/5; BH over 3: retrieved 1/3."""
    angles = {"P": (0, "m1"), "Q": (50, "m1"), "R": (90, "m2"), "S": (20, "m2"), "T": (180, "m3"),
              "U": (190, "m3"), "DMSO": (52, "control")}
    rows, x = [], []
    for compound, (angle, moa) in angles.items():
        for r, z in enumerate((0.5, -0.5)):
            rows.append(("P1", f"{compound}{r}", compound, moa))
            x.append([*at_angle(angle), z])
    result = moa_consistency(wells(rows), np.array(x), **NULL)
    assert {m: r["map"] for m, r in result["per_group"].items()} == pytest.approx({"m1": 5 / 12, "m2": 5 / 12, "m3": 1.0})
    assert result["map"] == pytest.approx(11 / 18)
    assert result["per_group"]["m3"]["corrected_p_value"] == pytest.approx(3 / 10001)
    assert result["per_group"]["m1"]["corrected_p_value"] == pytest.approx(2 / 5, abs=0.02)
    assert result["fraction_retrieved"] == pytest.approx(1 / 3)
    assert result["n_perturbations"] == 6


def _random_screen(seed: int = 0, n_plates: int = 3, dim: int = 16):
    """A screen with signal: 8 compounds in 3 MoAs (one MoA with a dual 'm0|m2' compound), 3 wells
    per compound and 4 controls per plate, plate offsets; features are random around MoA/compound centres."""
    rng = np.random.default_rng(seed)
    moa_centre = {m: rng.normal(size=dim) for m in ("m0", "m1", "m2")}
    compounds = {f"K{i}": ("m0", "m1", "m2")[i % 3] for i in range(7)} | {"K7": "m0|m2"}
    rows, x = [], []
    for p in range(n_plates):
        offset = rng.normal(size=dim) * 0.5
        for w in range(4):
            rows.append((f"P{p}", f"N{w}", "DMSO", "control"))
            x.append(offset + rng.normal(size=dim))
        for compound, moa in compounds.items():
            centre = sum(moa_centre[m] for m in moa.split("|")) + 0.7 * rng.normal(size=dim)
            for r in range(3):
                rows.append((f"P{p}", f"{compound}-{r}", compound, moa))
                x.append(offset + centre + rng.normal(size=dim))
    return wells(rows), np.array(x)


def test_map_equals_copairs_on_an_exported_parquet(tmp_path):
    """cellfm's replicate and MoA-consistency mAP (through the evaluate_features seam) equal copairs's
    own, run here from a Parquet with Metadata_* columns and explicit <model>_<i> feature columns the
    way a JUMP user would: unique negative-control ids, the JUMP parameters, median consensus."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.map.multilabel import average_precision as multilabel_average_precision_copairs

    meta, x = _random_screen()
    cfg = EvalConfig(protocols=["replicate_map", "moa_consistency"], well_normalization="none")
    block = evaluate_features({"trained": (meta, x)}, cfg)
    details = block["details"]["trained"]

    export = pd.DataFrame({f"Metadata_{c}": meta[c] for c in meta.columns})
    export = pd.concat([export, pd.DataFrame(x, columns=[f"trained_{i}" for i in range(x.shape[1])])], axis=1)
    export.to_parquet(tmp_path / "trained.parquet")

    profiles = pd.read_parquet(tmp_path / "trained.parquet")
    feature_columns = [c for c in profiles.columns if c.startswith("trained_")]
    features = profiles[feature_columns].to_numpy()
    md = profiles[[c for c in profiles.columns if c.startswith("Metadata_")]].copy()
    md["Metadata_pert_type"] = np.where(md["Metadata_is_control"], "negcon", "trt")
    negcon = md["Metadata_pert_type"] == "negcon"
    md.loc[negcon, "Metadata_perturbation_id"] = [f"DMSO_{i}" for i in range(int(negcon.sum()))]
    ap = average_precision(md, features, pos_sameby=["Metadata_perturbation_id"], pos_diffby=[],
                           neg_sameby=["Metadata_plate"],
                           neg_diffby=["Metadata_pert_type", "Metadata_perturbation_id"], progress_bar=False)
    ap = ap.query("Metadata_pert_type != 'negcon'")
    expected = mean_average_precision(ap, ["Metadata_perturbation_id"], null_size=10000, threshold=0.05, seed=0,
                                      progress_bar=False, cache_dir=tmp_path / "null-replicates")
    for _, row in expected.iterrows():
        mine = details["replicate_map"]["per_group"][row["Metadata_perturbation_id"]]
        assert mine["map"] == pytest.approx(row["mean_average_precision"], abs=1e-9)
        assert mine["corrected_p_value"] == pytest.approx(row["corrected_p_value"], abs=1e-12)
    assert block["metrics"]["trained"]["replicate_map"] == pytest.approx(expected["mean_average_precision"].mean())
    assert block["metrics"]["trained"]["replicate_fraction_retrieved"] == pytest.approx(
        expected["below_corrected_p"].mean())

    treated = profiles[~profiles["Metadata_is_control"]]
    consensus = treated.groupby("Metadata_perturbation_id")[feature_columns].median()
    moas = treated.groupby("Metadata_perturbation_id")["Metadata_moa"].first().loc[consensus.index]
    consensus_meta = pd.DataFrame({"Metadata_perturbation_id": consensus.index,
                                   "Metadata_moa": moas.str.split("|").to_numpy()})
    ap = multilabel_average_precision_copairs(consensus_meta, consensus.to_numpy(), pos_sameby=["Metadata_moa"],
                                              pos_diffby=["Metadata_perturbation_id"], neg_sameby=[],
                                              neg_diffby=["Metadata_moa"], multilabel_col="Metadata_moa",
                                              progress_bar=False)
    expected = mean_average_precision(ap, ["Metadata_moa"], null_size=10000, threshold=0.05, seed=0,
                                      progress_bar=False, cache_dir=tmp_path / "null-moa")
    assert set(expected["Metadata_moa"]) == {"m0", "m1", "m2"}
    for _, row in expected.iterrows():
        mine = details["moa_consistency"]["per_group"][row["Metadata_moa"]]
        assert mine["map"] == pytest.approx(row["mean_average_precision"], abs=1e-9)
        assert mine["corrected_p_value"] == pytest.approx(row["corrected_p_value"], abs=1e-12)
    assert block["metrics"]["trained"]["moa_consistency_map"] == pytest.approx(expected["mean_average_precision"].mean())


# ---------------------------------------------------------------------------------------------
# The evaluate_features seam


def _fast(**changes) -> EvalConfig:
    return dataclasses.replace(EvalConfig(n_splits=2, n_compound_splits=2, copairs_null_size=500), **changes)


def test_same_features_in_any_row_order_give_the_same_numbers():
    meta, x = _random_screen(1)
    cfg = _fast()
    first = evaluate_features({"a": (meta, x), "b": (meta, 2 * x + 1)}, cfg)
    order = np.random.default_rng(2).permutation(len(meta))
    shuffled = evaluate_features({"a": (meta.iloc[order], x[order]), "b": (meta.iloc[order], 2 * x[order] + 1)}, cfg)
    assert shuffled == first
    assert first["models"] == ["a", "b"] and first["n_wells"] == len(meta) and first["n_plates"] == 3
    # Every protocol ran (this screen has controls, plates, MoAs) except localization (no column).
    assert {k for k, v in first["metrics"]["a"].items() if v is None} == {"localization_map"}
    assert first["best_model"] in ("a", "b")


def test_per_field_features_are_averaged_per_well():
    meta, x = _random_screen(2, n_plates=2)
    rng = np.random.default_rng(3)
    noise = rng.normal(size=x.shape)
    fields = pd.concat([meta.assign(field=0), meta.assign(field=1)], ignore_index=True)
    per_field = np.concatenate([x + noise, x - noise])  # the two fields average to x
    cfg = _fast(well_normalization="negcon")
    from_fields = well_profiles(fields, per_field, "negcon", ["moa"])
    from_wells = well_profiles(meta, x, "negcon", ["moa"])
    assert from_fields.n_fields == 2 * len(meta) and from_wells.n_fields is None
    pd.testing.assert_frame_equal(from_fields.meta, from_wells.meta)
    np.testing.assert_allclose(from_fields.features, from_wells.features, atol=1e-10)
    block_fields = evaluate_features({"m": (fields, per_field)}, cfg)
    block_wells = evaluate_features({"m": (meta, x)}, cfg)
    for key, value in block_wells["metrics"]["m"].items():
        assert block_fields["metrics"]["m"][key] == pytest.approx(value, abs=1e-9), key


def test_bad_inputs_name_the_model_and_the_well():
    meta, x = _random_screen(4, n_plates=2)
    cfg = _fast(protocols=["probe"])
    with pytest.raises(ValueError, match="model 'm': metadata lacks column\\(s\\) moa"):
        evaluate_features({"m": (meta.drop(columns="moa"), x)}, cfg)
    with pytest.raises(ValueError, match="model 'm': metadata lacks column\\(s\\) target"):
        evaluate_features({"m": (meta, x)}, dataclasses.replace(cfg, labels=["moa", "target"]))
    bad = x.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match=f"model 'm': non-finite features at plate P0 well {meta['well'][5]}"):
        evaluate_features({"m": (meta, bad)}, cfg)
    with pytest.raises(ValueError, match="plate P0 well N0 appears more than once"):
        evaluate_features({"m": (pd.concat([meta, meta.iloc[:1]]), np.concatenate([x, x[:1]]))}, cfg)
    with pytest.raises(ValueError, match="model 'fewer' has other wells than 'm'"):
        evaluate_features({"m": (meta, x), "fewer": (meta.iloc[1:], x[1:])}, cfg)
    with pytest.raises(ValueError, match="plate P0: need at least 2 negative-control wells.*well_normalization=none"):
        evaluate_features({"m": (meta[~meta["is_control"]], x[~meta["is_control"].to_numpy()])},
                          dataclasses.replace(cfg, well_normalization="negcon"))


def test_unsupported_protocols_are_skipped_with_a_reason():
    """One plate, no controls, no localization: only the probes run."""
    meta, x = _random_screen(5, n_plates=1)
    keep = ~meta["is_control"].to_numpy()
    block = evaluate_features({"m": (meta[keep], x[keep])}, _fast(well_normalization="none"))
    details = block["details"]["m"]
    assert details["nn_lopo"]["moa"] == {"skipped": "leave-one-plate-out needs two or more plates, found 1"}
    assert details["replicate_map"] == {"skipped": "no negative-control wells to retrieve replicates against"}
    assert details["localization_map"] == {"skipped": "no well has a localization label"}
    assert block["metrics"]["m"]["nn_lopo_moa_macro_f1"] is None
    assert block["metrics"]["m"]["heldout_moa_top1"] is not None and block["metrics"]["m"]["moa_consistency_map"] is not None
    # 24 treated wells, test fraction 0.2: 5 test wells cannot hold the 8 compounds; the 4 MoAs fit.
    probe = evaluate_features({"m": (meta[keep], x[keep])},
                              _fast(well_normalization="none", protocols=["probe"], test_fraction=0.2))
    assert probe["details"]["m"]["probe"]["perturbation_id"] == {
        "skipped": "24 wells split 19/5 cannot hold all 8 perturbation_id classes on both sides"}
    assert probe["details"]["m"]["probe"]["moa"]["n_test_wells"] == 5


def test_localization_runs_through_the_seam_when_the_column_is_there():
    meta, x = _localization_screen()
    block = evaluate_features({"m": (meta, x)}, _fast(well_normalization="none", protocols=["localization_map"]))
    assert block["metrics"]["m"] == {"localization_map": pytest.approx(1.0)}
    assert block["spread"]["m"] == {"localization_map": pytest.approx(0.0)}


def test_eval_config_keys_are_validated():
    for override, message in [("eval.protocols=[probe, knn]", "eval.protocols=.*must list distinct protocols"),
                              ("eval.protocols=[probe, probe]", "must list distinct protocols"),
                              ("eval.copairs_threshold=0", "eval.copairs_threshold must be in \\(0, 1\\)"),
                              ("eval.copairs_null_size=0", "eval.copairs_null_size must be > 0"),
                              ("eval.n_compound_splits=0", "eval.n_compound_splits must be > 0"),
                              ("eval.embedding_map=tsne", "eval.embedding_map='tsne' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    assert load_config(None, ["eval.protocols=[nn_lopo]"]).eval.protocols == ["nn_lopo"]


def test_checkpoint_arguments():
    assert checkpoints_from_args(["/runs/a/checkpoint_1"]) == {"trained": "/runs/a/checkpoint_1"}
    assert checkpoints_from_args(["cellrep=/a", "vit_rgb=s3://b/c"]) == {"cellrep": "/a", "vit_rgb": "s3://b/c"}
    with pytest.raises(ConfigError, match="each must be NAME=PATH"):
        checkpoints_from_args(["cellrep=/a", "/b"])
    with pytest.raises(ConfigError, match="'cellrep' is used twice"):
        checkpoints_from_args(["cellrep=/a", "cellrep=/b"])
    with pytest.raises(ConfigError, match="'random_init' is a baseline name"):
        checkpoints_from_args(["random_init=/a"])


def test_embedded_fields_carry_the_manifests_localization_labels():
    """`run.field_features`: embed_manifest's rows (metadata + an embedding column, any order) become
    the seam's input; localization comes from the manifest by (plate, well, field)."""
    from cellfm.evaluate.run import field_features

    manifest = pd.DataFrame({"plate": ["P"] * 4, "well": ["A01", "A01", "B01", "B01"], "field": [0, 1, 0, 1],
                             "perturbation_id": ["p1", "p1", "p2", "p2"], "moa": ["nucleus", "nucleus", "er", "er"],
                             "is_control": False, "localization": ["nucleus", "nucleus", "er", "er"]})
    fields = manifest.drop(columns="localization").iloc[[3, 0, 2, 1]].assign(
        embedding_m=[np.full(3, float(i)) for i in (3, 0, 2, 1)])
    meta, x = field_features(fields, manifest, "embedding_m")
    assert meta["localization"].tolist() == ["er", "nucleus", "er", "nucleus"]
    np.testing.assert_array_equal(x[:, 0], [3, 0, 2, 1])
    # Any eval.labels column travels too, and reaches the wells the probe classifies.
    meta, x = field_features(fields, manifest.assign(target=["t1", "t1", "t2", "t2"]), "embedding_m", ["target"])
    assert meta["target"].tolist() == ["t2", "t1", "t2", "t1"]
    wells = well_profiles(meta, x, "none", ["target"])
    assert wells.meta["target"].tolist() == ["t1", "t2"] and wells.features[:, 0].tolist() == [0.5, 2.5]

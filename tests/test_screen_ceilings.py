"""Ground truth beside synthetic plates (cell tables, label images) and the ceilings/baselines built
on it: the oracle features, the CellProfiler-style (cp-measure) morphology and the supervised CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellfm.data.manifest import read_manifest
from cellfm.data.synthetic.catalog import CP5_CHANNELS, PERTURBATIONS, PROTEINS, ScreenLayout, perturbations
from cellfm.data.synthetic.optics import BatchEffect, render_field
from cellfm.data.synthetic.screens import generate_family_screen
from cellfm.data.truth import CELL_COLUMNS, field_truth, read_cells, read_labels, truth_uris
from cellfm.evaluate.ceilings import oracle_feature_names, oracle_features

SMALL = ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=1,
                     controls_per_plate=2, fields_per_well=2, field_size=64)
BY_ID = {p.perturbation_id: p for p in PERTURBATIONS}


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> dict[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("truth")
    return {name: read_manifest(generate_family_screen(root / name, name, SMALL, 0)["train"])
            for name in ("cp5", "hpa4")}


def test_field_truth_records_what_the_renderer_drew():
    context: dict = {}
    phenotype = BY_ID["CMP-11"].phenotype  # nucleolar stress: responders have bigger nucleoli
    render_field(np.random.default_rng(3), CP5_CHANNELS, phenotype, 96, BatchEffect(), context)
    table, labels = field_truth(context, "P", "B03", 1, (phenotype.nucleoli_size, 1.2))
    cells = context["cells"]
    assert list(table.columns) == list(CELL_COLUMNS) and len(table) == len(cells.cy)
    np.testing.assert_array_equal(table["mito_fragmentation"], cells.fragmentation)
    np.testing.assert_array_equal(table["nucleoli_count"], cells.nucleoli)
    np.testing.assert_allclose(table["nucleus_radius"], np.sqrt(cells.na * cells.nb), rtol=1e-6)
    np.testing.assert_array_equal(table["nucleoli_size"], np.where(cells.responder, phenotype.nucleoli_size, 1.2))
    nuclei, whole = labels
    assert labels.shape == (2, 96, 96) and labels.dtype == np.uint32
    inside = nuclei > 0
    np.testing.assert_array_equal(nuclei[inside], whole[inside])  # a nucleus lies in its own cell
    np.testing.assert_array_equal(np.bincount(whole.ravel(), minlength=len(table) + 1)[1:], table["cell_area"])
    np.testing.assert_array_equal(np.bincount(nuclei.ravel(), minlength=len(table) + 1)[1:], table["nucleus_area"])
    # Centres: the pixel at a visible cell's nucleus centre belongs to that cell.
    visible = table[(table["nucleus_area"] > 0) & table["nucleus_y"].between(0, 95) & table["nucleus_x"].between(0, 95)]
    owners = whole[np.rint(visible["nucleus_y"]).astype(int), np.rint(visible["nucleus_x"]).astype(int)]
    assert (owners == visible["cell_id"].to_numpy()).mean() > 0.9


def test_truth_is_written_beside_each_plate_per_field(screens):
    df = screens["cp5"]
    store = df["store_uri"].iloc[0]
    cells_uri, labels_uri = truth_uris(store)
    assert Path(cells_uri).parent == Path(store).parent.parent / "truth" and Path(labels_uri).is_dir()
    assert not list(Path(store).rglob("*labels*"))  # the plate itself holds only its images
    cells = read_cells(store)
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert set(zip(cells["well"], cells["field"])) == set(zip(df["well"], df["field"]))
    row = df.iloc[3]
    nuclei, whole = read_labels(store, row.row, row.col, row.field)
    field = cells[(cells["well"] == row.well) & (cells["field"] == row.field)]
    np.testing.assert_array_equal(np.bincount(whole.ravel(), minlength=len(field) + 1)[1:], field["cell_area"])
    assert nuclei.shape == (64, 64) and (nuclei > 0).sum() < (whole > 0).sum()
    # Parameters follow the well's treatment: responders carry its phenotype, others the control's.
    well = df.drop_duplicates("well").set_index("perturbation_id").loc["CMP-11"]
    treated = cells[cells["well"] == well.well]
    assert (treated.loc[treated["responder"], "nucleoli_size"] == BY_ID["CMP-11"].phenotype.nucleoli_size).all()
    assert (treated.loc[~treated["responder"], "nucleoli_size"] == PERTURBATIONS[0].phenotype.nucleoli_size).all()


def test_oracle_features_are_the_recorded_parameters_per_well(screens):
    df = screens["cp5"]
    meta, features = oracle_features(df)
    names = oracle_feature_names(CP5_CHANNELS)
    assert features.shape == (df["well"].nunique(), len(names))
    assert meta["well"].tolist() == sorted(df["well"].unique())
    i = 5  # hand-check one well against the cell table
    cells = read_cells(df["store_uri"].iloc[0])
    cells = cells[(cells["well"] == meta["well"][i]) & (cells["cell_area"] > 0)]
    expected = {"er_swelling": cells["er_swelling"].mean(), "nucleoli_count": cells["nucleoli_count"].mean(),
                "responder_fraction": cells["responder"].mean(), "cells_per_field": len(cells) / SMALL.fields_per_well}
    for name, value in expected.items():
        assert features[i, names.index(name)] == pytest.approx(value, rel=1e-9), name
    # Brightfield shows no ER or mitochondria: its oracle does not know them.
    assert {"er_swelling", "mito_fragmentation"}.isdisjoint(oracle_feature_names(["Brightfield"]))


def test_oracle_knows_the_protein_compartments(screens):
    df = screens["hpa4"]
    meta, features = oracle_features(df)
    names = oracle_feature_names(list(df["channel_names"].iloc[0]))
    by_id = {p.protein_id: p for p in PROTEINS}
    assert len(by_id) == len(PROTEINS) == 3 * len({p.localization for p in PROTEINS})  # one id per protein
    for i, row in meta.iterrows():
        protein = by_id[row.perturbation_id]
        assert protein.localization == row.localization
        assert features[i, names.index(f"protein_in_{protein.localization}")] == pytest.approx(1 - protein.secondary_fraction)
        assert features[i, names.index(f"protein_in_{protein.secondary}")] == pytest.approx(protein.secondary_fraction)


def test_clear_screen_keeps_compounds_and_strengthens_their_phenotypes():
    subtle, clear = perturbations("subtle"), perturbations("clear")
    assert subtle == PERTURBATIONS
    assert [(p.perturbation_id, p.moa, p.dose) for p in clear] == [(p.perturbation_id, p.moa, p.dose) for p in subtle]
    control = PERTURBATIONS[0].phenotype
    for s, c in zip(subtle[1:], clear[1:]):
        ph = c.phenotype
        assert ph.penetrance > s.phenotype.penetrance
        # Nuclei cover the control's share of a field: mean nucleus area x density is the control's.
        mean_area = ph.penetrance * ph.nucleus_scale ** 2 + 1 - ph.penetrance
        assert ph.density * mean_area == pytest.approx(control.density)
        if c.moa == "cell_cycle_arrest":  # G2 arrest: bigger nuclei holding twice the DNA, not dimmer ones
            assert 1.7 <= ph.dna_content <= 2.0 and ph.dna_content == pytest.approx(ph.nucleus_scale ** 2, rel=0.1)
        else:
            assert ph.dna_content == 1.0
    with pytest.raises(ValueError, match="unknown difficulty"):
        perturbations("hard")


def test_cp_measure_features_of_a_disc_cell_are_its_known_area_and_intensity():
    from cellfm.features.morphology import field_profile, object_features

    yy, xx = np.mgrid[0:64, 0:64]
    cell = (yy - 30) ** 2 + (xx - 34) ** 2 <= 12 ** 2      # disc of radius 12
    nucleus = (yy - 30) ** 2 + (xx - 34) ** 2 <= 5 ** 2
    cells, nuclei = cell.astype(np.int32), nucleus.astype(np.int32)
    image = np.stack([np.where(nucleus, 0.8, 0.05), np.where(cell, 0.25, 0.0)])  # DNA, ER: constant per object
    tables = object_features(image, ["DNA", "ER"], nuclei, cells)
    c, n = tables["Cells"].iloc[0], tables["Nuclei"].iloc[0]
    assert c["Area"] == cell.sum() and n["Area"] == nucleus.sum()
    assert c["Area"] == pytest.approx(np.pi * 12 ** 2, rel=0.03)  # a digital disc
    assert c["EquivalentDiameter"] == pytest.approx(2 * np.sqrt(cell.sum() / np.pi))
    assert c["Eccentricity"] == pytest.approx(0.0, abs=0.05)
    assert c["Intensity_MeanIntensity_ER"] == pytest.approx(0.25)
    assert c["Intensity_IntegratedIntensity_ER"] == pytest.approx(0.25 * cell.sum())
    assert n["Intensity_MeanIntensity_DNA"] == pytest.approx(0.8) and n["Intensity_StdIntensity_DNA"] == pytest.approx(0)
    # The cell's DNA: the nucleus' signal plus background over the rest of the disc.
    assert c["Intensity_IntegratedIntensity_DNA"] == pytest.approx(0.8 * nucleus.sum() + 0.05 * (cell.sum() - nucleus.sum()))
    profile = field_profile(image, ["DNA", "ER"], nuclei, cells)
    assert profile["Count", "Cells"] == 1 and profile["Cells", "Area"] == cell.sum()


def test_well_morphology_averages_field_profiles_per_well_and_reports_progress(screens, capsys):
    from cellfm.features.morphology import well_morphology

    wells = sorted(set(zip(screens["cp5"]["plate"], screens["cp5"]["well"])))[:2]
    fields = screens["cp5"][screens["cp5"][["plate", "well"]].apply(tuple, axis=1).isin(wells)]
    assert len(fields) == 4  # two wells of two fields
    meta, features = well_morphology(fields, progress_interval_s=0)
    assert list(zip(meta["plate"], meta["well"])) == wells and features.shape[0] == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "cp-measure:" in line]
    assert [line.split("cp-measure: ")[1].split(" fields")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[-1].endswith("ETA 0s")
    # Its first feature is the object count: each well's mean over its fields of the cells in the label image.
    for (plate, well), count in zip(wells, features[:, 0]):
        mine = fields[(fields["plate"] == plate) & (fields["well"] == well)]
        cells = [len(np.unique(read_labels(r.store_uri, r.row, r.col, r.field)[1])) - 1 for r in mine.itertuples()]
        assert count == pytest.approx(np.mean(cells)) and min(cells) > 0


def test_supervised_cnn_is_deterministic_learns_a_texture_label_and_averages_wells():
    import torch

    from cellfm.evaluate.supervised_cnn import CNNSettings, cnn_field_features, cnn_well_features, train_supervised_cnn

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    labels = ["fine", "coarse"] * 24
    # Same mean and range, stripes of period 3 or 9 at a random angle and phase: texture, not intensity.
    fields = []
    for label in labels:
        angle, period = rng.uniform(0, np.pi), 3.0 if label == "fine" else 9.0
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * ((yy * np.cos(angle) + xx * np.sin(angle)) / period + rng.random()))
        fields.append(np.stack([stripes, rng.random((32, 32))]))
    fields = torch.from_numpy(np.stack(fields).astype(np.float32))
    short = CNNSettings(epochs=1, batch_size=16, width=8, seed=3)
    once, again = train_supervised_cnn(fields, labels, short)[0], train_supervised_cnn(fields, labels, short)[0]
    for a, b in zip(once.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model, classes = train_supervised_cnn(fields, labels, CNNSettings(epochs=15, batch_size=16, width=8, seed=3))
    assert classes == ["coarse", "fine"]
    with torch.no_grad():
        predicted = model(fields)["logits"].argmax(1).numpy()
    assert (predicted == np.array([classes.index(label) for label in labels])).mean() > 0.9
    manifest = pd.DataFrame({"plate": "P", "well": [f"W{i // 2:02d}" for i in range(len(labels))], "moa": labels})
    meta, wells = cnn_well_features(model, fields, manifest)
    per_field = cnn_field_features(model, fields)
    assert wells.shape == (24, 4 * 8) and meta["well"].tolist() == sorted(manifest["well"].unique())
    np.testing.assert_allclose(wells[3], per_field[6:8].mean(axis=0), rtol=1e-6)


def test_synth_rejects_an_unknown_difficulty_in_one_line(tmp_path, capsys):
    from cellfm.cli import main

    assert main(["synth", str(tmp_path / "s"), "--family", "cp5", "--difficulty", "hard"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --difficulty='hard' is not one of ['clear', 'subtle']"]
    assert not (tmp_path / "s").exists()

"""Synthetic screens: layout, determinism, idempotence, and that phenotypes live in morphology
(learnable) rather than in per-channel intensity statistics (not trivially given away)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import zarr
from ome_zarr_models.v05.hcs import HCS
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellfm.data.manifest import MANIFEST_COLUMNS, check_manifest_against_plates, read_manifest
from cellfm.data.normalize import percentile_clip
from cellfm.data.plate import read_field
from cellfm.data.synthetic.catalog import CP5_CHANNELS, LAYOUTS, PERTURBATIONS, UNSEEN4_CHANNELS, ScreenLayout
from cellfm.data.synthetic.optics import BatchEffect, render_field
from cellfm.data.synthetic.screens import generate_screen

TINY = LAYOUTS["tiny"]
BY_ID = {p.perturbation_id: p for p in PERTURBATIONS}
# Realistic noise, no gain/offset nuisance: for measuring morphology.
CLEAN = BatchEffect(photons_per_count=1.0, read_noise=5.0)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> dict[str, Path]:
    return generate_screen(tmp_path_factory.mktemp("screen"), "tiny", seed=0)


@pytest.fixture(scope="module")
def manifests(screen) -> dict[str, pd.DataFrame]:
    return {split: read_manifest(path) for split, path in screen.items()}


def test_manifests_describe_every_field(screen, manifests):
    assert {k: p.name for k, p in screen.items()} == {
        "train": "train.parquet", "heldout": "heldout.parquet", "unseen": "unseen.parquet"}
    wells_per_plate = TINY.controls_per_plate + (len(PERTURBATIONS) - 1) * TINY.replicates_per_plate
    for split, channels in (("train", CP5_CHANNELS), ("heldout", CP5_CHANNELS), ("unseen", UNSEEN4_CHANNELS)):
        df = manifests[split]
        assert list(df.columns) == list(MANIFEST_COLUMNS)
        assert len(df) == wells_per_plate * TINY.fields_per_well
        assert df["plate"].unique().tolist() == [f"SYN-{split.upper()}-01"]
        assert (df["source"] == "synthetic").all()
        assert all(names == channels for names in df["channel_names"])
        assert all(groups == ["context"] * len(channels) for groups in df["channel_groups"])
        assert (df["height"] == TINY.field_size).all() and (df["dtype"] == "uint16").all()
        assert Path(df["store_uri"].iloc[0]).is_absolute()
        check_manifest_against_plates(df)
    controls = manifests["train"][manifests["train"]["is_control"]]
    assert set(controls["perturbation_id"]) == {"DMSO"} and set(controls["moa"]) == {"control"}
    assert (controls["dose"] == 0.0).all()
    compounds = manifests["train"][~manifests["train"]["is_control"]]
    assert compounds["perturbation_id"].nunique() == 12 and compounds["moa"].nunique() == 5
    assert (compounds["dose"] > 0).all()
    # Compound identity determines MoA and dose.
    assert (compounds.groupby("perturbation_id")[["moa", "dose"]].nunique() == 1).all().all()


def test_every_plate_holds_every_compound_and_controls_at_shuffled_positions(manifests):
    wells = pd.concat(manifests.values()).drop_duplicates(["plate", "well"])
    counts = wells.groupby(["plate", "perturbation_id"]).size().unstack()
    assert counts.shape == (3, len(PERTURBATIONS))
    assert (counts["DMSO"] == TINY.controls_per_plate).all()
    assert (counts.drop(columns="DMSO") == TINY.replicates_per_plate).all().all()
    layouts = [tuple(g.sort_values("well")["perturbation_id"]) for _, g in wells.groupby("plate")]
    assert len(set(layouts)) == 3  # well positions are randomized per plate


def test_fields_have_declared_shape_dtype_and_channels(manifests):
    for split in ("train", "unseen"):
        row = manifests[split].iloc[5]
        image, names = read_field(row.store_uri, row.row, row.col, row.field)
        assert names == list(row.channel_names)
        assert image.shape == (len(names), TINY.field_size, TINY.field_size) and image.dtype == np.uint16
        assert image.min() > 0 and image.max() < 65535  # background offset, no saturation


def test_plates_validate_as_ome_zarr(screen, manifests):
    uri = manifests["unseen"]["store_uri"].iloc[0]
    hcs = HCS.from_zarr(zarr.open_group(uri, mode="r"))
    assert hcs.n_wells == manifests["unseen"]["well"].nunique()


def test_render_field_is_deterministic_and_channel_consistent():
    phenotype = BY_ID["CMP-04"].phenotype
    a = render_field(np.random.default_rng(7), CP5_CHANNELS, phenotype, 96, CLEAN)
    b = render_field(np.random.default_rng(7), CP5_CHANNELS, phenotype, 96, CLEAN)
    c = render_field(np.random.default_rng(8), CP5_CHANNELS, phenotype, 96, CLEAN)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # The 4-stain configuration renders the same biology, only a subset in another order.
    unseen = render_field(np.random.default_rng(7), UNSEEN4_CHANNELS, phenotype, 96, CLEAN)
    np.testing.assert_array_equal(unseen, a[[CP5_CHANNELS.index(ch) for ch in UNSEEN4_CHANNELS]])
    with pytest.raises(ValueError, match="Tubulin"):
        render_field(np.random.default_rng(7), ["DNA", "Tubulin"], phenotype, 96, CLEAN)


def test_generation_is_idempotent_deterministic_and_recovers_from_crashes(screen, manifests):
    """Different seeds differing is covered per field (test_render_field_is_deterministic...)."""
    root = screen["train"].parent
    started = time.perf_counter()
    assert generate_screen(root, "tiny", seed=0) == screen  # complete: returned as is
    assert time.perf_counter() - started < 1.0

    manifest_bytes = {split: path.read_bytes() for split, path in screen.items()}
    row = manifests["heldout"].iloc[7]
    field_before = read_field(row.store_uri, row.row, row.col, row.field)[0]
    # A run that died before writing all manifests is regenerated from scratch, to the same bytes.
    screen["unseen"].unlink()
    train_mtime = screen["train"].stat().st_mtime_ns
    assert generate_screen(root, "tiny", seed=0) == screen
    assert screen["train"].stat().st_mtime_ns != train_mtime  # really regenerated
    assert {split: path.read_bytes() for split, path in screen.items()} == manifest_bytes
    np.testing.assert_array_equal(read_field(row.store_uri, row.row, row.col, row.field)[0], field_before)


def _morphology(perturbation_id: str, n_fields: int = 16) -> dict[str, float]:
    """Simple per-field measurements averaged over fields rendered without plate nuisances."""
    values: dict[str, list[float]] = {k: [] for k in ("nucleus_area", "nuclei", "mito_objects_per_nucleus",
                                                    "nucleoli_per_nucleus", "nucleolus_area", "actin_over_nuclei")}
    for i in range(n_fields):
        image = render_field(np.random.default_rng([11, i]), CP5_CHANNELS, BY_ID[perturbation_id].phenotype, 128, CLEAN)
        dna, _, rna, agp, _ = percentile_clip(image, 1.0, 99.5)
        nuclei = dna > 0.2
        labels, _ = ndi.label(nuclei)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas >= 20]
        n_nuclei = max(len(areas), 1)
        mito = image[4].astype(np.float32) - np.percentile(image[4], 20)  # background-subtracted
        _, n_mito = ndi.label(mito > 0.5 * np.percentile(mito, 95))  # fragments are separate objects
        nucleoli, n_nucleoli = ndi.label((rna > 0.5) & nuclei)
        values["nucleus_area"].append(areas.mean())
        values["nuclei"].append(len(areas))
        values["mito_objects_per_nucleus"].append(n_mito / n_nuclei)
        values["nucleoli_per_nucleus"].append(n_nucleoli / n_nuclei)
        values["nucleolus_area"].append(np.bincount(nucleoli.ravel())[1:].mean() if n_nucleoli else 0.0)
        values["actin_over_nuclei"].append(agp[nuclei].mean() / agp.mean())  # stress fibres cross the nucleus
    return {k: float(np.mean(v)) for k, v in values.items()}


def test_moas_change_the_intended_morphology():
    control = _morphology("DMSO")
    arrest = _morphology("CMP-01")
    assert arrest["nucleus_area"] > 1.4 * control["nucleus_area"]  # nuclear enlargement
    assert arrest["nuclei"] < 0.85 * control["nuclei"]  # lower cell density
    assert _morphology("CMP-04")["mito_objects_per_nucleus"] > 1.15 * control["mito_objects_per_nucleus"]
    nucleolar_stress = _morphology("CMP-11")  # fewer, larger nucleoli
    assert nucleolar_stress["nucleoli_per_nucleus"] < 0.85 * control["nucleoli_per_nucleus"]
    # The bright area of a stain is mapped onto the control's (`_optical_signal`), so thresholded
    # nucleoli grow less than their Gaussian width does.
    assert nucleolar_stress["nucleolus_area"] > 1.2 * control["nucleolus_area"]
    assert _morphology("CMP-09")["actin_over_nuclei"] > 1.15 * control["actin_over_nuclei"]


def test_per_cell_stain_amounts_do_not_depend_on_phenotype():
    """Rearranging a stain keeps its amount: without density changes, channel means barely move."""
    def channel_means(pid: str) -> np.ndarray:
        fields = [render_field(np.random.default_rng([5, i]), CP5_CHANNELS, BY_ID[pid].phenotype, 128, BatchEffect())
                  for i in range(6)]
        return np.mean([f.reshape(5, -1).mean(axis=1) for f in fields], axis=0)

    control = channel_means("DMSO")
    for pid in ("CMP-05", "CMP-06", "CMP-09", "CMP-12"):  # mito, ER, actin, nucleolar MoAs
        np.testing.assert_allclose(channel_means(pid), control, rtol=0.08)


# The control and one compound of each MoA, and the percentiles a histogram's shape is read at.
_CONTROL_AND_MOAS = ("DMSO", "CMP-01", "CMP-04", "CMP-06", "CMP-09", "CMP-11")
_SHAPE_LEVELS = (5, 25, 50, 75, 95, 99)


def _histogram_shape(values: np.ndarray) -> np.ndarray:
    """Percentiles over the mean: a histogram's shape, whatever its scale."""
    return np.percentile(values, _SHAPE_LEVELS) / values.mean()


def test_stain_histograms_inside_compartments_do_not_depend_on_phenotype():
    """Each stain's in-focus values inside its compartment keep their order and mean but take the
    control cells' distribution, whatever the MoA; outside the compartment nothing changes."""
    from cellfm.data.synthetic.catalog import STAINS
    from cellfm.data.synthetic.optics import _HISTOGRAM_COMPARTMENTS, _optical_signal, _psf
    from cellfm.data.synthetic.stains import render_stains

    shapes = {}
    for pid in _CONTROL_AND_MOAS:
        context: dict = {}
        raw = dict(zip(STAINS, render_stains(np.random.default_rng([13, 0]), BY_ID[pid].phenotype, 128, context)))
        matched = _optical_signal(np.random.default_rng(0), raw, STAINS, context, 0.0, imaged_histograms=False)
        for k, stain in enumerate(STAINS):
            mask = context[_HISTOGRAM_COMPARTMENTS[stain]]
            before, after = _psf(raw[stain]), matched[k]
            np.testing.assert_array_equal(after[~mask], before[~mask])
            np.testing.assert_allclose(after[mask].mean(), before[mask].mean(), rtol=1e-3)
            assert np.all(np.diff(after[mask][np.argsort(before[mask], kind="stable")]) >= 0)  # same order
            shapes[pid, stain] = (_histogram_shape(before[mask]), _histogram_shape(after[mask]))
    for stain in STAINS:
        for pid in ("CMP-01", "CMP-04", "CMP-06", "CMP-09", "CMP-11"):
            np.testing.assert_allclose(shapes[pid, stain][1], shapes["DMSO", stain][1], rtol=0.03, atol=0.01)
    # Without the mapping, rearranged stains do give themselves away: fragmented mitochondria,
    # stress fibres and big nucleoli have other percentiles than the control's.
    for pid, stain in (("CMP-04", "Mito"), ("CMP-09", "AGP"), ("CMP-11", "RNA")):
        assert np.abs(shapes[pid, stain][0] - shapes["DMSO", stain][0]).max() > 0.1, (pid, stain)  # x mean


def test_clear_screen_fixes_histograms_after_defocus_and_the_protein_for_every_localization():
    """Fixed in focus (subtle), a 2-px defocus narrows fine textures' histograms more than coarse ones', so each
    MoA's percentiles move away from the control's; fixed after blur (clear) they equal the control's. The Protein
    channel's whole-field histogram is then one for every localization."""
    from cellfm.data.synthetic.catalog import CONTROL_PHENOTYPE, LOCALIZATIONS, PROTEINS, STAINS, screen_difficulty
    from cellfm.data.synthetic.optics import _HISTOGRAM_COMPARTMENTS, _optical_signal
    from cellfm.data.synthetic.stains import family_signals, render_stains

    assert not screen_difficulty("subtle").imaged_histograms and screen_difficulty("clear").imaged_histograms
    clear = {p.perturbation_id: p for p in screen_difficulty("clear").perturbations}
    moved = {}
    for imaged in (False, True):
        shapes = {}
        for pid in _CONTROL_AND_MOAS:
            context: dict = {}
            raw = dict(zip(STAINS, render_stains(np.random.default_rng([13, 0]), clear[pid].phenotype, 128, context)))
            out = _optical_signal(np.random.default_rng(1), raw, STAINS, context, 2.0, imaged_histograms=imaged)
            for k, stain in enumerate(STAINS):
                shapes[pid, stain] = _histogram_shape(out[k][context[_HISTOGRAM_COMPARTMENTS[stain]]])
        moved[imaged] = {(pid, stain): np.abs(shapes[pid, stain] - shapes["DMSO", stain]).max()
                         for pid, stain in shapes if pid != "DMSO"}
    assert max(moved[True].values()) < 0.01
    for pid, stain in (("CMP-04", "Mito"), ("CMP-06", "ER"), ("CMP-09", "AGP"), ("CMP-11", "RNA")):
        assert moved[False][pid, stain] > 0.2, (pid, stain)

    protein_shapes = {}
    for imaged in (False, True):
        for localization in LOCALIZATIONS:
            protein = next(p for p in PROTEINS if p.localization == localization)
            rng, context = np.random.default_rng([17, 0]), {}
            render_stains(rng, CONTROL_PHENOTYPE, 128, context=context)
            signals = family_signals(rng, context, 128, protein)
            out = _optical_signal(np.random.default_rng(2), signals, ["Protein"], context, 1.0, imaged_histograms=imaged)
            protein_shapes[localization, imaged] = _histogram_shape(out[0])
    for imaged, bound in ((True, 0.01), (False, 0.5)):
        spread = max(np.abs(protein_shapes[loc, imaged] - protein_shapes["cytosol", imaged]).max() for loc in LOCALIZATIONS)
        assert (spread < bound) if imaged else (spread > bound), (imaged, spread)


def test_rank_map_takes_the_template_keeps_order_and_mean_and_breaks_ties_at_random():
    from cellfm.data.synthetic.optics import _rank_map

    template = np.linspace(0.0, 2.0, 64).astype(np.float32)
    values = np.r_[np.zeros(900), np.linspace(1.0, 5.0, 100)].astype(np.float32)  # a protein absent from 90 %
    by_position = _rank_map(values, template, None)
    at_random = _rank_map(values, template, np.random.default_rng(0))
    for matched in (by_position, at_random):
        assert matched.mean() == pytest.approx(values.mean(), rel=1e-5)
        assert np.all(np.diff(matched[900:]) >= 0) and matched[900:].min() >= matched[:900].max()  # order kept
        np.testing.assert_allclose(np.sort(matched), np.sort(by_position), rtol=1e-6)  # one histogram
    # Ties ranked by position become a ramp; at random they carry no trace of where they are.
    assert np.all(np.diff(by_position[:900]) >= 0)
    assert abs(np.corrcoef(np.arange(900), at_random[:900])[0, 1]) < 0.1


def _well_features(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Per-well mean of per-field features of the percentile-clipped field (as the pipeline feeds it)."""
    rows = []
    for r in df.itertuples():
        image, _ = read_field(r.store_uri, r.row, r.col, r.field, channels=CP5_CHANNELS)
        norm = percentile_clip(image, 1.0, 99.0)
        if kind == "intensity":  # the evaluation's model-free baseline: mean, std, 7 percentiles
            flat = norm.reshape(len(CP5_CHANNELS), -1)
            features = [*flat.mean(1), *flat.std(1), *np.percentile(flat, (1, 5, 25, 50, 75, 95, 99), axis=1).ravel()]
        else:  # spatial: fine vs coarse detail, bright spots, bright objects
            features = []
            for channel in norm:
                fine = np.abs(channel - ndi.gaussian_filter(channel, 1)).mean()
                coarse = np.abs(channel - ndi.gaussian_filter(channel, 3)).mean()
                spots = ((channel == ndi.maximum_filter(channel, 5)) & (channel > 0.3)).sum()
                features += [fine / (coarse + 1e-6), np.log1p(spots), np.log1p(ndi.label(channel > 0.5)[1])]
        rows.append({"plate": r.plate, "well": r.well, "moa": r.moa, **dict(enumerate(features))})
    return pd.DataFrame(rows).groupby(["plate", "well", "moa"]).mean().reset_index()


def _moa_accuracy(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """MoA accuracy of a logistic regression trained on one plate and scored on the other, both ways."""
    columns = [c for c in a.columns if c not in ("plate", "well", "moa")]
    scores = []
    for train, test in ((a, b), (b, a)):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(train[columns], train["moa"])
        scores.append((model.predict(test[columns]) == test["moa"]).mean())
    return float(np.mean(scores))


def test_intensity_statistics_separate_moas_poorly_while_spatial_features_separate_them(tmp_path):
    """Per-well intensity statistics (mean, std, percentiles per channel) stay near chance at
    predicting MoA across plates, while a few spatial statistics of the same wells do clearly
    better. (Before stain histograms were fixed per compartment, intensity scored 0.41 and these
    spatial features 0.39.)

    Uses a 2-plate screen of 128 px fields (40 wells per plate): the tiny layout's 64 px fields
    hold ~3 cells, too few for stable well statistics.
    """
    layout = ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=3,
                          controls_per_plate=4, fields_per_well=2, field_size=128)
    paths = generate_screen(tmp_path, layout, seed=0)
    train, heldout = read_manifest(paths["train"]), read_manifest(paths["heldout"])
    assert read_manifest(paths["unseen"]).empty
    chance = heldout.drop_duplicates("well")["moa"].value_counts(normalize=True).max()
    intensity = _moa_accuracy(_well_features(train, "intensity"), _well_features(heldout, "intensity"))
    spatial = _moa_accuracy(_well_features(train, "spatial"), _well_features(heldout, "spatial"))
    assert intensity < chance + 0.1, f"intensity statistics give MoA accuracy {intensity:.2f} (majority class {chance:.2f})"
    assert spatial > intensity + 0.1, f"spatial {spatial:.2f} vs intensity statistics {intensity:.2f}"


# ----------------------------------------------------------------------------------------------
# The synthetic family (cp5, novel4, hpa4, brightfield1)

import hashlib  # noqa: E402

from cellfm.data.synthetic.catalog import (  # noqa: E402
    FAMILY_CONFIGS,
    HELDOUT_COMPOUNDS,
    HELDOUT_PROTEINS,
    LOCALIZATIONS,
    PROTEINS,
)
from cellfm.data.synthetic.optics import render_family_field  # noqa: E402
from cellfm.data.synthetic.screens import generate_family_screen  # noqa: E402

# sha256 over "sha256sum" lines of every file under plates/ of the tiny seed-0 screen, as written
# once stain histograms were fixed per compartment: the family must not change the demo's data.
TINY_PLATES_DIGEST = "6f14968ba927405e3439108c086ff1860430628d3688fdce7cbb81479a9f2752"


def test_demo_and_tiny_screens_are_unchanged_by_the_family(screen):
    plates = screen["train"].parent / "plates"
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(plates.parent)}\n"
                    for p in sorted(plates.rglob("*"), key=lambda q: str(q.relative_to(plates.parent))) if p.is_file())
    assert hashlib.sha256(lines.encode()).hexdigest() == TINY_PLATES_DIGEST


SMALL = ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=1,
                     controls_per_plate=2, fields_per_well=1, field_size=64)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("family")
    return {name: {split: read_manifest(path) for split, path in generate_family_screen(root / name, name, SMALL, 0).items()}
            for name in ("novel4", "hpa4", "brightfield1")}


def test_family_manifests_channels_groups_and_labels(family):
    novel = family["novel4"]["train"]
    assert novel["channel_names"].iloc[0] == ["Golgi", "Mito", "DNA", "Tubulin"]
    assert not set(novel["channel_names"].iloc[0]) - set(CP5_CHANNELS) == set()  # some stains cp5 never shows
    assert novel["moa"].nunique() == 6 and set(novel.loc[novel["compound_split"] == "heldout", "perturbation_id"]) == set(HELDOUT_COMPOUNDS)
    hpa = family["hpa4"]["heldout"]
    assert hpa["channel_names"].iloc[0] == ["Microtubules", "Protein", "Nucleus", "ER"]
    assert hpa["channel_groups"].iloc[0] == ["context", "concept", "context", "context"]
    assert (hpa["localization"] == hpa["moa"]).all() and set(hpa["localization"]) == set(LOCALIZATIONS)
    assert set(hpa.loc[hpa["compound_split"] == "heldout", "perturbation_id"]) == set(HELDOUT_PROTEINS)
    assert hpa.drop_duplicates("well").shape[0] == len(PROTEINS) * SMALL.replicates_per_plate
    bf = family["brightfield1"]["train"]
    assert bf["channel_names"].iloc[0] == ["Brightfield"]
    for config in family.values():
        for df in config.values():
            check_manifest_against_plates(df)
            row = df.iloc[min(3, len(df) - 1)]
            image, names = read_field(row.store_uri, row.row, row.col, row.field)
            assert names == list(row.channel_names) and image.shape == (len(names), 64, 64)
            assert image.min() > 0 and image.max() < 65535
    hcs = HCS.from_zarr(zarr.open_group(family["hpa4"]["train"]["store_uri"].iloc[0], mode="r"))
    assert hcs.n_wells == len(PROTEINS) * SMALL.replicates_per_plate


def test_family_render_errors_and_determinism():
    ph = BY_ID["CMP-06"].phenotype
    a = render_family_field(np.random.default_rng(3), ["Tubulin", "Golgi"], ph, 64, CLEAN)
    b = render_family_field(np.random.default_rng(3), ["Golgi", "Tubulin"], ph, 64, CLEAN)
    assert a.dtype == np.uint16 and a.shape == (2, 64, 64) and not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match="Actin"):
        render_family_field(np.random.default_rng(3), ["Actin"], ph, 64, CLEAN)
    with pytest.raises(ValueError, match="Protein channel needs a protein"):
        render_family_field(np.random.default_rng(3), ["Protein"], ph, 64, CLEAN)
    with pytest.raises(ValueError, match="unknown family config"):
        generate_family_screen("/nonexistent", "rgb3")
    assert set(FAMILY_CONFIGS) == {"cp5", "novel4", "hpa4", "brightfield1"}
    del b


def _golgi_pieces_per_nucleus(pid: str, n: int = 6) -> float:
    """Connected bright Golgi objects per nucleus: one compact ribbon per cell, more when dispersed."""
    values = []
    for i in range(n):
        image = render_family_field(np.random.default_rng([21, i]), ["Golgi", "DNA"], BY_ID[pid].phenotype, 128, CLEAN)
        golgi, dna = percentile_clip(image, 1.0, 99.9)
        values.append(ndi.label(golgi > 0.2)[1] / max(ndi.label(dna > 0.2)[1], 1))
    return float(np.mean(values))


def test_novel_stains_carry_the_phenotypes():
    assert _golgi_pieces_per_nucleus("CMP-06") > 1.5 * _golgi_pieces_per_nucleus("DMSO")  # ER stress disperses the Golgi


@pytest.mark.parametrize("localization", ["nucleus", "cytosol", "nucleoli", "mitochondria"])
def test_protein_channel_follows_its_localization(localization):
    protein = next(p for p in PROTEINS if p.localization == localization)
    image = render_family_field(np.random.default_rng(4), ["Protein", "Nucleus"], BY_ID["DMSO"].phenotype, 128,
                                CLEAN, protein)
    protein_img, nucleus_img = percentile_clip(image, 1.0, 99.5)
    inside = nucleus_img > 0.3
    ratio = protein_img[inside].mean() / protein_img[~inside].mean()
    assert (ratio > 3.0) if localization in ("nucleus", "nucleoli") else (ratio < 1.0), ratio

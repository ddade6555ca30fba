"""Single cells (data.crop_mode=cells): locations tables (cellfm's and CellProfiler's columns), their checks
against the manifest, the crops against numpy slices (edges included), and the ground truth -> locations path."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellfm.config import DataConfig, data_config_problems
from cellfm.data.cells import (CELL_X, CELL_Y, CELLS_X, CELLS_Y, LocationsError, attach_cell_locations,
                               cell_crop_batch, crop_cells, location_problems, locations_digest, standard_locations)


def _field(channels=3, height=40, width=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((channels, height, width)).astype(np.float32)


def test_interior_crops_equal_numpy_slices_around_the_rounded_centre():
    image = _field()
    ys, xs = np.array([20.0, 10.4, 10.5, 29.49]), np.array([25.0, 12.6, 20.5, 30.0])
    crops = crop_cells(image, ys, xs, 16)
    assert crops.shape == (4, 3, 16, 16) and crops.dtype == image.dtype
    for crop, y, x in zip(crops, [20, 10, 11, 29], [25, 13, 21, 30]):  # halves round up
        np.testing.assert_array_equal(crop, image[:, y - 8:y + 8, x - 8:x + 8])
        assert crop[0, 8, 8] == image[0, y, x]  # the centre pixel sits at (size // 2, size // 2)


@pytest.mark.parametrize("size", [15, 16])
def test_crops_at_edges_and_corners_are_the_zero_padded_field(size):
    image = _field(height=33, width=47, seed=1)
    pad = size
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    ys = np.array([0.0, 32.0, 0.0, 32.0, 3.2, 16.0])
    xs = np.array([0.0, 46.0, 46.0, 0.0, 44.9, 1.0])
    crops = crop_cells(image, ys, xs, size)
    for crop, y, x in zip(crops, ys, xs):
        y0, x0 = int(np.floor(y + 0.5)) - size // 2 + pad, int(np.floor(x + 0.5)) - size // 2 + pad
        np.testing.assert_array_equal(crop, padded[:, y0:y0 + size, x0:x0 + size])
    assert (crops[0, :, : size // 2, :] == 0).all() and (crops[0, :, size // 2:, size // 2:] != 0).all()


def test_a_batch_of_fields_becomes_one_row_per_cell_with_its_centre_and_field_columns():
    images = np.stack([_field(seed=2), _field(seed=3), _field(seed=4)]).astype(np.float16)
    batch = {"image": images, "channel_mask": np.ones((3, 3), bool),
             "channel_names": np.array(["a,b,c", "b,c,a", "c,a,b"], dtype=object), "field_index": np.array([7, 8, 9]),
             CELLS_Y: np.array([np.array([5.0, 30.0]), np.zeros(0), np.array([20.0])], dtype=object),
             CELLS_X: np.array([np.array([6.0, 44.0]), np.zeros(0), np.array([25.0])], dtype=object)}
    out = cell_crop_batch(batch, 8)
    assert out["image"].shape == (3, 3, 8, 8) and out["image"].dtype == np.float16
    assert out["field_index"].tolist() == [7, 7, 9] and out["channel_names"].tolist() == ["a,b,c", "a,b,c", "c,a,b"]
    assert out[CELL_Y].tolist() == [5.0, 30.0, 20.0] and out[CELL_X].tolist() == [6.0, 44.0, 25.0]
    np.testing.assert_array_equal(out["image"][1], images[0][:, 26:34, 40:48])
    np.testing.assert_array_equal(out["image"][2], images[2][:, 16:24, 21:29])
    assert CELLS_Y not in out and out["channel_mask"].shape == (3, 3)


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({"plate": ["P1", "P1", "P2"], "well": ["A01", "A01", "B02"], "field": [0, 1, 0],
                         "height": [40, 40, 40], "width": [50, 50, 50]}, index=[4, 5, 6])


def test_cellprofiler_columns_are_accepted_and_mapped():
    cp = pd.DataFrame({"ImageNumber": [1, 1, 2], "ObjectNumber": [1, 2, 1], "Metadata_Plate": ["P1", "P1", "P2"],
                       "Metadata_Well": ["A01", "A01", "B02"], "Metadata_Site": [1, 1, 0],
                       "Nuclei_Location_Center_X": [3.5, 40.0, 7.0], "Nuclei_Location_Center_Y": [2.0, 30.0, 9.0]})
    table = standard_locations(cp, "cp.parquet")
    assert list(table.columns) == ["plate", "well", "field", "y", "x"]
    assert table["y"].tolist() == [2.0, 30.0, 9.0] and table["x"].tolist() == [3.5, 40.0, 7.0]
    assert table["field"].dtype == np.int64 and table["field"].tolist() == [1, 1, 0]
    plain = standard_locations(cp.rename(columns={"Nuclei_Location_Center_X": "Location_Center_X",
                                                  "Nuclei_Location_Center_Y": "Location_Center_Y"}), "cp.parquet")
    pd.testing.assert_frame_equal(plain, table)
    assert location_problems(table, _manifest(), "cp.parquet") == []
    attached = attach_cell_locations(_manifest(), table)
    assert attached.index.tolist() == [4, 5, 6] and [len(v) for v in attached[CELLS_Y]] == [0, 2, 1]
    assert attached[CELLS_X].iloc[1].tolist() == [3.5, 40.0]


def test_two_objects_centres_are_refused_as_ambiguous():
    cp = pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["A01"], "Metadata_Site": [0],
                       "Nuclei_Location_Center_X": [1.0], "Nuclei_Location_Center_Y": [1.0],
                       "Cells_Location_Center_X": [1.0], "Cells_Location_Center_Y": [1.0]})
    with pytest.raises(LocationsError, match="two columns give 'x'"):
        standard_locations(cp, "cp.parquet")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns=["x"]), r"cell locations t.parquet: missing column\(s\) \['x'\]"),
    (lambda t: t.assign(field=[0, 1.5, 0]), r"column 'field' holds '1.5' for plate 'P1' well A01 \(1 bad row\(s\)\); need numbers"),
    (lambda t: t.assign(y=[1.0, np.nan, 2.0]), r"column 'y' holds 'nan'"),
])
def test_a_malformed_table_is_refused_with_one_line_naming_the_column(change, message):
    table = pd.DataFrame({"plate": ["P1", "P1", "P2"], "well": ["A01", "A01", "B02"], "field": [0, 1, 0],
                          "y": [1.0, 2.0, 3.0], "x": [1.0, 2.0, 3.0]})
    with pytest.raises(LocationsError, match=message) as info:
        standard_locations(change(table), "t.parquet")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("row, message", [
    (("P9", "A01", 0, 1.0, 1.0), "plate 'P9' is not in the manifest"),
    (("P1", "H12", 0, 1.0, 1.0), "plate 'P1' well H12 is not in the manifest"),
    (("P1", "A01", 3, 1.0, 1.0), "plate 'P1' well A01 field 3 is not in the manifest"),
    (("P2", "B02", 0, 40.0, 1.0), r"plate 'P2' well B02 field 0: centre \(y 40.0, x 1.0\) is outside the 40 x 50"),
])
def test_locations_naming_what_the_manifest_lacks_give_one_line(row, message):
    table = pd.DataFrame([("P1", "A01", 0, 1.0, 1.0), row], columns=["plate", "well", "field", "y", "x"])
    manifest = pd.concat([_manifest(), _manifest()])  # a field listed by two manifests is one field
    problems = location_problems(table, manifest, "t.parquet")
    assert len(problems) == 1 and problems[0].startswith("cell locations t.parquet: ")
    assert pd.Series(problems).str.contains(message).all(), problems


def test_locations_digest_ignores_row_order_and_sees_a_moved_centre():
    table = pd.DataFrame({"plate": ["P1", "P2"], "well": ["A01", "B02"], "field": [0, 0], "y": [1.0, 2.0],
                          "x": [3.0, 4.0]})
    assert locations_digest(table) == locations_digest(table.iloc[::-1])
    assert locations_digest(table) != locations_digest(table.assign(y=[1.0, 2.5]))


def test_cells_mode_config_rules():
    assert data_config_problems(DataConfig(crop_mode="cells", cell_locations="c.parquet")) == []
    assert data_config_problems(DataConfig(crop_mode="cells")) == [
        "data.crop_mode=cells needs data.cell_locations: a Parquet table of cell centres (plate, well, field, y, x)"]
    assert any("data.field_size=0" in p for p in
               data_config_problems(DataConfig(crop_mode="cells", cell_locations="c.parquet", field_size=32)))
    assert data_config_problems(DataConfig(crop_mode="nuclei")) == [
        "data.crop_mode='nuclei' is not one of ['cells', 'field']"]


def test_synthetic_ground_truth_gives_a_locations_table_of_cells_inside_their_fields(tiny_screen, tmp_path):
    from cellfm.cli import main
    from cellfm.data.manifest import read_manifest
    from cellfm.data.truth import cell_locations, read_cells

    manifest = read_manifest(tiny_screen["train"])
    table = cell_locations(manifest)
    assert list(table.columns) == ["plate", "well", "field", "y", "x"]
    # `cellfm cells` writes the same table, whole (nothing else left in its folder).
    output = tmp_path / "out" / "cells.parquet"
    assert main(["cells", str(tiny_screen["train"]), "--output", str(output)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(output), table)
    assert [p.name for p in output.parent.iterdir()] == ["cells.parquet"]
    assert location_problems(standard_locations(table, "truth"), manifest, "truth") == []
    truth = read_cells(str(manifest["store_uri"].iloc[0]))
    inside = truth[(truth["centre_y"].between(0, 63)) & (truth["centre_x"].between(0, 63)) & (truth["cell_area"] > 0)]
    assert len(table) == len(inside) < len(truth)  # the renderer also centres cells just outside a field
    np.testing.assert_array_equal(table["y"].to_numpy(), inside["centre_y"].to_numpy())


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns=["y"]), "missing column(s) ['y']"),
    (lambda t: pd.concat([t, t.iloc[:1].assign(plate="SYN-GONE-07")]), "plate 'SYN-GONE-07' is not in the manifest"),
    (lambda t: pd.concat([t, t.iloc[:1].assign(field=9)]), "field 9 is not in the manifest (1 row(s))"),
])
def test_pretrain_refuses_a_bad_locations_table_with_one_line_before_ray(change, message, tiny_screen, tmp_path,
                                                                          monkeypatch, capsys):
    import cellfm.train.trainer
    from cellfm.cli import main
    from cellfm.data.manifest import read_manifest
    from cellfm.data.truth import cell_locations
    from tests.conftest import SMOKE_CONFIG

    monkeypatch.setattr(cellfm.train.trainer, "run_pretraining", lambda *a, **k: pytest.fail("preflight let it through"))
    manifest = pd.concat([read_manifest(tiny_screen[s]) for s in ("train", "heldout")], ignore_index=True)
    path = tmp_path / "cells.parquet"
    change(cell_locations(manifest)).to_parquet(path, index=False)
    code = main(["pretrain", "--config", str(SMOKE_CONFIG), f"data.train_manifest={tiny_screen['train']}",
                 f"eval.manifests={{seen: {tiny_screen['heldout']}}}", f"train.storage_path={tmp_path / 'runs'}",
                 "data.crop_mode=cells", f"data.cell_locations={path}"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cell locations {path}: "), lines
    assert message in lines[0], lines


# configs/model_quality.yaml's short-run self-distillation, under which a few epochs lower the DINO loss.
RECIPE = ["ssl.centering=sinkhorn_knopp", "ssl.head_use_bn=true", "ssl.warmup_teacher_temp=0.04",
          "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=0.9", "ssl.ema_momentum_end=0.99", "optim.base_lr=1.6e-2"]


def test_in_memory_training_on_cell_crops_lowers_the_loss_and_reruns_bit_identically(tiny_screen):
    import torch

    from cellfm.config import load_config
    from cellfm.data.manifest import read_manifest
    from cellfm.data.truth import cell_locations
    from cellfm.train.in_memory import cell_crops, load_normalized_fields, train_in_memory
    from tests.conftest import SMOKE_CONFIG

    torch.set_num_threads(1)
    manifest = read_manifest(tiny_screen["train"])
    cfg = load_config(SMOKE_CONFIG, ["optim.epochs=3", "optim.warmup_epochs=1", *RECIPE])
    fields = load_normalized_fields(manifest, cfg.data)
    located = attach_cell_locations(manifest, standard_locations(cell_locations(manifest), "truth"))
    crops = cell_crops(fields, located, 24)
    assert len(crops) == sum(len(y) for y in located[CELLS_Y]) > len(fields)
    np.testing.assert_array_equal(crops[:len(located[CELLS_Y].iloc[0])].numpy(),
                                  crop_cells(fields[0].numpy(), located[CELLS_Y].iloc[0], located[CELLS_X].iloc[0], 24))

    def losses(steps_per_epoch=None) -> list[float]:
        out: list[float] = []
        meta_arch = train_in_memory(cfg, crops, list(manifest["channel_names"].iloc[0]), steps_per_epoch=steps_per_epoch,
                                    on_step=lambda epoch, step, l: out.append(l.total.item()))
        return out, meta_arch

    first, meta_arch = losses()
    steps = len(crops) // cfg.optim.batch_size_per_worker
    assert len(first) == 3 * steps
    assert np.mean(first[-steps:]) < np.mean(first[:steps]), first
    again, other = losses()
    assert again == first
    assert all(torch.equal(a, b) for a, b in zip(meta_arch.teacher.state_dict().values(), other.teacher.state_dict().values()))


def test_evaluation_takes_per_cell_rows_and_averages_a_wells_cells():
    from cellfm.evaluate.run import field_features
    from cellfm.evaluate.wells import well_profiles

    manifest = pd.DataFrame({"plate": "P1", "well": ["A01", "A02"], "field": 0, "perturbation_id": ["DMSO", "C1"],
                             "moa": ["control", "m"], "is_control": [True, False], "localization": ["", "er"]})
    rows = manifest.iloc[[0, 0, 0, 1]].drop(columns="localization").assign(
        **{CELL_Y: [1.0, 5.0, 9.0, 3.0], CELL_X: [2.0, 2.0, 2.0, 4.0],
           "embedding_m": [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 9.0]), np.array([7.0, 7.0])]})
    meta, features = field_features(rows, manifest, "embedding_m", ["moa"])
    assert meta[CELL_Y].tolist() == [1.0, 5.0, 9.0, 3.0] and meta["localization"].tolist() == ["", "", "", "er"]
    profiles = well_profiles(meta, features, "none", ["moa"])
    np.testing.assert_array_equal(profiles.features, [[3.0, 5.0], [7.0, 7.0]])

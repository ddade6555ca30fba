"""data.crop_mode=cells on Ray: the read task's crops are numpy slices of the normalized (and, in training,
channel-permuted) field around each centre; training on cells lowers the loss and reruns bit-identically;
`cellfm embed` stores one row per cell with its centre, and the well profiles it stores are the evaluation's
profiles of those cells, exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellfm.config import load_config
from cellfm.data.cells import CELL_X, CELL_Y, attach_cell_locations, crop_cells, standard_locations
from cellfm.data.manifest import read_manifest
from cellfm.data.pipeline.dataset import build_field_pipeline
from cellfm.data.truth import cell_locations
from tests.conftest import SMOKE_CONFIG, tensorboard_scalars

pytestmark = pytest.mark.integration

CROP = 24
EPOCHS = 3
# configs/model_quality.yaml's short-run self-distillation (Sinkhorn-Knopp centering, a sharp teacher that follows
# within ~10-100 steps, a high learning rate), under which a few epochs lower the DINO loss (smoke.yaml's
# defaults first raise it while the teacher temperature warms up).
RECIPE = ["ssl.centering=sinkhorn_knopp", "ssl.head_use_bn=true", "ssl.warmup_teacher_temp=0.04",
          "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=0.9", "ssl.ema_momentum_end=0.99", "optim.base_lr=1.6e-2"]


@pytest.fixture(scope="module")
def locations(tiny_screen, tmp_path_factory) -> Path:
    """The tiny screen's locations table (training and held-out plates), from its ground truth."""
    manifest = pd.concat([read_manifest(tiny_screen[s]) for s in ("train", "heldout")], ignore_index=True)
    path = tmp_path_factory.mktemp("cells") / "cells.parquet"
    cell_locations(manifest).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def overrides(tiny_screen, locations, tmp_path_factory) -> list[str]:
    runs = tmp_path_factory.mktemp("cell-runs") / "runs"
    return [f"data.train_manifest={tiny_screen['train']}", f"train.storage_path={runs}",
            "data.crop_mode=cells", f"data.cell_locations={locations}", f"data.cell_crop_size={CROP}",
            f"optim.epochs={EPOCHS}", "optim.warmup_epochs=1", "train.log_every_steps=1", *RECIPE]


def _rows(pipeline) -> dict[str, np.ndarray]:
    batches = list(pipeline.dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@pytest.mark.parametrize("training", [False, True])
def test_pipeline_crops_are_slices_of_the_normalized_field_around_each_centre(ray_session, tiny_screen, locations,
                                                                               training):
    manifest = read_manifest(tiny_screen["heldout"]).iloc[:6]
    cfg = load_config(SMOKE_CONFIG, ["data.crop_mode=cells", f"data.cell_locations={locations}",
                                     f"data.cell_crop_size={CROP}", "data.progress_interval_s=0"]).data
    keep = ["plate", "well", "field"]
    cells = _rows(build_field_pipeline(manifest, cfg, training=training, keep_columns=keep, seed=3, epoch=1))
    fields = _rows(build_field_pipeline(manifest, dataclasses.replace(cfg, crop_mode="field"), training=training,
                                        keep_columns=keep, seed=3, epoch=1))
    table = standard_locations(pd.read_parquet(locations), "t")
    located = attach_cell_locations(manifest, table)
    assert len(cells["image"]) == sum(len(y) for y in located["cells_y"]) > len(manifest)
    assert cells["image"].shape[1:] == (5, CROP, CROP) and cells["image"].dtype == fields["image"].dtype
    edge = 0
    for i, row in enumerate(located.itertuples()):
        mine = np.flatnonzero((cells["plate"] == row.plate) & (cells["well"] == row.well) & (cells["field"] == row.field))
        np.testing.assert_array_equal(cells[CELL_Y][mine], row.cells_y)
        np.testing.assert_array_equal(cells[CELL_X][mine], row.cells_x)
        expected = crop_cells(fields["image"][i], row.cells_y, row.cells_x, CROP)
        np.testing.assert_array_equal(cells["image"][mine], expected)
        assert set(cells["channel_names"][mine]) == {fields["channel_names"][i]}  # the field's permutation
        y0 = np.floor(row.cells_y + 0.5) - CROP // 2
        x0 = np.floor(row.cells_x + 0.5) - CROP // 2
        edge += int(((y0 < 0) | (x0 < 0) | (y0 + CROP > 64) | (x0 + CROP > 64)).sum())
    assert edge > 0  # some crops leave their field: the zero padding is compared too
    if training:  # permutation is on: channel orders differ between fields
        assert len(set(fields["channel_names"])) > 1


def _train(overrides: list[str], name: str) -> Path:
    from cellfm.storage import run_directory
    from cellfm.train.trainer import run_pretraining

    cfg = load_config(SMOKE_CONFIG, overrides + [f"train.run_name={name}"])
    run_pretraining(cfg)
    return run_directory(cfg)


@pytest.fixture(scope="module")
def reference(ray_session, overrides) -> Path:
    return _train(overrides, "cells")


def test_training_on_cells_lowers_the_loss_and_reruns_bit_identically(reference, overrides):
    from tests.test_fault_tolerance import checkpoint_hashes

    losses = tensorboard_scalars(reference, "train/loss")
    steps = len(losses) // EPOCHS
    # Steps per epoch come from the cells: more than the fields (12 of 4 per worker) would give.
    assert steps > 12 // 2 // 4
    first, last = np.mean([losses[s] for s in range(steps)]), np.mean([losses[s] for s in range(len(losses) - steps, len(losses))])
    assert last < first, losses
    again = _train(overrides, "cells-again")
    assert tensorboard_scalars(again, "train/loss") == losses
    assert checkpoint_hashes(again) == checkpoint_hashes(reference)


def test_embed_stores_each_cell_with_its_centre_and_well_profiles_the_evaluation_uses(reference, overrides,
                                                                                     tiny_screen, locations, tmp_path):
    from cellfm.evaluate.wells import well_profiles
    from cellfm.features.identity import resolve_feature_key
    from cellfm.features.refresh import refresh
    from cellfm.features.store import read_features
    from cellfm.train.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(reference)
    store = tmp_path / "store"
    cfg = load_config(SMOKE_CONFIG, overrides + [f"features.store={store}", f"features.checkpoint={checkpoint}",
                                                 f"features.manifests={{heldout: {tiny_screen['heldout']}}}",
                                                 "features.aggregations=[mean, median]"])
    summary = refresh(cfg)
    assert summary.embedded
    cells_meta, cells = read_features(str(store), summary.key, level="field")
    manifest = read_manifest(tiny_screen["heldout"])
    table = standard_locations(pd.read_parquet(locations), "t")
    table = table[table["plate"].isin(manifest["plate"])]
    assert len(cells_meta) == len(table)
    stored = cells_meta[["plate", "well", "field", CELL_Y, CELL_X]].astype({"field": np.int64})
    expected = table.rename(columns={"y": CELL_Y, "x": CELL_X}).sort_values(["plate", "well", "field"], kind="stable")
    pd.testing.assert_frame_equal(stored.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)
    wells_meta, wells_mean = read_features(str(store), summary.key, level="well", variable="mean")
    _, wells_median = read_features(str(store), summary.key, level="well", variable="median")
    # The stored well profiles are the wells' cell aggregates, exactly (what eval.from_store scores) ...
    groups = cells_meta.groupby(["plate", "well"], sort=True).indices
    np.testing.assert_array_equal(np.stack([np.mean(cells[i], axis=0) for i in groups.values()]), wells_mean)
    np.testing.assert_array_equal(np.stack([np.median(cells[i], axis=0) for i in groups.values()]), wells_median)
    assert all(len(i) > 1 for i in groups.values())  # wells of several cells: a mean, not a copy
    # ... and the evaluation's profiles of the stored cells (averaged in float64) are the same wells.
    profiles = well_profiles(cells_meta, cells, "none")
    assert profiles.meta[["plate", "well"]].equals(wells_meta[["plate", "well"]])
    np.testing.assert_allclose(profiles.features, wells_mean, rtol=1e-6, atol=1e-6)
    # The crop mode is part of the feature key (and the lineage): field features live under another key.
    field_cfg = load_config(SMOKE_CONFIG, overrides + [f"features.store={store}", "data.crop_mode=field"])
    assert resolve_feature_key(field_cfg, checkpoint) != summary.key
    assert resolve_feature_key(cfg, checkpoint) == summary.key

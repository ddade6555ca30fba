"""The feature store without Ray: plate content versions, checkpoint keys, entries written and read back
(locally and through a real S3-compatible server on loopback), first-marker-wins concurrency, garbage
collection, the index, the Parquet export in pycytominer, and bad input rejected before Ray starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from cellfm.config import ConfigError, load_config
from cellfm.data.content_version import plate_content_version
from cellfm.data.pipeline.dataset import load_manifests
from cellfm.data.plate import read_field
from cellfm.data.plate_writer import write_field
from cellfm.features.aggregate import normalize_to_controls
from cellfm.features.identity import checkpoint_identity, embedding_recipe, feature_key
from cellfm.features.refresh import build_plate_features
from cellfm.features.store import MARKER, FeatureStore, StoreError, list_entries, open_features, read_features
from cellfm.models.registry import build_backbone
from cellfm.train.checkpoint import save_inference_checkpoint
from tests.conftest import REPO, SMOKE_CONFIG

KEY = "cellrep-0123456789ab"


def _plate_rows(tiny_screen) -> pd.DataFrame:
    rows = load_manifests([tiny_screen["heldout"]], check_plates=False)
    return rows.sort_values(["plate", "well", "field"], ignore_index=True)


def _entry(rows: pd.DataFrame, normalization: str = "none", seed: int = 0, plate: str | None = None, dim: int = 6):
    cfg = load_config(SMOKE_CONFIG, [f"features.normalization={normalization}"])
    rows = rows.assign(plate=plate) if plate else rows
    embeddings = np.random.default_rng(seed).normal(size=(len(rows), dim)).astype(np.float32)
    lineage = {"checkpoint": {"uri": "ckpt", "hash": "h"}, "config": {"data": {"storage_options": {"secret": "<redacted>"}}}}
    return build_plate_features(rows, embeddings, cfg.features, "cellrep", "v1", lineage)


@pytest.fixture
def s3_store(s3_server, request):
    return f"s3://{s3_server['bucket']}/features-{request.node.name}"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_entry_round_trip(where, tiny_screen, tmp_path, s3_server, s3_store):
    options = s3_server["storage_options"] if where == "s3" else None
    uri = s3_store if where == "s3" else str(tmp_path / "store")
    store = FeatureStore(uri, options)
    entry = _entry(_plate_rows(tiny_screen), normalization="robust_mad")
    assert store.write_entry(KEY, entry, "run-a")
    store.update_index(KEY)

    meta, fields = read_features(uri, KEY, level="field", storage_options=options)
    np.testing.assert_array_equal(fields, entry.embeddings)
    assert meta[["plate", "well", "field", "perturbation_id", "moa", "is_control"]].equals(
        entry.meta[["plate", "well", "field", "perturbation_id", "moa", "is_control"]])
    assert set(meta["channel_names"]) == {"DNA,ER,RNA,AGP,Mito"}
    wells, mean = read_features(uri, KEY, level="well", variable="mean", storage_options=options)
    assert len(wells) == len(entry.wells) == 26 and wells["well"].is_unique and "field" not in wells
    np.testing.assert_allclose(mean, np.stack([entry.embeddings[entry.meta["well"] == w].mean(0) for w in wells["well"]]),
                               rtol=1e-6)
    _, normalized = read_features(uri, KEY, level="well", variable="mean_robust_mad", storage_options=options)
    np.testing.assert_allclose(normalized, normalize_to_controls(mean, wells, method="robust_mad"), rtol=1e-5, atol=1e-5)
    with pytest.raises(StoreError, match="no well variable 'mean_spherize'"):
        read_features(uri, KEY, level="well", variable="mean_spherize", storage_options=options)
    with pytest.raises(StoreError, match="no entries for key 'other'"):
        read_features(uri, "other", storage_options=options)

    # The Parquet export holds the same numbers, the lineage and pycytominer's column names.
    marker = store.read_json(f"{store.entry_dir(KEY, entry.plate, 'v1')}/{MARKER}")
    run_dir = f"{store.entry_dir(KEY, entry.plate, 'v1')}/runs/{marker['run']}"
    table = pd.read_parquet(store.url(run_dir, "wells_mean.parquet"), storage_options=options)
    np.testing.assert_array_equal(table[[f"cellrep_{i}" for i in range(6)]].to_numpy(), mean)
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_pert_type", "Metadata_moa"} <= set(table.columns)
    assert set(table.loc[table["Metadata_is_control"], "Metadata_pert_type"]) == {"negcon"}
    ds = open_features(uri, KEY, entry.plate, level="field", storage_options=options)
    assert ds["embedding"].dims == ("field", "feature") and ds.attrs["cellfm"]["checkpoint"]["hash"] == "h"
    assert list(ds["feature"].values[:2]) == ["cellrep_0", "cellrep_1"] and ds.attrs["plate_version"] == "v1"
    index = list_entries(uri, options)
    assert index[["key", "plate", "plate_version", "n_fields", "n_wells"]].values.tolist() == [
        [KEY, entry.plate, "v1", 52, 26]]
    if where == "s3":
        # No credential reaches the store: every object is free of the secret.
        secret = options["secret"]
        for path in store.fs.find(store.root):
            assert secret.encode() not in store.fs.cat_file(path), path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_first_marker_wins_and_the_loser_leaves_nothing(where, tiny_screen, tmp_path, s3_server, s3_store):
    options = s3_server["storage_options"] if where == "s3" else None
    store = FeatureStore(s3_store if where == "s3" else str(tmp_path / "store"), options)
    # Exclusive creation: of many simultaneous creators exactly one wins, and its content stays.
    results: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda i=i: results.append((i, store.create_exclusive("race/m.json", str(i).encode()))))
               for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [i for i, won in results if won]
    assert len(winners) == 1 and store.fs.cat_file(store.path("race/m.json")) == str(winners[0]).encode()

    entry = _entry(_plate_rows(tiny_screen))
    assert store.write_entry(KEY, entry, "run-a")
    assert not store.write_entry(KEY, entry, "run-b")
    state = store.key_state(KEY)
    assert list(state.markers) == [(entry.plate, "v1")]
    assert {run for _, _, run in state.runs} == {"run-a"}


def test_garbage_collection_removes_only_stale_unmarked_runs(tiny_screen, tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    rows = _plate_rows(tiny_screen)
    entry = _entry(rows)
    assert store.write_entry(KEY, entry, "run-a")
    # A writer killed mid-write left files in its own run folder, for this entry and for another plate.
    orphans = [f"{store.entry_dir(KEY, entry.plate, 'v1')}/runs/run-dead", f"{store.entry_dir(KEY, 'P2', 'v9')}/runs/run-dead"]
    for orphan in orphans:
        store.write_bytes(f"{orphan}/fields.parquet", b"partial")
    assert store.collect_garbage(KEY, stale_s=3600) == []  # could still be a live writer
    assert sorted(store.collect_garbage(KEY, stale_s=0)) == sorted(orphans)
    state = store.key_state(KEY)
    assert {run for _, _, run in state.runs} == {"run-a"}
    assert read_features(store.uri, KEY, level="field")[1].shape == (52, 6)


def test_index_lists_every_marker_after_concurrent_updates(tiny_screen, tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    rows = _plate_rows(tiny_screen)

    def write_and_index(k: int):
        assert store.write_entry(KEY, _entry(rows, seed=k, plate=f"P{k}"), f"run-{k}")
        store.update_index(KEY)

    threads = [threading.Thread(target=write_and_index, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    index = json.loads((tmp_path / "store" / KEY / "index.json").read_text())
    assert sorted(e["plate"] for e in index["entries"]) == [f"P{k}" for k in range(6)]
    meta, fields = read_features(store.uri, KEY, level="field")
    assert meta["plate"].value_counts().to_dict() == {f"P{k}": 52 for k in range(6)}


def test_plate_content_version_follows_content_not_location(tiny_screen, tmp_path):
    rows = _plate_rows(tiny_screen)
    source = rows["store_uri"].iloc[0]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(source, copy)  # copy2: same sizes and modification times
    moved = rows.assign(store_uri=str(copy))
    version = plate_content_version(source, rows)
    assert len(version) == 16 and plate_content_version(str(copy), moved) == version
    # A changed annotation is a new version; so is a rewritten field (new pixels, new chunk file).
    assert plate_content_version(str(copy), moved.assign(moa=moved["moa"].where(moved.index > 0, "other"))) != version
    image, _ = read_field(str(copy), rows["row"].iloc[0], rows["col"].iloc[0], int(rows["field"].iloc[0]))
    write_field(str(copy), rows["row"].iloc[0], rows["col"].iloc[0], int(rows["field"].iloc[0]), image[:, ::-1].copy())
    assert plate_content_version(str(copy), moved) != version


def test_plate_content_version_on_s3_uses_etags(tiny_screen, s3_server, s3_store):
    import s3fs

    rows = _plate_rows(tiny_screen)
    options = s3_server["storage_options"]
    uri = f"{s3_store}/plate.zarr"
    s3fs.S3FileSystem(**options).put(rows["store_uri"].iloc[0], uri.removeprefix("s3://"), recursive=True)
    version = plate_content_version(uri, rows, options)
    assert plate_content_version(uri, rows, options) == version
    image, _ = read_field(uri, "A", "01", 0, storage_options=options)
    write_field(uri, "A", "01", 0, image[:, ::-1].copy(), storage_options=options)
    assert plate_content_version(uri, rows, options) != version


def test_checkpoint_hash_and_feature_key(tmp_path):
    cfg = load_config(SMOKE_CONFIG)
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_inference_checkpoint(tmp_path / name, cfg=cfg, backbone=build_backbone(cfg.model))
    (hash_a, model), (hash_again, _), (hash_b, _) = (checkpoint_identity(str(tmp_path / n)) for n in ("a", "a_again", "b"))
    assert hash_a == hash_again != hash_b and model["name"] == "cellrep"
    key = feature_key("cellrep", hash_a, embedding_recipe(cfg))
    assert key.startswith("cellrep-") and len(key) == len("cellrep-") + 12
    # What changes the numbers changes the key; how fast they are computed does not.
    changed = load_config(SMOKE_CONFIG, ["features.normalization=spherize"])
    faster = load_config(SMOKE_CONFIG, ["features.batch_size=7", "features.actors=3"])
    assert feature_key("cellrep", hash_a, embedding_recipe(changed)) != key
    assert feature_key("cellrep", hash_a, embedding_recipe(faster)) == key
    assert feature_key("cellrep", hash_b, embedding_recipe(cfg)) != key


def test_parquet_export_normalizes_in_pycytominer(tiny_screen, tmp_path):
    from pycytominer import normalize

    store = FeatureStore(str(tmp_path / "store"))
    rows = _plate_rows(tiny_screen)
    for k in range(2):  # two plates with different offsets: normalization must run per plate
        entry = _entry(rows, seed=k, plate=f"P{k}")
        entry.well_features["mean"] += 5.0 * k
        assert store.write_entry(KEY, entry, "run")
    tables = [pd.read_parquet(tmp_path / "store" / KEY / "plates" / f"P{k}" / "v1" / "runs" / "run" / "wells_mean.parquet")
              for k in range(2)]
    features = [f"cellrep_{i}" for i in range(6)]
    meta_features = [c for c in tables[0].columns if c.startswith("Metadata_")]
    # features="infer" only knows CellProfiler names (Cells_/Nuclei_/Cytoplasm_): why the export names them.
    with pytest.raises(ValueError, match="CellProfiler column names"):
        normalize(tables[0], features="infer", samples="Metadata_pert_type == 'negcon'")
    for table in tables:
        for method, ours in (("standardize", "standardize"), ("mad_robustize", "robust_mad")):
            out = normalize(table, features=features, meta_features=meta_features,
                            samples="Metadata_pert_type == 'negcon'", method=method)
            meta = pd.DataFrame({"plate": table["Metadata_Plate"], "is_control": table["Metadata_is_control"]})
            expected = normalize_to_controls(table[features].to_numpy(np.float64), meta, eps=1e-18, method=ours)
            np.testing.assert_allclose(out[features].to_numpy(), expected, rtol=1e-4, atol=1e-4)
            assert out["Metadata_Well"].tolist() == table["Metadata_Well"].tolist()


def test_feature_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="features.normalization='zca'"):
        load_config(SMOKE_CONFIG, ["features.normalization=zca"])
    with pytest.raises(ConfigError, match="features.aggregations"):
        load_config(SMOKE_CONFIG, ["features.aggregations=[mean, max]"])
    with pytest.raises(ConfigError, match="features.actors must be >= 0"):
        load_config(SMOKE_CONFIG, ["features.actors=-1"])
    with pytest.raises(ConfigError, match="features.torch_threads must be > 0"):
        load_config(SMOKE_CONFIG, ["features.torch_threads=0"])


def test_refresh_job_rejects_bad_input_before_ray(tmp_path, tiny_screen):
    def job(*args):
        # ray.address points nowhere: a job that tried to start or join Ray would fail differently.
        return subprocess.run([sys.executable, str(REPO / "jobs" / "refresh.py"), "--config", str(SMOKE_CONFIG),
                               f"--store={tmp_path / 'store'}", "ray.address=127.0.0.1:1", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    missing = job(f"features.manifests={{a: {tmp_path / 'nope.parquet'}}}", f"--checkpoint={tmp_path}")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: manifest not found: {tmp_path / 'nope.parquet'}"]
    no_checkpoint = job(f"features.manifests={{a: {tiny_screen['heldout']}}}", f"--storage-path={tmp_path / 'runs'}")
    assert no_checkpoint.returncode == 2 and "no checkpoint" in no_checkpoint.stderr
    assert "Traceback" not in no_checkpoint.stderr + missing.stderr
    assert not (tmp_path / "store").exists()

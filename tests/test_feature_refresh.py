"""The feature refresh end to end on real Ray (one per module), real plates and a real checkpoint:
incremental, a no-op in seconds without Ray, crash-safe under SIGKILL, safe with two refreshes at once,
one key per checkpoint, stored features equal to the model's, and the same store on loopback S3."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellfm.config import load_config
from cellfm.data.manifest import write_manifest
from cellfm.data.normalize import normalize_field
from cellfm.data.pipeline.dataset import load_manifests
from cellfm.data.plate import read_field
from cellfm.features.embed import field_embedding
from cellfm.features.refresh import refresh
from cellfm.features.store import MARKER, FeatureStore, list_entries, read_features
from cellfm.models.registry import build_backbone
from cellfm.train.checkpoint import load_inference_backbone, save_inference_checkpoint
from tests.conftest import REPO, SMOKE_CONFIG

pytestmark = pytest.mark.integration

COPY = "SYN-HELDOUT-COPY"


@pytest.fixture(scope="module")
def setup(tiny_screen, tmp_path_factory):
    """Four plates (train, held-out, the 4-channel unseen plate, and a copy of the held-out plate under
    another name) in two manifests, and two random-init checkpoints of the smoke model."""
    root = tmp_path_factory.mktemp("features")
    heldout = load_manifests([tiny_screen["heldout"]], check_plates=False)
    copy_uri = root / f"{COPY}.zarr"
    shutil.copytree(heldout["store_uri"].iloc[0], copy_uri)
    manifests = {
        "screen": str(write_manifest(pd.concat([load_manifests([tiny_screen[s]], check_plates=False)
                                                for s in ("train", "heldout", "unseen")]), root / "screen.parquet")),
        "added": str(write_manifest(heldout.assign(plate=COPY, store_uri=str(copy_uri)), root / "added.parquet")),
    }
    cfg = load_config(SMOKE_CONFIG)
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_inference_checkpoint(root / f"ckpt{seed}", cfg=cfg, backbone=build_backbone(cfg.model).eval())
        checkpoints.append(str(root / f"ckpt{seed}"))
    return {"root": root, "manifests": manifests, "checkpoints": checkpoints}


def _overrides(setup, store: str, manifests: list[str], checkpoint: int = 0) -> list[str]:
    chosen = ", ".join(f"{name}: {setup['manifests'][name]}" for name in manifests)
    # Small inference batches: more blocks in flight, so a kill lands between plates.
    return [f"features.store={store}", f"features.manifests={{{chosen}}}", f"features.checkpoint={setup['checkpoints'][checkpoint]}",
            "features.batch_size=4", "features.normalization=robust_mad", "data.progress_interval_s=0"]


def _job(setup, store: str, ray_address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "refresh.py"), "--config", str(SMOKE_CONFIG),
                             f"--address={ray_address}", *_overrides(setup, store, ["screen", "added"]), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _snapshot(store_uri: str, storage_options: dict | None = None) -> dict:
    """What a reader can see of a store: per key and entry the content digest, the files of the marked run
    folder, the unmarked run folders, and the features read back."""
    store = FeatureStore(store_uri, storage_options)
    out = {}
    for key in store.keys():
        state = store.key_state(key)
        entries = {}
        for marker in store.entries(key):
            run_dir = f"{store.entry_dir(key, marker['plate'], marker['plate_version'])}/runs/{marker['run']}/"
            entries[(marker["plate"], marker["plate_version"])] = (
                marker["digest"], sorted(p.split(run_dir, 1)[1] for p in store.files(run_dir)))
        unmarked = sorted(run for run in state.runs if store.marked_run(state, run[0], run[1]) != run[2])
        fields = read_features(store_uri, key, level="field", storage_options=storage_options)
        wells = read_features(store_uri, key, level="well", variable="median_robust_mad", storage_options=storage_options)
        index = {(e["plate"], e["plate_version"]): e["digest"] for e in store.update_index(key)}
        out[key] = {"entries": entries, "unmarked": unmarked, "index": index, "fields": fields, "wells": wells}
    return out


def _assert_same_store(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["entries"] == b[key]["entries"] and a[key]["index"] == b[key]["index"]
        assert a[key]["unmarked"] == [] and b[key]["unmarked"] == []
        for level in ("fields", "wells"):
            pd.testing.assert_frame_equal(a[key][level][0], b[key][level][0])
            np.testing.assert_array_equal(a[key][level][1], b[key][level][1])


@pytest.fixture(scope="module")
def clean(setup, ray_session):
    """A clean store: the three plates of `screen`, then a refresh that adds the copied plate."""
    store = str(setup["root"] / "clean")
    first = refresh(load_config(SMOKE_CONFIG, _overrides(setup, store, ["screen"])))
    runs_before = {(m["plate"], m["run"]) for m in FeatureStore(store).entries(first.key)}
    second = refresh(load_config(SMOKE_CONFIG, _overrides(setup, store, ["screen", "added"])))
    return {"store": store, "key": first.key, "first": first, "second": second, "runs_before": runs_before,
            "snapshot": _snapshot(store)}


def test_refresh_embeds_only_new_plates_then_nothing(setup, clean):
    first, second = clean["first"], clean["second"]
    assert sorted(first.embedded) == ["SYN-HELDOUT-01", "SYN-TRAIN-01", "SYN-UNSEEN-01"] and first.fields == 156
    assert second.embedded == [COPY] and second.fields == 52 and second.key == first.key
    assert sorted(second.up_to_date) == sorted(first.embedded)
    # The plates embedded first were not touched: same run folders behind their markers.
    after = {(m["plate"], m["run"]) for m in FeatureStore(clean["store"]).entries(first.key)}
    assert clean["runs_before"] <= after and len(after) == 4

    # Nothing new: the job says so in seconds and never needs Ray (its address points nowhere).
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "refresh.py"), "--config", str(SMOKE_CONFIG),
                          "--address=127.0.0.1:1", *_overrides(setup, clean["store"], ["screen", "added"])],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert "nothing to do: all 4 plate(s) are stored" in out.stdout and "no embedding" in out.stdout
    assert elapsed < 20, elapsed  # python start-up and imports included
    _assert_same_store(_snapshot(clean["store"]), clean["snapshot"])


def test_stored_features_equal_the_models(setup, clean):
    cfg = load_config(SMOKE_CONFIG, _overrides(setup, clean["store"], ["screen", "added"]))
    meta, stored = read_features(clean["store"], clean["key"], level="field")
    manifest = load_manifests(list(setup["manifests"].values()), check_plates=False).set_index(["plate", "well", "field"])
    backbone, _ = load_inference_backbone(setup["checkpoints"][0])
    expected = []
    for plate, well, field, channels in meta[["plate", "well", "field", "channel_names"]].itertuples(index=False):
        row = manifest.loc[(plate, well, field)]
        image, names = read_field(row["store_uri"], row["row"], row["col"], int(field), channels=list(row["channel_names"]))
        assert ",".join(names) == channels
        # The pipeline hands the model float16 fields (data.transfer_dtype).
        image = normalize_field(image, cfg.data.normalization, clip_low=cfg.data.clip_low, clip_high=cfg.data.clip_high,
                                dtype=np.float16).astype(np.float32)
        with torch.inference_mode():
            expected.append(field_embedding(backbone, torch.from_numpy(image)[None], 0, [names])[0].numpy())
    np.testing.assert_allclose(stored, np.stack(expected), rtol=1e-4, atol=1e-4)
    assert stored.shape == (208, 2 * backbone.embed_dim)
    # Well profiles: the mean and median of the stored fields, then per-plate robust MAD to the controls.
    wells, mean = read_features(clean["store"], clean["key"], level="well", variable="mean")
    _, median = read_features(clean["store"], clean["key"], level="well", variable="median")
    for i, (plate, well) in enumerate(wells[["plate", "well"]].itertuples(index=False)):
        mine = (meta["plate"] == plate).to_numpy() & (meta["well"] == well).to_numpy()
        np.testing.assert_allclose(mean[i], stored[mine].mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(median[i], np.median(stored[mine], 0), rtol=1e-6, atol=1e-6)
    assert wells.groupby("plate").size().to_dict() == {p: 26 for p in wells["plate"].unique()}


def test_killed_refresh_then_rerun_equals_a_clean_run(setup, clean, ray_session):
    store = str(setup["root"] / "killed")
    address = ray_session.get_runtime_context().gcs_address
    job = _job(setup, store, address)
    markers = []
    deadline = time.monotonic() + 180
    while not markers and job.poll() is None and time.monotonic() < deadline:
        markers = list(Path(store).glob(f"*/plates/*/*/{MARKER}"))
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    at_kill = len(list(Path(store).glob(f"*/plates/*/*/{MARKER}")))
    assert 1 <= at_kill < 4, f"the job was not killed midway ({at_kill} plates stored): {job.stdout.read()[-3000:]}"

    rerun = refresh(load_config(SMOKE_CONFIG, _overrides(setup, store, ["screen", "added"]) + ["features.stale_run_s=0"]))
    assert len(rerun.embedded) == 4 - at_kill and len(rerun.up_to_date) == at_kill
    _assert_same_store(_snapshot(store), clean["snapshot"])


def test_two_refreshes_at_once_leave_a_correct_store(setup, clean, ray_session):
    store = str(setup["root"] / "concurrent")
    address = ray_session.get_runtime_context().gcs_address
    jobs = [_job(setup, store, address) for _ in range(2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    # Each plate was stored once (by whichever refresh marked it first); the other copy was discarded.
    stored = sum(out.count("] features: plate") - out.count("already stored by another refresh") for out in outputs)
    assert stored == 4, outputs
    snapshot = _snapshot(store)
    assert not snapshot[clean["key"]]["fields"][0].duplicated(["plate", "well", "field"]).any()
    _assert_same_store(snapshot, clean["snapshot"])


def test_new_checkpoint_recomputes_under_its_own_key(setup, clean):
    store = str(setup["root"] / "clean")
    summary = refresh(load_config(SMOKE_CONFIG, _overrides(setup, store, ["screen", "added"], checkpoint=1)))
    assert summary.key != clean["key"] and len(summary.embedded) == 4
    old = _snapshot(store)
    _assert_same_store({clean["key"]: old[clean["key"]]}, clean["snapshot"])
    assert not np.allclose(old[summary.key]["fields"][1], old[clean["key"]]["fields"][1])
    assert set(list_entries(store)["key"]) == {clean["key"], summary.key}


def test_per_channel_readout_is_stored_under_its_own_key_with_its_lineage(setup, clean):
    store = str(setup["root"] / "per-channel")
    cfg = load_config(SMOKE_CONFIG, _overrides(setup, store, ["added"]) + ["features.channel_readout=per_channel"])
    summary = refresh(cfg)
    assert summary.embedded == [COPY] and summary.key != clean["key"]
    marker = next(iter(FeatureStore(store).entries(summary.key)))
    assert marker["lineage"]["channel_readout"] == "per_channel"
    assert marker["lineage"]["recipe"]["feature"] == "cls+mean_patch per channel, in channel order"
    # The stored fields are the per-channel readout of the checkpoint; the pooled store holds the pooled one.
    meta, stored = read_features(store, summary.key, level="field")
    pooled_meta, pooled = read_features(clean["store"], clean["key"], level="field", plates=[COPY])
    pd.testing.assert_frame_equal(meta, pooled_meta)
    backbone, _ = load_inference_backbone(setup["checkpoints"][0])
    first = load_manifests([setup["manifests"]["added"]], check_plates=False).set_index(["well", "field"]).loc[
        (meta["well"].iloc[0], int(meta["field"].iloc[0]))]
    image, names = read_field(first["store_uri"], first["row"], first["col"], int(meta["field"].iloc[0]),
                              channels=list(first["channel_names"]))
    image = normalize_field(image, cfg.data.normalization, clip_low=cfg.data.clip_low, clip_high=cfg.data.clip_high,
                            dtype=np.float16).astype(np.float32)
    with torch.inference_mode():
        expected = field_embedding(backbone, torch.from_numpy(image)[None], 0, [names], readout="per_channel")[0]
        expected_pooled = field_embedding(backbone, torch.from_numpy(image)[None], 0, [names])[0]
    assert stored.shape == (len(meta), len(names) * 2 * backbone.embed_dim)
    np.testing.assert_allclose(stored[0], expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled[0], expected_pooled.numpy(), rtol=1e-4, atol=1e-4)


def test_refresh_into_s3_equals_the_local_store(setup, clean, s3_server):
    options = s3_server["storage_options"]
    store = f"s3://{s3_server['bucket']}/refresh-store"
    overrides = _overrides(setup, store, ["screen", "added"]) + [
        "data.storage_options={" + ", ".join(f"{k}: {v}" for k, v in options.items() if k != "client_kwargs") +
        ", client_kwargs: {region_name: us-east-1}}"]
    summary = refresh(load_config(SMOKE_CONFIG, overrides))
    assert summary.key == clean["key"] and len(summary.embedded) == 4
    assert refresh(load_config(SMOKE_CONFIG, overrides)).started_ray is False
    _assert_same_store(_snapshot(store, options), clean["snapshot"])
    s3 = FeatureStore(store, options)
    for path in s3.fs.find(s3.root):
        assert options["secret"].encode() not in s3.fs.cat_file(path), path

"""Plates, manifests, ingestion and synthetic screens through a REAL S3-compatible server on loopback
(moto's standalone server, spoken to over HTTP by s3fs/aiobotocore; no mocked client)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellfm.data.ingest.generic import plan_generic
from cellfm.data.ingest.writer import run_ingestion
from cellfm.data.manifest import ManifestError, manifest_problems, read_manifest, write_manifest
from cellfm.data.plate import PlateError, plate_channel_names, read_field
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.data.validate import open_plate, plate_problems

CHANNELS = ["DNA", "ER", "Mito"]


def _url(s3, key: str) -> str:
    return f"s3://{s3['bucket']}/{key}"


def test_plate_round_trip_and_crop_over_s3(s3_server):
    so, uri = s3_server["storage_options"], _url(s3_server, "plates/RT.zarr")
    wells = [("A", "01"), ("B", "02")]
    create_plate(uri, "RT", wells, 2, CHANNELS, (300, 280), storage_options=so, tile_size=128)
    images = {}
    for i, (row, col) in enumerate(wells):
        for f in range(2):
            images[row, col, f] = np.random.default_rng(i * 2 + f).integers(0, 60000, (3, 300, 280)).astype(np.uint16)
            write_field(uri, row, col, f, images[row, col, f], storage_options=so)
    for (row, col, f), expected in images.items():
        image, names = read_field(uri, row, col, f, storage_options=so)
        assert names == CHANNELS
        np.testing.assert_array_equal(image, expected)
    crop, names = read_field(uri, "B", "02", 1, channels=["Mito", "DNA"], storage_options=so, region=(130, 290, 5, 133))
    np.testing.assert_array_equal(crop, images["B", "02", 1][[2, 0], 130:290, 5:133])
    assert plate_problems(uri, so) == []
    info = open_plate(uri, so)
    assert info.channel_names == CHANNELS and info.field_shape == (300, 280) and info.wells == ["A/01", "B/02"]


def test_manifest_round_trip_and_check_over_s3(s3_server):
    so = s3_server["storage_options"]
    uri = _url(s3_server, "plates/M.zarr")
    create_plate(uri, "M", [("C", "03")], 1, CHANNELS, (16, 16), storage_options=so)
    write_field(uri, "C", "03", 0, np.ones((3, 16, 16), np.uint16), storage_options=so)
    df = pd.DataFrame([{
        "source": "s3test", "plate": "M", "well": "C03", "row": "C", "col": "03", "field": 0, "store_uri": uri,
        "channel_names": CHANNELS, "channel_groups": ["context"] * 3, "height": 16, "width": 16, "dtype": "uint16",
        "perturbation_id": "DMSO", "moa": "control", "is_control": True, "dose": 0.0, "cell_line": "U2OS",
        "batch": "b1", "original_uris": ["s3://raw/a.tif"],
    }])
    path = _url(s3_server, "manifests/m.parquet")
    write_manifest(df, path, storage_options=so)
    back = read_manifest(path, storage_options=so)
    pd.testing.assert_frame_equal(back, df)
    assert manifest_problems(back, so) == []
    back.at[0, "channel_names"] = ["DNA", "Golgi", "Mito"]
    back.at[0, "height"] = 32
    problems = manifest_problems(back, so)
    assert len(problems) == 2 and "['Golgi'] not in plate" in problems[0] and "32 x 16" in problems[1]
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(_url(s3_server, "manifests/nope.parquet"), storage_options=so)


def test_ingestion_writes_plates_and_manifest_to_s3_and_resumes(s3_server, tmp_path):
    so = s3_server["storage_options"]
    for well in ("A01", "B03"):
        for site in (1, 2):
            for ch in ("dapi", "mito"):
                tifffile.imwrite(tmp_path / f"P9_{well}_s{site}_{ch}.tif",
                                 np.full((12, 20), 100 * site + len(ch), np.uint16))
    plan = plan_generic(f"{tmp_path}/*.tif", r"(?P<plate>P\d)_(?P<well>[A-H]\d\d)_s(?P<site>\d)_(?P<channel>\w+)\.tif",
                        {"dapi": "DNA", "mito": "Mito"})
    out, manifest = _url(s3_server, "ingest"), _url(s3_server, "ingest/manifest.parquet")
    first = run_ingestion(plan, out, manifest, so, use_ray=False, progress=None)
    assert first.written == 4
    again = run_ingestion(plan, out, manifest, so, use_ray=False, progress=None)
    assert again.written == 0 and again.skipped == 4
    df = read_manifest(manifest, storage_options=so)
    assert df["store_uri"].unique().tolist() == [_url(s3_server, "ingest/P9.zarr")]
    image, names = read_field(df["store_uri"].iloc[3], "B", "03", 1, storage_options=so)
    assert names == ["DNA", "Mito"] and (image[1] == 204).all()
    assert plate_problems(df["store_uri"].iloc[0], so) == []


def test_synthetic_family_screen_to_s3(s3_server):
    from cellfm.data.synthetic.catalog import ScreenLayout
    from cellfm.data.synthetic.screens import generate_family_screen

    so = s3_server["storage_options"]
    layout = ScreenLayout(n_train_plates=1, n_heldout_plates=1, n_unseen_plates=0, replicates_per_plate=1,
                          controls_per_plate=1, fields_per_well=1, field_size=32)
    paths = generate_family_screen(_url(s3_server, "synthetic/novel4"), config="novel4", layout=layout, seed=0,
                                   storage_options=so)
    assert paths == {"train": _url(s3_server, "synthetic/novel4/train.parquet"),
                     "heldout": _url(s3_server, "synthetic/novel4/heldout.parquet")}
    df = read_manifest(paths["heldout"], storage_options=so)
    row = df.iloc[0]
    image, names = read_field(row.store_uri, row.row, row.col, row.field, storage_options=so)
    assert names == list(row.channel_names) and image.shape[0] == 4 and image.dtype == np.uint16
    assert len(df) == 13 and set(df["compound_split"]) == {"train", "heldout"}
    assert manifest_problems(df, so) == [] and plate_problems(row.store_uri, so) == []


def test_errors_name_the_plate_and_never_the_secret(s3_server):
    so = s3_server["storage_options"]
    with pytest.raises(PlateError) as err:
        plate_channel_names(_url(s3_server, "plates/absent.zarr"), so)
    assert "absent.zarr" in str(err.value) and so["secret"] not in str(err.value)
    wrong = so | {"secret": "a-wrong-secret-value-123"}
    uri = _url(s3_server, "plates/RT2.zarr")
    create_plate(uri, "RT2", [("A", "01")], 1, ["DNA"], (8, 8), storage_options=so)
    problems = plate_problems("s3://no-such-bucket-xyz/p.zarr", wrong)
    assert problems and all(wrong["secret"] not in p and so["key"] not in p for p in problems)


@pytest.mark.integration
def test_pretrain_and_evaluate_jobs_on_s3_storage(s3_server, smoke_overrides, tmp_path):
    """train.storage_path=s3://...: `jobs/pretrain.py` trains with Ray Train writing the checkpoint through
    pyarrow with the same endpoint/credentials as data.storage_options; config.yaml and rank 0's TensorBoard
    events land in the run directory; no file the run wrote (on S3 or locally) and nothing the jobs print
    holds a credential; `jobs/evaluate.py`, given the run's own saved config and the credentials in the
    environment, finds the latest checkpoint there and evaluates from it; the inference backbone loads
    straight from s3://.

    The jobs run as subprocesses with their own embedded Ray, as users run them; this also keeps the fit out
    of the long shared test session, where it was seen to hang inside Ray (the GCS had created the
    TrainController actor, the driver was never told and never sent it `run`)."""
    import os
    import subprocess
    import sys

    import boto3
    import torch
    import yaml

    from cellfm.config import CREDENTIAL_MARKER, load_config
    from cellfm.train.checkpoint import latest_checkpoint, load_inference_backbone
    from cellfm.storage import run_directory
    from tests.conftest import REPO, SMOKE_CONFIG

    so = s3_server["storage_options"]
    credentials = [so["key"].encode(), so["secret"].encode()]
    overrides = [o for o in smoke_overrides if not o.startswith("train.storage_path=")] + [
        f"train.storage_path=s3://{s3_server['bucket']}/runs", "train.run_name=on-s3", f"data.storage_options={so}"]
    cfg = load_config(SMOKE_CONFIG, overrides)
    pretrain = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(SMOKE_CONFIG),
                               *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert pretrain.returncode == 0, pretrain.stdout[-3000:] + pretrain.stderr[-3000:]
    run_dir = run_directory(cfg)
    assert run_dir == f"s3://{s3_server['bucket']}/runs/on-s3"

    client = boto3.client("s3", endpoint_url=so["endpoint_url"], aws_access_key_id=so["key"],
                          aws_secret_access_key=so["secret"], region_name="us-east-1")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_server["bucket"], Prefix="runs/on-s3/")["Contents"]}
    assert "runs/on-s3/config.yaml" in keys
    assert any(k.startswith("runs/on-s3/tensorboard/events.") for k in keys)
    assert {"runs/on-s3/checkpoint_epoch0000/backbone.safetensors", "runs/on-s3/checkpoint_epoch0000/optimizer.pt",
            "runs/on-s3/checkpoint_epoch0000/trainer_state.json", "runs/on-s3/checkpoint_epoch0000/config.yaml"} <= keys
    for key in keys:  # every object of the run: configs, checkpoints, TensorBoard events
        body = client.get_object(Bucket=s3_server["bucket"], Key=key)["Body"].read()
        assert not [c for c in credentials if c in body], f"{key} holds a credential"
    saved_text = client.get_object(Bucket=s3_server["bucket"], Key="runs/on-s3/config.yaml")["Body"].read().decode()
    saved = yaml.safe_load(saved_text)
    assert saved["train"]["storage_path"] == cfg.train.storage_path
    assert saved["data"]["storage_options"] == {"endpoint_url": so["endpoint_url"], "key": CREDENTIAL_MARKER,
                                                "secret": CREDENTIAL_MARKER, "client_kwargs": so["client_kwargs"]}

    # Evaluation from the run's own config: the markers are dropped, the credentials come from the environment.
    run_config = tmp_path / "run-config.yaml"
    run_config.write_text(saved_text)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=so["key"], AWS_SECRET_ACCESS_KEY=so["secret"])
    evaluate = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--config", str(run_config)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    for job in (pretrain, evaluate):  # nothing printed holds a credential either
        assert not [c for c in credentials if c.decode() in job.stdout + job.stderr]
    for path in tmp_path.rglob("*"):  # the report and everything else written locally
        if path.is_file():
            assert not [c for c in credentials if c in path.read_bytes()], f"{path} holds a credential"

    ckpt = latest_checkpoint(run_dir, so)
    assert ckpt == f"{run_dir}/checkpoint_epoch0000"
    report = json.loads((Path(cfg.eval.output_dir) / "report.json").read_text())
    assert report["checkpoint"] == ckpt and set(report["results"]) == {"seen", "unseen"}
    moa = report["results"]["seen"]["details"]["trained"]["probe"]["moa"]
    assert (moa["n_classes"], moa["n_train_wells"], moa["n_test_wells"]) == (6, 13, 13)
    assert len(moa["top1_per_split"]) == cfg.eval.n_splits

    backbone, saved_cfg = load_inference_backbone(ckpt, so)
    assert saved_cfg.to_dict()["model"] == saved["model"]  # the run's config.yaml (manifest channels filled in)
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 32, 32))["cls"].shape == (2, backbone.embed_dim)

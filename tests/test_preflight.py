"""Preflight: every bad value a job would otherwise meet inside Ray (or silently) ends the job before
Ray starts, with one `error: ...` line naming its key and exit code 2; several bad values are all
reported at once; paths a `ray job submit` job cannot see are explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cellfm.cli import main
from cellfm.config import load_config
from tests.conftest import REPO, SMOKE_CONFIG


@pytest.fixture
def nothing_runs(monkeypatch):
    """Guard: a bad value that got through preflight fails here instead of starting a Ray run."""
    import cellfm.evaluate.run
    import cellfm.train.trainer

    def started(*args, **kwargs):
        raise AssertionError("preflight let a bad config through to the run")

    monkeypatch.setattr(cellfm.train.trainer, "run_pretraining", started)
    monkeypatch.setattr(cellfm.evaluate.run, "run_evaluation", started)


def run_cellfm(capsys, *argv: str) -> tuple[int, list[str]]:
    import ray

    code = main(list(argv))
    assert not ray.is_initialized(), "preflight must fail before Ray starts"
    return code, capsys.readouterr().err.splitlines()


PRETRAIN_CASES = [
    (["optim.warmup_epochs=2"], "optim.warmup_epochs=2 is more than optim.epochs=1"),
    (["data.field_size=-1"], "data.field_size must be >= 0, got -1"),
    (["data.pad_channels_to=3"], "data.pad_channels_to=3 is smaller than the 5 channels of plate 'SYN-TRAIN-01'"),
    (["data.read_actors=1", "data.read_concurrency=2"], "data.read_actors=1 and data.read_concurrency=2 both"),
    (["data.transfer_dtype=uint8", "data.normalization=standardize"], "data.transfer_dtype=uint8 holds [0, 1]"),
    (["data.max_bad_fraction=1.5"], "data.max_bad_fraction must be in [0, 1], got 1.5"),
    (["model.channel_groups={DNA: nucleus}"], "model.channel_groups values must be one of ['context', 'concept']"),
    (["ssl.global_crop_scale=[a,1]"], "ssl.global_crop_scale[0] must be float, got 'a' (str)"),
    (["ssl.mask_ratio_min_max=[0.6,0.2]"], "ssl.mask_ratio_min_max must be [min, max] with 0 <= min <= max <= 1"),
    (["ssl.intensity_jitter=1.0"], "ssl.intensity_jitter must be in [0, 1), got 1.0"),
    (["ssl.mcd_keep_counts=[0,1]"], "ssl.mcd_keep_counts must all be >= 1"),
    (["ssl.supcon_weight=0.5"], "ssl.supcon_weight > 0 needs ssl.supcon_label"),
    (["ssl.supcon_weight=0.5", "ssl.supcon_label=antibody"], "ssl.supcon_label='antibody' is not a column of"),
    (["ssl.blur_sigma=[2,1]"], "ssl.blur_sigma must be [low, high] pixels"),
    (["ssl.ema_momentum_end=1.5"], "ssl.ema_momentum_end must be in [0, 1], got 1.5"),
    (["optim.batch_size_per_worker=64"], "training fields over train.num_workers=2 cannot fill one step of "
                                         "optim.batch_size_per_worker=64"),
    (["optim.clip_grad=0"], "optim.clip_grad must be > 0"),
    (["model.drop_path_rate=1"], "model.drop_path_rate must be in [0, 1), got 1.0"),
    (["model.layerscale_init=0"], "model.layerscale_init must be > 0 or null"),
    (["model.patch_size=0"], "model.patch_size must be > 0, got 0"),
    (["model.name=c3r", "model.n_pre=10"], "model.n_pre=10 leaves no joint block at model.size=tiny"),
    (["model.name=channelvit", "model.channel_vocabulary=[DNA, ER]"],
     "model.channel_vocabulary lacks channel(s) ['AGP', 'Mito', 'RNA']"),
    (["optim.epochs=three"], "optim.epochs must be int, got 'three' (str)"),
    (["optim.lerning_rate=0.1"], "unknown config key(s) optim.lerning_rate"),
    (["train.log_every_steps=0"], "train.log_every_steps must be > 0"),
]


@pytest.mark.parametrize("bad, message", PRETRAIN_CASES, ids=[" ".join(b) for b, _ in PRETRAIN_CASES])
def test_each_bad_training_value_is_one_line_naming_its_key(bad, message, smoke_overrides, nothing_runs, capsys):
    code, lines = run_cellfm(capsys, "pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, *bad)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_every_problem_is_reported_at_once(smoke_overrides, nothing_runs, capsys):
    bad = ["optim.warmup_epochs=2", "data.pad_channels_to=3", "data.max_bad_fraction=-0.1", "ssl.intensity_jitter=2",
           "optim.batch_size_per_worker=64"]
    code, lines = run_cellfm(capsys, "pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides, *bad)
    assert code == 2 and len(lines) == len(bad), lines
    for key in ("optim.warmup_epochs", "data.pad_channels_to", "data.max_bad_fraction", "ssl.intensity_jitter",
                "optim.batch_size_per_worker"):
        assert sum(key in line for line in lines) == 1, (key, lines)


def test_a_good_config_passes(smoke_overrides, nothing_runs):
    from cellfm.preflight import preflight_problems

    assert preflight_problems(load_config(SMOKE_CONFIG, smoke_overrides), train=True, evaluate=True) == []


@pytest.fixture(scope="module")
def checkpoints(tiny_screen, tmp_path_factory):
    """Inference checkpoints (backbone weights + config.yaml) of an untrained tiny CellRep and of a C3R
    that knows no group for Mito: what `cellfm evaluate --checkpoint` reads."""
    from cellfm.models.registry import build_backbone
    from cellfm.train.checkpoint import save_inference_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, overrides in {"cellrep": [], "c3r": ["model.name=c3r", "ssl.objective=ibot",
                                                   "model.channel_groups={DNA: context, ER: context, "
                                                   "RNA: context, AGP: context}"]}.items():
        cfg = load_config(SMOKE_CONFIG, [f"data.train_manifest={tiny_screen['train']}", *overrides])
        save_inference_checkpoint(root / name, cfg=cfg, backbone=build_backbone(cfg.model))
        made[name] = root / name
    return made


def _heldout_with_one_control_well(tiny_screen, tmp_path) -> Path:
    manifest = pd.read_parquet(tiny_screen["heldout"])
    base = Path(tiny_screen["heldout"]).parent
    manifest["store_uri"] = [u if Path(u).is_absolute() else str(base / u) for u in manifest["store_uri"]]
    first_control = manifest.loc[manifest["is_control"], "well"].iloc[0]
    manifest["is_control"] = manifest["well"] == first_control
    path = tmp_path / "one_control.parquet"
    manifest.to_parquet(path)
    return path


EVALUATE_CASES = [
    (["eval.labels=[localization]"], "eval.labels: 'localization' is not a column of eval.manifests.seen="),
    (["eval.labels=[moa]", "eval.test_fraction=0.95"],
     "eval.labels: 'moa' has 6 classes but eval.test_fraction=0.95 of 26 wells"),
    (["eval.manifests={}"], "eval.manifests is empty"),
    (["eval.image_size=12"], "eval.image_size=12 must be 0 or a multiple of model.patch_size"),
]


@pytest.mark.parametrize("bad, message", EVALUATE_CASES, ids=[" ".join(b) for b, _ in EVALUATE_CASES])
def test_each_bad_evaluation_value_is_one_line_naming_its_key(bad, message, tiny_screen, checkpoints, smoke_overrides,
                                                              nothing_runs, capsys):
    one_manifest = f"eval.manifests={{seen: {tiny_screen['heldout']}}}"
    code, lines = run_cellfm(capsys, "evaluate", "--config", str(SMOKE_CONFIG), "--checkpoint",
                             str(checkpoints["cellrep"]), *smoke_overrides, one_manifest, *bad)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_evaluation_needs_controls_and_channel_groups_the_checkpoint_knows(tiny_screen, checkpoints, smoke_overrides,
                                                                          nothing_runs, capsys, tmp_path):
    manifest = _heldout_with_one_control_well(tiny_screen, tmp_path)
    code, lines = run_cellfm(capsys, "evaluate", "--config", str(SMOKE_CONFIG), "--checkpoint",
                             str(checkpoints["cellrep"]), *smoke_overrides, f"eval.manifests={{seen: {manifest}}}")
    assert code == 2 and len(lines) == 1, lines
    assert "eval.well_normalization=negcon needs >= 2 negative-control wells per plate; plate 'SYN-HELDOUT-01'" in lines[0]

    code, lines = run_cellfm(capsys, "evaluate", "--config", str(SMOKE_CONFIG), "--checkpoint",
                             str(checkpoints["c3r"]), *smoke_overrides)
    assert code == 2 and len(lines) == 2, lines  # the seen and the unseen plates both hold Mito
    for name, line in zip(("seen", "unseen"), lines):
        assert f"model.channel_groups: channel(s) ['Mito'] of eval.manifests.{name}=" in line
    # ... and the evaluation config may place the stain, as the docs say
    from cellfm.preflight import preflight_problems

    cfg = load_config(SMOKE_CONFIG, [*smoke_overrides, "model.channel_groups={Mito: context}"])
    assert preflight_problems(cfg, evaluate=True, checkpoint=str(checkpoints["c3r"])) == []


def test_job_script_fails_before_any_ray_process(tmp_path, smoke_overrides):
    """As users run it: `python jobs/pretrain.py` with a bad value exits 2 with one line, and Ray never
    created its temp folder (RAY_TMPDIR points at a fresh one)."""
    ray_tmp = tmp_path / "ray"
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp))
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(SMOKE_CONFIG),
                          *smoke_overrides, "optim.warmup_epochs=5"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"error: {SMOKE_CONFIG} + overrides: optim.warmup_epochs=5 is more than "
                                       f"optim.epochs=1; the warm-up must fit in the run "
                                       f"(0 <= optim.warmup_epochs <= optim.epochs)"]
    assert not ray_tmp.exists()


def test_paths_a_submitted_job_cannot_see_are_explained(monkeypatch, tmp_path, smoke_overrides, nothing_runs, capsys):
    """Under `ray job submit --working-dir .` (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR for the driver) a
    relative manifest path that is not in the uploaded copy, and a relative output path, are refused."""
    monkeypatch.chdir(tmp_path)  # the job's unpacked working directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    overrides = [o for o in smoke_overrides if not o.startswith("train.storage_path=")]
    code, lines = run_cellfm(capsys, "pretrain", "--config", str(SMOKE_CONFIG), *overrides,
                             "data.train_manifest=demo_output/screen/train.parquet", "--storage-path", "runs")
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == ("error: train.storage_path=runs is a relative path: under `ray job submit` it would be written "
                        "into the job's temporary working directory on one node and lost; use an absolute path on "
                        "storage every node sees (e.g. /shared/...) or an s3:// URI")
    assert lines[1].startswith("error: data.train_manifest=demo_output/screen/train.parquet is a relative path the "
                               f"cluster cannot see: it does not exist in the job's working directory {tmp_path} "
                               "(`--working-dir` uploaded only the files git does not ignore")
    assert lines[1].endswith("use an absolute path on storage every node sees (e.g. /shared/...) or an s3:// URI")


def test_a_pretrain_run_reads_each_plates_metadata_once_before_training(smoke_overrides, monkeypatch, capsys):
    """Preflight loads the training manifest with its plates checked and hands it to the trainer: the plates are
    opened as often as one check of the manifest opens them, not once for preflight and again for the trainer."""
    import collections

    import cellfm.data.plate
    import cellfm.train.trainer
    from cellfm.config import ConfigError
    from cellfm.data.pipeline.dataset import load_manifests

    opened: collections.Counter = collections.Counter()
    real_open_store = cellfm.data.plate.open_store

    def counting_open_store(uri, *args, **kwargs):
        opened[uri] += 1
        return real_open_store(uri, *args, **kwargs)

    def before_ray(*args, **kwargs):
        raise ConfigError("stopped where Ray would start")

    monkeypatch.setattr(cellfm.data.plate, "open_store", counting_open_store)
    cfg = load_config(SMOKE_CONFIG, smoke_overrides)
    load_manifests([cfg.data.train_manifest])
    one_check = dict(opened)
    opened.clear()
    monkeypatch.setattr(cellfm.train.trainer, "init_ray", before_ray)
    code, err = run_cellfm(capsys, "pretrain", "--config", str(SMOKE_CONFIG), *smoke_overrides)
    assert code == 2 and err[-1].endswith("stopped where Ray would start")
    assert one_check and dict(opened) == one_check


def test_a_manifest_mixing_configurations_validates_and_a_too_small_padding_is_named(family_screen, tmp_path):
    """Pre-training on a mix of configurations: one training manifest of 5-channel cp5, 4-channel hpa4 and
    1-channel brightfield plates passes preflight for C3R (every stain's group comes from the manifest); a
    padding smaller than the largest channel count is one line naming the plate, well and field."""
    from cellfm.data.manifest import read_manifest, write_manifest
    from cellfm.preflight import preflight_problems

    parts = [read_manifest(family_screen(config)["train"]) for config in ("cp5", "hpa4", "brightfield1")]
    mixed = pd.concat(parts, ignore_index=True)
    assert sorted(set(mixed["channel_names"].map(len))) == [1, 4, 5]
    path = tmp_path / "mixed.parquet"
    write_manifest(mixed, path)
    overrides = [f"data.train_manifest={path}", f"train.storage_path={tmp_path / 'runs'}", "model.name=c3r"]
    assert preflight_problems(load_config(SMOKE_CONFIG, overrides), train=True) == []
    problems = preflight_problems(load_config(SMOKE_CONFIG, [*overrides, "data.pad_channels_to=4"]), train=True)
    first = parts[0].iloc[0]  # the first field with the most channels: a cp5 one
    assert len(problems) == 1 and (f"data.pad_channels_to=4 is smaller than the 5 channels of plate {first['plate']!r} "
                                   f"well {first['well']} field {first['field']}") in problems[0]

"""Continued pre-training (`train.init_from`): a new run starts from a checkpoint's student, teacher, heads and
centers with a fresh optimizer and schedules; a checkpoint whose architecture does not fit the config fails
before Ray starts, naming the key; other channel names continue where the architecture allows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cellfm.config import ConfigError, load_config
from cellfm.data.batch import FieldBatch
from cellfm.preflight import preflight_problems
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.train.in_memory import train_in_memory
from cellfm.train.init_from import init_from_problems
from cellfm.train.meta_arch import SSLMetaArch
from cellfm.train.inputs import record_channel_metadata
from cellfm.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import SMOKE_CONFIG

CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]
NOVEL = ["Golgi", "Mito", "DNA", "Tubulin"]
SMALL = ["ssl.global_crop_size=16", "ssl.local_crop_size=8", "optim.batch_size_per_worker=4"]
MODELS = {
    "cellrep": [],
    "c3r": ["model.name=c3r", "ssl.objective=ibot"],
    "channelvit": ["model.name=channelvit", "ssl.objective=ibot"],
    "dichavit": ["model.name=dichavit", "ssl.objective=ibot"],
    "ca_mae": ["model.name=ca_mae", "ssl.objective=mae", "ssl.n_local_crops=0"],
}


def manifest_of(channels: list[str]) -> pd.DataFrame:
    groups = ["concept" if c in ("Mito", "Tubulin") else "context" for c in channels]
    return pd.DataFrame({"plate": ["P"], "well": ["A01"], "field": [0], "channel_names": [channels],
                         "channel_groups": [groups]})


def new_arch(cfg, **kwargs) -> SSLMetaArch:
    return SSLMetaArch(cfg, steps_per_epoch=2, rank=0, world_size=1, device=torch.device("cpu"),
                       prepare_model=lambda m: m, **kwargs)


def source_run(tmp_path: Path, model: str = "cellrep", steps: int = 2) -> tuple[Path, SSLMetaArch]:
    """A run folder holding one checkpoint of `model` after `steps` in-memory steps on CP5 fields (0: as built)."""
    cfg = load_config(SMOKE_CONFIG, [*SMALL, *MODELS[model], f"train.storage_path={tmp_path / 'runs'}",
                                     "train.run_name=source", "optim.base_lr=0.05"])
    record_channel_metadata(cfg, manifest_of(CP5))
    if steps:
        arch = train_in_memory(cfg, torch.rand(4 * steps, 5, 32, 32, generator=torch.Generator().manual_seed(0)), CP5)
    else:
        arch = new_arch(cfg)
    run_dir = run_directory(cfg)
    arch.save(run_dir / "checkpoint_000000", epoch=0, step=steps)
    return run_dir, arch


def test_a_new_run_starts_from_the_checkpoint_with_a_fresh_optimizer(tmp_path):
    run_dir, source = source_run(tmp_path)
    assert len(source.engine.optimizer.state) > 0
    ckpt = latest_checkpoint(run_dir)
    teacher = load_file(ckpt / "teacher.safetensors")
    student = load_file(ckpt / "student.safetensors")
    # A run folder names its latest checkpoint; the checkpoint folder itself works the same.
    for init_from in (run_dir, ckpt):
        cfg = load_config(SMOKE_CONFIG, [*SMALL, f"train.init_from={init_from}", "train.seed=7"])
        arch = new_arch(cfg)
        assert all(torch.equal(v, teacher[k]) for k, v in arch.teacher.state_dict().items())
        assert all(torch.equal(v, student[k]) for k, v in arch.engine.student.state_dict().items())
        torch.testing.assert_close(arch.objective.dino_loss.center, source.objective.dino_loss.center)
        assert len(arch.engine.optimizer.state) == 0  # fresh AdamW moments
    fresh = new_arch(load_config(SMOKE_CONFIG, [*SMALL, "train.seed=7"]))
    assert any(not torch.equal(v, teacher[k]) for k, v in fresh.teacher.state_dict().items())  # the load mattered
    assert (arch.schedules.lr == fresh.schedules.lr).all()  # schedules start at step 0
    g = torch.Generator().manual_seed(1)
    arch.forward_backward(FieldBatch(torch.rand(4, 5, 32, 32, generator=g), [CP5] * 4), epoch=0, step=0, micro=0)
    arch.optimizer_step(0)
    assert {int(s["step"]) for s in arch.engine.optimizer.state.values()} == {1}
    # A run that resumes from its own checkpoint does not read train.init_from.
    resumed = new_arch(cfg, resuming=True)
    assert all(torch.equal(v, fresh.teacher.state_dict()[k]) for k, v in resumed.teacher.state_dict().items())


@pytest.mark.parametrize("override, key", [("model.mixer_depth=1", "model.mixer_depth"),
                                           ("model.size=small", "model.size"),
                                           ("ssl.objective=ibot", "ssl.objective"),
                                           ("ssl.head_out_dim=64", "ssl.head_out_dim")])
def test_a_mismatched_architecture_is_one_line_naming_the_key(tmp_path, override, key):
    run_dir, _ = source_run(tmp_path, steps=0)
    cfg = load_config(SMOKE_CONFIG, [*SMALL, f"train.init_from={run_dir}", override])
    problems = init_from_problems(cfg, manifest_of(CP5))
    assert len(problems) == 1 and problems[0].startswith(f"train.init_from={run_dir}: ")
    assert f"{key} (checkpoint" in problems[0]
    # Keys that do not shape the weights may differ.
    fine = load_config(SMOKE_CONFIG, [*SMALL, f"train.init_from={run_dir}", "model.drop_path_rate=0.1", "model.n_pre=3"])
    assert init_from_problems(fine, manifest_of(CP5)) == []
    missing = load_config(SMOKE_CONFIG, [*SMALL, f"train.init_from={tmp_path / 'nowhere'}"])
    assert "no checkpoint" in init_from_problems(missing, manifest_of(CP5))[0]


def test_mismatched_architecture_fails_before_ray_starts(tmp_path, tiny_screen, smoke_overrides, monkeypatch):
    run_dir, _ = source_run(tmp_path, steps=0)
    cfg = load_config(SMOKE_CONFIG, [*smoke_overrides, f"train.init_from={run_dir}", "model.mixer_depth=3"])
    problems = preflight_problems(cfg, train=True)
    assert any("model.mixer_depth (checkpoint 2, this run 3)" in p for p in problems), problems

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr("cellfm.train.trainer.init_ray", no_ray)
    with pytest.raises(ConfigError, match=r"train.init_from=.*model.mixer_depth \(checkpoint 2, this run 3\)"):
        run_pretraining(cfg)


@pytest.mark.parametrize("model", list(MODELS))
def test_other_channel_names_continue_where_the_architecture_allows(tmp_path, model):
    run_dir, _ = source_run(tmp_path, model, steps=0)
    cfg = load_config(SMOKE_CONFIG, [*SMALL, *MODELS[model], f"train.init_from={run_dir}"])
    problems = init_from_problems(cfg, manifest_of(NOVEL))
    if model in ("channelvit", "dichavit"):
        assert len(problems) == 1 and "channel(s) ['Golgi', 'Tubulin'] of data.train_manifest are not in the " \
            "checkpoint's model.channel_vocabulary" in problems[0]
        # On the checkpoint's own names (any subset, any order) it continues, with the checkpoint's vocabulary.
        subset = manifest_of(["Mito", "DNA"])
        assert init_from_problems(cfg, subset) == []
        record_channel_metadata(cfg, subset)
        assert cfg.model.channel_vocabulary == sorted(CP5)
        new_arch(cfg)
    else:
        assert problems == []  # CellRep, C3R (groups from the manifest) and CA-MAE take any channel names


@pytest.mark.integration
def test_a_ray_run_continues_from_a_checkpoint(tmp_path, ray_session, tiny_screen, smoke_overrides):
    """One epoch on 2 workers from an in-memory run's checkpoint: the driver saves the resolved checkpoint
    folder with the run, and the trained teacher (EMA momentum >= 0.992 over a few steps) stays next to the
    source teacher, far closer than the run's own initialization (seed 7, the source's 0) is."""
    run_dir, source = source_run(tmp_path, steps=2)
    cfg = load_config(SMOKE_CONFIG, [*smoke_overrides, f"train.init_from={run_dir}", "train.run_name=continued",
                                     "train.seed=7"])
    result = run_pretraining(cfg)
    assert result.metrics["epoch"] == 0
    saved = load_config(run_directory(cfg) / "config.yaml")
    assert saved.train.init_from == str(latest_checkpoint(run_dir))
    trained = load_file(latest_checkpoint(run_directory(cfg)) / "teacher.safetensors")
    source_teacher = source.teacher.state_dict()
    fresh = new_arch(load_config(SMOKE_CONFIG, [*SMALL, "train.seed=7"])).teacher.state_dict()

    def distance(a, b):
        return sum(float((a[k].float() - b[k].float()).norm()) for k in source_teacher if "backbone" in k)

    assert distance(trained, source_teacher) < 0.2 * distance(fresh, source_teacher)

"""End to end on real components: a 2-worker DDP run on the tiny screen writes a checkpoint,
evaluation loads it through Ray Data batch inference and writes a report; relaunching the same
run name resumes it."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellfm.config import load_config
from cellfm.evaluate.run import run_evaluation
from cellfm.train.checkpoint import latest_checkpoint, load_inference_backbone
from cellfm.train.trainer import run_directory, run_pretraining
from tests.conftest import SMOKE_CONFIG

pytestmark = pytest.mark.integration


def test_pretrain_checkpoint_evaluate_resume(ray_session, smoke_overrides, tiny_screen):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides + ["train.run_name=e2e"])
    result = run_pretraining(cfg)
    run_dir = run_directory(cfg)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.resolve() == __import__("pathlib").Path(result.checkpoint.path).resolve()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["step"] > 0
    assert (run_dir / "config.yaml").is_file()
    assert result.metrics["loss"] > 0 and result.metrics["images_per_s"] > 0

    # Rank 0 wrote TensorBoard scalars.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/dino_local", "train/kl_uniform", "schedule/lr", "schedule/teacher_temp"} <= tags

    # The inference checkpoint rebuilds the teacher backbone without training code or pickle.
    backbone, saved_cfg = load_inference_backbone(ckpt)
    assert saved_cfg.model == cfg.model
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 32, 32))
    assert out["cls"].shape == (2, backbone.embed_dim)

    report, paths = run_evaluation(cfg, ckpt)
    assert set(report["results"]) == {"seen", "unseen"}
    assert report["results"]["unseen"]["channels"] != report["results"]["seen"]["channels"]
    for block in report["results"].values():
        for encoder in ("trained", "random_init"):
            for label in ("perturbation_id", "moa"):
                s = block["scores"][encoder][label]
                assert 0.0 <= s["top1"] <= 1.0 and s["n_test_wells"] > 0
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["json"].read_text())["checkpoint"] == str(ckpt.resolve())

    # Relaunch with the same run name and one more epoch: resumes at the saved step.
    resumed = run_pretraining(load_config(SMOKE_CONFIG, smoke_overrides + ["train.run_name=e2e", "optim.epochs=2"]))
    assert resumed.metrics["epoch"] == 1
    assert resumed.metrics["step"] == 2 * state["step"]

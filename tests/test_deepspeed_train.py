"""DeepSpeed under the same Ray Train loop on 2 CPU workers (gloo): a run trains and writes a merged checkpoint
(every rank's optimizer partition, rank 0's weights), the inference backbone loads from it, and relaunching
the same run name with more epochs resumes with the step counter, optimizer state and schedules continuing
exactly. ZeRO-2 only: that ZeRO-1 and ZeRO-2 partitions both restore exactly is proven without Ray
(tests/test_engines.py); the Ray loop and the checkpoint layout are the same for both stages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cellfm.config import load_config
from cellfm.train.checkpoint import latest_checkpoint, load_inference_backbone
from cellfm.train.meta_arch import Schedules
from cellfm.storage import run_directory
from cellfm.train.trainer import run_pretraining
from tests.conftest import SMOKE_CONFIG, tensorboard_scalars

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage", [2])
def test_deepspeed_trains_checkpoints_and_resumes(ray_session, smoke_overrides, stage):
    common = smoke_overrides + ["train.engine=deepspeed", f"train.zero_stage={stage}", f"train.run_name=zero{stage}",
                                "ssl.warmup_teacher_temp_epochs=2", "optim.warmup_epochs=1"]
    first_cfg = load_config(SMOKE_CONFIG, common + ["optim.epochs=1"])
    first = run_pretraining(first_cfg)
    run_dir = run_directory(first_cfg)
    ckpt = latest_checkpoint(run_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    steps_per_epoch = state["step"]
    assert state["epoch"] == 0 and steps_per_epoch > 0
    assert math.isfinite(first.metrics["loss"]) and first.metrics["loss"] > 0
    assert first.metrics["mfu"] is None  # CPU: no peak FLOP/s, no made-up MFU
    assert sorted(p.name for p in (ckpt / "zero").iterdir()) == [
        "rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"]
    assert not (ckpt / "optimizer.pt").exists()
    layout = json.loads((ckpt / "zero" / "rank_00001.json").read_text())
    assert layout["zero_stage"] == stage and layout["world_size"] == 2

    backbone, saved_cfg = load_inference_backbone(ckpt)
    assert saved_cfg.train.engine == "deepspeed" and saved_cfg.model == first_cfg.model
    with torch.no_grad():
        assert backbone(torch.rand(2, 3, 32, 32))["cls"].shape == (2, backbone.embed_dim)

    second_cfg = load_config(SMOKE_CONFIG, common + ["optim.epochs=2"])
    resumed = run_pretraining(second_cfg)
    assert resumed.metrics["epoch"] == 1 and resumed.metrics["step"] == 2 * steps_per_epoch
    final = latest_checkpoint(run_dir)
    # The optimizer partitions were restored, not rebuilt: AdamW has counted every step of both launches.
    for rank in (0, 1):
        tensors = load_file(final / "zero" / f"rank_{rank:05d}.safetensors")
        assert float(tensors["group0.step"]) == 2 * steps_per_epoch
    # Schedules continue exactly at the restored step (those of the relaunched config's 2 epochs).
    world, batch = second_cfg.train.num_workers, second_cfg.optim.batch_size_per_worker
    sched = Schedules(second_cfg, steps_per_epoch, world * batch * second_cfg.optim.accumulate_steps)
    lr, temp = tensorboard_scalars(run_dir, "schedule/lr"), tensorboard_scalars(run_dir, "schedule/teacher_temp")
    assert sorted(lr) == list(range(2 * steps_per_epoch))
    for step in range(steps_per_epoch, 2 * steps_per_epoch):
        assert lr[step] == pytest.approx(sched.lr[step], rel=1e-6)
        assert temp[step] == pytest.approx(sched.teacher_temp[step], rel=1e-6)
    assert all(math.isfinite(v) for v in tensorboard_scalars(run_dir, "train/loss").values())

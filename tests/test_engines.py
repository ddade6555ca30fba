"""Training engines outside Ray, on 2 gloo processes: DDP gradient accumulation all-reduces on the step's last
micro-batch only, and DeepSpeed ZeRO-1/2 optimizer partitions saved without pickle restore exactly (a
restored engine takes the same next step as the one that kept going)."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cellfm.config import load_config
from cellfm.train.engines import DDPEngine, DeepSpeedEngine, OptimizerStateError, deepspeed_config
from cellfm.train.param_groups import parameter_groups
from tests.conftest import SMOKE_CONFIG

pytestmark = pytest.mark.integration

WORLD = 2


class TinyNet(torch.nn.Module):
    """Two layers plus a `head.last_layer` so the frozen-prototype hook has something to act on."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 10)
        self.head = torch.nn.Module()
        self.head.last_layer = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.head.last_layer(torch.relu(self.body(x)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_accumulation_worker(rank: int, port: int, results) -> None:
    """3 micro-batches per step through DDPEngine: count the all-reduces DDP launches during each backward
    (a communication hook that counts, then all-reduces as DDP's default does), and compare the synced
    gradient with the mean over ranks of each rank's locally accumulated gradient (a plain copy of the model)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    accumulate = 3
    cfg = load_config(SMOKE_CONFIG, [f"optim.accumulate_steps={accumulate}", "optim.clip_grad=1e9"])
    torch.manual_seed(0)
    model = TinyNet()
    local = copy.deepcopy(model)
    engine = DDPEngine(cfg, model, parameter_groups(model), prepare_model=DistributedDataParallel)
    launched: list[int] = []

    def counting_allreduce(state, bucket):
        launched.append(1)
        return allreduce_hook(state, bucket)

    engine.model.register_comm_hook(None, counting_allreduce)
    per_micro_batch = []
    for micro in range(accumulate):
        gen = torch.Generator().manual_seed(10 * micro + rank)
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        with engine.micro_batch(last=micro == accumulate - 1, freeze_last_layer=False):
            engine.backward(torch.nn.functional.mse_loss(engine.model(x), y))
        per_micro_batch.append(len(launched))
        (torch.nn.functional.mse_loss(local(x), y) / accumulate).backward()
    expected = [p.grad.clone() for p in local.parameters()]
    for grad in expected:
        dist.all_reduce(grad)
        grad /= WORLD
    synced = all(torch.allclose(p.grad, e, rtol=1e-6, atol=1e-7) for p, e in zip(model.parameters(), expected))
    before = [p.detach().clone() for p in model.parameters()]
    for group in engine.param_groups:  # as the step's owner sets them before every step
        group["lr"] = 0.05
    engine.step(freeze_last_layer=False)
    stepped = all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    results[rank] = {"launched_after_each_micro_batch": per_micro_batch, "synced": synced, "stepped": stepped,
                     "grads_cleared": all(p.grad is None for p in model.parameters())}
    dist.destroy_process_group()


def test_ddp_accumulation_all_reduces_only_on_the_last_micro_batch():
    results = mp.Manager().dict()
    mp.spawn(_ddp_accumulation_worker, args=(_free_port(), results), nprocs=WORLD)
    for rank in range(WORLD):
        launched = results[rank]["launched_after_each_micro_batch"]
        assert launched[0] == launched[1] == 0 and launched[2] > 0, launched  # no_sync for the first two
        assert results[rank]["synced"] and results[rank]["stepped"] and results[rank]["grads_cleared"], rank


def _engine(stage: int, seed: int) -> DeepSpeedEngine:
    cfg = load_config(SMOKE_CONFIG, ["train.engine=deepspeed", f"train.zero_stage={stage}",
                                     "optim.batch_size_per_worker=4", "optim.accumulate_steps=2"])
    torch.manual_seed(seed)
    model = TinyNet()
    return DeepSpeedEngine(cfg, model, parameter_groups(model), WORLD)


def _train_step(engine: DeepSpeedEngine, step: int, rank: int, freeze: bool = False) -> float:
    for group in engine.param_groups:  # as the loop does before every step
        group["lr"] = 0.05 * group["lr_scale"]
        if group["apply_wd"]:
            group["weight_decay"] = 0.1
    for micro in range(2):
        gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        with engine.micro_batch(last=micro == 1, freeze_last_layer=freeze):
            engine.backward(torch.nn.functional.mse_loss(engine.model(x), y))
    return engine.step(freeze_last_layer=freeze)


def _worker(rank: int, port: int, directory: str, stage: int, results) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher (or Ray Train) sets; DeepSpeed requires it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from pathlib import Path

    ckpt = Path(directory)
    kept = _engine(stage, seed=0)
    frozen_before = [p.detach().clone() for p in kept.student.head.last_layer.parameters()]
    body_before = kept.student.body.weight.detach().clone()
    _train_step(kept, 0, rank, freeze=True)
    frozen_unchanged = (all(torch.equal(p, q) for p, q in zip(kept.student.head.last_layer.parameters(), frozen_before))
                        and not torch.equal(kept.student.body.weight, body_before))
    for step in range(1, 4):
        _train_step(kept, step, rank)
    student_state = {k: v.clone() for k, v in kept.student.state_dict().items()}
    kept.save_optimizer_state(ckpt, rank)
    dist.barrier()
    norm_kept = _train_step(kept, 4, rank)

    restored = _engine(stage, seed=1)  # other initial weights: everything must come from the checkpoint
    restored.student.load_state_dict(student_state)
    restored.load_optimizer_state(ckpt, rank)
    norm_restored = _train_step(restored, 4, rank)
    same = all(torch.equal(a, b) for a, b in zip(kept.student.parameters(), restored.student.parameters()))
    results[rank] = {"same_params": same, "norms": (norm_kept, norm_restored), "frozen_unchanged": frozen_unchanged}
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_partitions_restore_exactly_without_pickle(tmp_path, stage):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), stage, results), nprocs=WORLD)
    for rank in range(WORLD):
        assert results[rank]["same_params"], rank
        assert results[rank]["norms"][0] == pytest.approx(results[rank]["norms"][1], rel=0, abs=0)
        assert results[rank]["frozen_unchanged"]
    names = sorted(p.name for p in (tmp_path / "zero").iterdir())
    assert names == ["rank_00000.json", "rank_00000.safetensors", "rank_00001.json", "rank_00001.safetensors"]
    layout = json.loads((tmp_path / "zero" / "rank_00001.json").read_text())
    assert layout["world_size"] == WORLD and layout["zero_stage"] == stage
    tensors = load_file(tmp_path / "zero" / "rank_00000.safetensors")
    # Each rank holds about half of each group; AdamW has taken 4 steps.
    assert [tensors[f"group{i}.fp32"].numel() for i in range(len(layout["partition_numel"]))] == layout["partition_numel"]
    assert float(tensors["group0.step"]) == 4


def test_deepspeed_config_comes_from_the_typed_config():
    cfg = load_config(SMOKE_CONFIG, ["train.engine=deepspeed", "train.zero_stage=1", "optim.accumulate_steps=3",
                                     "optim.clip_grad=1.5"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.optim.batch_size_per_worker == 4
    assert ds["train_batch_size"] == 4 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"] == {"stage": 1}
    assert ds["bf16"] == {"enabled": False}  # CPU run
    assert "optimizer" not in ds  # a torch AdamW is passed in
    gpu = load_config(SMOKE_CONFIG, ["train.engine=deepspeed", "train.use_gpu=true"])
    assert deepspeed_config(gpu, 1)["bf16"] == {"enabled": True}
    assert deepspeed_config(load_config(SMOKE_CONFIG, ["train.use_gpu=true", "train.mixed_precision=fp32"]),
                            1)["bf16"] == {"enabled": False}

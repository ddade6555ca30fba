"""MFU: peak FLOP/s per device (known GPUs, a config override, none on CPU) and the utilisation arithmetic."""

import pytest
import torch

from cellfm.train.telemetry import model_flops_utilisation, peak_flops_per_s


def test_no_peak_and_so_no_mfu_on_cpu():
    assert peak_flops_per_s(torch.device("cpu")) is None
    assert peak_flops_per_s(torch.device("cpu"), override_tflops=100.0) is None


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("Tesla V100-SXM2-16GB", None),
])
def test_peak_from_the_gpu_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = peak_flops_per_s(torch.device("cuda", 0))
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    # train.peak_tflops overrides the table (and covers GPUs not in it).
    assert peak_flops_per_s(torch.device("cuda", 0), override_tflops=123.0) == pytest.approx(123e12)


def test_mfu_is_achieved_over_combined_peak():
    # 10 GFLOPs per image at 1000 images/s on 2 devices of 10 TFLOP/s each: 1e13 / 2e13.
    assert model_flops_utilisation(10e9, 1000.0, 2, 10e12) == pytest.approx(0.5)


class _Clock:
    """A perf_counter that advances only when told: waits and steps of known length, no sleeping."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_training_telemetry_times_data_waits_and_averages_losses_per_step(monkeypatch):
    import cellfm.train.telemetry as telemetry_module
    from cellfm.config import Config
    from cellfm.train.self_distillation import StepLosses

    clock = _Clock()
    monkeypatch.setattr(telemetry_module.time, "perf_counter", clock)
    cfg = Config()
    cfg.optim.batch_size_per_worker, cfg.optim.accumulate_steps = 4, 2
    lines: list[str] = []
    telemetry = telemetry_module.TrainingTelemetry(cfg, rank=0, world_size=2, device=torch.device("cpu"),
                                                   steps_per_epoch=1, first_step=0, tensorboard_dir=None,
                                                   log=lines.append)
    assert lines == ["MFU not reported: no known peak FLOP/s for cpu (set train.peak_tflops on a GPU)"]

    def batches():  # each batch arrives 0.5 s after it is asked for
        for _ in range(2):
            clock.now += 0.5
            yield "batch"

    telemetry.start_epoch()
    schedules = type("Schedules", (), {"lr": [1e-3], "wd": [0.04], "teacher_temp": [0.04], "momentum": [0.99]})()
    for micro, _ in enumerate(telemetry.timed(batches())):
        if micro == 0:
            telemetry.start_step()
        with telemetry.counting_flops():  # no peak on CPU: nothing counted
            clock.now += 1.5  # the micro-batch's work
        values = telemetry.micro_batch(StepLosses(torch.tensor(2.0 + micro), {"dino": torch.tensor(1.0 + micro)}),
                                       epoch=0, step=0)
    telemetry.optimizer_step(epoch=0, step=0, values=values, grad_norm=1.0, schedules=schedules)
    metrics = telemetry.epoch_metrics(epoch=0, step=1)
    # One step of 2 micro-batches: losses averaged over the accumulation (2, 3 -> 2.5); 2 x 0.5 s of a 4 s
    # epoch spent waiting; one step of 4 images x 2 micro-batches x 2 workers in 4 s.
    assert metrics == {"loss": 2.5, "dino": 1.5, "epoch": 0, "step": 1, "images_per_s": 4.0,
                       "data_wait_fraction": 0.25, "mfu": None}
    assert telemetry.flops_per_image is None
    assert lines[-1].startswith("epoch 1/") and "data wait 25%" in lines[-1]
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 3 step 7"):
        telemetry.micro_batch(StepLosses(torch.tensor(float("nan")), {}), epoch=3, step=7)

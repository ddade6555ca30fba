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

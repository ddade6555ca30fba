"""Training telemetry: model FLOPs utilisation (MFU) on GPUs and rank 0's TensorBoard events, which on an
s3:// run are written locally and uploaded into the run directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from cellfm.train import storage

# Dense bf16 tensor-core peak per GPU (TFLOP/s, no sparsity), from NVIDIA's data sheets. Matched as a
# substring of torch.cuda.get_device_name(); the first match wins, so specific variants come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
)


def peak_flops_per_s(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of one training device: `override_tflops` (train.peak_tflops) when > 0, else from
    the GPU's name. None on CPU and on GPUs not in the table: MFU is then not reported."""
    if device.type != "cuda":
        return None
    if override_tflops > 0:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def model_flops_utilisation(flops_per_image: float, images_per_s: float, n_devices: int, peak_per_device: float) -> float:
    """Achieved training FLOP/s (all devices) over their combined peak."""
    return flops_per_image * images_per_s / (n_devices * peak_per_device)


class RunEvents:
    """Rank 0's TensorBoard writer. `target` is a local folder, or an s3:// URI: events then go to a local
    temporary folder and `flush()` uploads them (whole files; a resumed run adds a new events file)."""

    def __init__(self, target: str, storage_options: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._target, self._storage_options = target, storage_options
        self._local = Path(tempfile.mkdtemp(prefix="cellfm-tensorboard-")) if storage.is_remote(target) else Path(target)
        self.writer = SummaryWriter(str(self._local))

    def flush(self) -> None:
        self.writer.flush()
        if storage.is_remote(self._target):
            storage.upload_directory(self._local, self._target, self._storage_options)

    def close(self) -> None:
        self.writer.close()
        if storage.is_remote(self._target):
            storage.upload_directory(self._local, self._target, self._storage_options)
            shutil.rmtree(self._local, ignore_errors=True)

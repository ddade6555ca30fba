"""Training telemetry: what the training loop measures besides the step (`TrainingTelemetry`: data wait,
images/s, model FLOPs utilisation (MFU) on GPUs, losses, progress lines) and rank 0's TensorBoard events,
which on an s3:// run are written locally and uploaded into the run directory."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from cellfm import storage

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


class TrainingTelemetry:
    """Everything one rank's training loop measures besides the step itself (DINOv2's MetricLogger role): the
    time spent waiting for batches (`timed`), the FLOPs of one training image counted once where a peak is
    known (`counting_flops`), per-micro-batch losses (checked finite, averaged per optimizer step and epoch),
    rank 0's TensorBoard scalars and progress lines, and each epoch's metrics for `ray.train.report`."""

    def __init__(self, cfg, *, rank: int, world_size: int, device: torch.device, steps_per_epoch: int,
                 first_step: int, tensorboard_dir: str | None, log: Callable[[str], None]):
        from cellfm.train.progress import TrainingProgress

        self.cfg, self.rank, self.world_size, self.log = cfg, rank, world_size, log
        self.batch, self.accumulate = cfg.optim.batch_size_per_worker, cfg.optim.accumulate_steps
        self.images_per_step = self.batch * self.accumulate * world_size
        self.progress = TrainingProgress(cfg.optim.epochs * steps_per_epoch, self.images_per_step, first_step=first_step)
        # MFU only where a peak is known (GPUs); the FLOPs of one training image (student forward + backward
        # over all crops, teacher forward) are counted on the first micro-batch.
        self.peak_flops = peak_flops_per_s(device, cfg.train.peak_tflops)
        self.flops_per_image: float | None = None
        self.events = RunEvents(tensorboard_dir, cfg.data.storage_options) if rank == 0 and tensorboard_dir else None
        if rank == 0 and self.peak_flops is None:
            log(f"MFU not reported: no known peak FLOP/s for {device} (set train.peak_tflops on a GPU)")
        self.start_epoch()

    def start_epoch(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.wait_s = 0, 0.0
        self.epoch_started = self.wait_started = self.step_started = time.perf_counter()

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, adding the time spent waiting for each to the epoch's data wait."""
        iterator = iter(batches)
        while True:
            self.wait_started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - self.wait_started
            yield item

    def start_step(self) -> None:
        """At an optimizer step's first micro-batch: the step's time counts from its wait for data."""
        self.step_started = self.wait_started

    @contextlib.contextmanager
    def counting_flops(self) -> Iterator[None]:
        """Count the FLOPs of the work inside (one micro-batch) once, where MFU can be reported."""
        if self.peak_flops is None or self.flops_per_image is not None:
            yield
            return
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops_per_image = counter.get_total_flops() / self.batch

    def micro_batch(self, losses, *, epoch: int, step: int) -> dict[str, float]:
        """The micro-batch's loss terms as floats, added to the epoch's per-step means; a non-finite loss stops."""
        values = {"loss": losses.total.item(), **{k: v.item() for k, v in losses.terms.items()}}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {step}")
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / self.accumulate
        return values

    def optimizer_step(self, *, epoch: int, step: int, values: dict[str, float], grad_norm, schedules) -> None:
        """After optimizer step `step` (0-based): TensorBoard scalars and, every train.log_every_steps, a line."""
        self.steps += 1
        writer = self.events.writer if self.events is not None else None
        if writer is not None:
            images_per_s = self.images_per_step / max(time.perf_counter() - self.step_started, 1e-9)
            for k, v in values.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            for name, schedule in (("lr", schedules.lr), ("weight_decay", schedules.wd),
                                   ("teacher_temp", schedules.teacher_temp), ("ema_momentum", schedules.momentum)):
                writer.add_scalar(f"schedule/{name}", schedule[step], step)
            writer.add_scalar("perf/images_per_s", images_per_s, step)
            if self.flops_per_image is not None:
                writer.add_scalar("perf/mfu", model_flops_utilisation(self.flops_per_image, images_per_s,
                                                                      self.world_size, self.peak_flops), step)
        if self.rank == 0 and step % self.cfg.train.log_every_steps == 0:
            wait = self.wait_s / max(time.perf_counter() - self.epoch_started, 1e-9)
            self.log(self.progress.line(epoch=epoch, epochs=self.cfg.optim.epochs, step=step + 1, loss=values["loss"],
                                        data_wait_fraction=wait, lr=schedules.lr[step],
                                        teacher_temp=schedules.teacher_temp[step]))

    def epoch_metrics(self, *, epoch: int, step: int) -> dict:
        """The epoch's metrics: mean loss terms per optimizer step, images/s, data-wait fraction and MFU (None,
        not a made-up number, where it cannot be measured)."""
        epoch_s = time.perf_counter() - self.epoch_started
        metrics = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        metrics.update(epoch=epoch, step=step, images_per_s=self.steps * self.images_per_step / max(epoch_s, 1e-9),
                       data_wait_fraction=self.wait_s / max(epoch_s, 1e-9))
        metrics["mfu"] = (None if self.flops_per_image is None else
                          model_flops_utilisation(self.flops_per_image, metrics["images_per_s"], self.world_size,
                                                  self.peak_flops))
        return metrics

    def end_epoch(self, metrics: dict, evaluated: Mapping[str, float] | None = None) -> None:
        """Rank 0's end-of-epoch line and TensorBoard scalars (the epoch evaluator's as `eval/...`)."""
        epoch, step = metrics["epoch"], metrics["step"]
        if self.rank == 0:
            self.log("end of " + self.progress.line(epoch=epoch, epochs=self.cfg.optim.epochs, step=step,
                                                    loss=metrics.get("loss", float("nan")),
                                                    data_wait_fraction=metrics["data_wait_fraction"],
                                                    images_per_s=metrics["images_per_s"]))
        if self.events is not None:
            writer = self.events.writer
            for name, value in (evaluated or {}).items():
                writer.add_scalar(f"eval/{name}", value, step)
            writer.add_scalar("perf/data_wait_fraction", metrics["data_wait_fraction"], step)
            writer.add_scalar("train/epoch_loss", metrics["loss"], step)
            if metrics["mfu"] is not None:
                writer.add_scalar("perf/epoch_mfu", metrics["mfu"], step)
            self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

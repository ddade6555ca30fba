"""The per-worker training loop run by Ray Train: each epoch, this rank's fields of the epoch
(`cellfm.data.pipeline.epoch_shard`, streamed in a fixed order) through the one training step
(`cellfm.train.meta_arch.SSLMetaArch`), an epoch checkpoint through Ray Train, TensorBoard events and a
progress line from rank 0."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cellfm.config import Config
from cellfm.data.pipeline import (DataMonitor, FieldCache, build_field_pipeline, epoch_shard, iter_training_batches,
                                  samples_per_rank)
from cellfm.seeding import Stream, derive_seed
from cellfm.train.meta_arch import SSLMetaArch
from cellfm.train.progress import TrainingProgress
from cellfm.train.self_distillation import supcon_label
from cellfm.train.telemetry import RunEvents, model_flops_utilisation, peak_flops_per_s


def log_progress(message: str) -> None:
    """One line to the worker's stdout (forwarded to the driver). Not `print`: Ray Train V2
    patches print inside workers to also log, so every line would show up twice."""
    sys.stdout.write(f"[cellfm] {message}\n")
    sys.stdout.flush()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.data.context import DataContext

    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    manifest = ray.get(loop_config["manifest"])
    monitor: DataMonitor | None = loop_config["monitor"]
    cache: FieldCache | None = loop_config.get("cache")  # data.cache_fields: every epoch's fields from memory
    tensorboard_dir: str | None = loop_config.get("tensorboard_dir")
    epoch_evaluator = loop_config.get("epoch_evaluator")  # e.g. a sweep's objective (cellfm.tune.objective)
    torch.set_num_threads(cfg.train.torch_threads)
    device = ray.train.torch.get_device()
    # Bit-identical reruns on CPU (same config, seed and worker count): no op may pick a nondeterministic
    # kernel. (CUDA has no deterministic kernel for some ops we use; GPU runs are reproducible only closely.)
    torch.use_deterministic_algorithms(device.type == "cpu")
    # ...but without filling every new empty tensor with NaN (that mode's default, a debugging aid): nothing
    # reads memory before writing it, and the fill made DeepSpeed's flat buffers ~6x slower on CPU.
    torch.utils.deterministic.fill_uninitialized_memory = False
    # Our own progress lines instead of Ray Data's bars and per-epoch "starting execution" messages.
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch, accumulate = cfg.optim.batch_size_per_worker, cfg.optim.accumulate_steps
    # epoch_shard gives every rank len(manifest) // world fields (with data.crop_mode=cells, at least
    # samples_per_rank cells) and batches drop the remainder, so every rank runs the same number of steps (a
    # rank with one step more would hang DDP).
    samples = samples_per_rank(manifest, cfg.data, seed=cfg.train.seed, epochs=cfg.optim.epochs, world_size=world)
    steps_per_epoch = samples // batch // accumulate
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(manifest)} training fields ({samples} {cfg.data.crop_mode} samples per worker) over {world} "
            f"workers cannot fill one step of "
            f"optim.batch_size_per_worker={batch} x optim.accumulate_steps={accumulate}; lower them or add plates"
        )
    checkpoint = ray.train.get_checkpoint()
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=rank, world_size=world, device=device,
                            resuming=checkpoint is not None)
    start_epoch, step = 0, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = meta_arch.load(Path(ckpt_dir))
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            log_progress(f"resumed from epoch {state['epoch']} step {step}")

    # MFU only where a peak is known (GPUs); the FLOPs of one training image (student forward + backward
    # over all crops, teacher forward) are counted on the first micro-batch.
    peak_flops = peak_flops_per_s(device, cfg.train.peak_tflops)
    flops_per_image: float | None = None

    events = RunEvents(tensorboard_dir, cfg.data.storage_options) if rank == 0 and tensorboard_dir else None
    writer = events.writer if events is not None else None
    if rank == 0 and peak_flops is None:
        log_progress(f"MFU not reported: no known peak FLOP/s for {device} (set train.peak_tflops on a GPU)")

    progress = TrainingProgress(cfg.optim.epochs * steps_per_epoch, batch * world * accumulate, first_step=step)
    sched = meta_arch.schedules
    label = supcon_label(cfg)
    for epoch in range(start_epoch, cfg.optim.epochs):
        # This rank's fields of the epoch in a fixed order, each with its seeded channel order (data.pipeline).
        shard = epoch_shard(manifest, cfg.data, seed=cfg.train.seed, epoch=epoch, rank=rank, world_size=world)
        stream = build_field_pipeline(shard, cfg.data, training=True, keep_columns=[label] if label else [],
                                      seed=cfg.train.seed, epoch=epoch, monitor=monitor, cache=cache).dataset
        shuffle_seed = derive_seed(cfg.train.seed, Stream.SHUFFLE_BUFFER, epoch, rank)
        sums: dict[str, float] = {}
        n_steps, micro, wait_s, epoch_t0 = 0, 0, 0.0, time.perf_counter()
        t_wait = time.perf_counter()
        for fields in iter_training_batches(stream, cfg.data, batch, device, label_column=label,
                                            shuffle_seed=shuffle_seed):
            t_step = time.perf_counter()
            wait_s += t_step - t_wait
            if n_steps == steps_per_epoch:
                t_wait = time.perf_counter()
                continue  # remainder micro-batches that cannot fill an accumulation step
            if micro == 0:
                step_started = t_wait  # the step's first wait for data counts toward its time
            count_flops = peak_flops is not None and flops_per_image is None
            flop_counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
            with flop_counter:
                losses = meta_arch.forward_backward(fields, epoch=epoch, step=step, micro=micro)
            if count_flops:
                flops_per_image = flop_counter.get_total_flops() / batch
            values = {"loss": losses.total.item(), **{k: v.item() for k, v in losses.terms.items()}}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {step}")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / accumulate
            micro += 1
            if micro < accumulate:
                t_wait = time.perf_counter()
                continue
            micro = 0
            grad_norm = meta_arch.optimizer_step(step)

            step_s = time.perf_counter() - step_started
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("schedule/lr", sched.lr[step], step)
                writer.add_scalar("schedule/weight_decay", sched.wd[step], step)
                writer.add_scalar("schedule/teacher_temp", sched.teacher_temp[step], step)
                writer.add_scalar("schedule/ema_momentum", sched.momentum[step], step)
                images_per_s = accumulate * batch * world / max(step_s, 1e-9)
                writer.add_scalar("perf/images_per_s", images_per_s, step)
                if flops_per_image is not None:
                    writer.add_scalar("perf/mfu", model_flops_utilisation(flops_per_image, images_per_s, world,
                                                                          peak_flops), step)
            if rank == 0 and step % cfg.train.log_every_steps == 0:
                log_progress(progress.line(epoch=epoch, epochs=cfg.optim.epochs, step=step + 1, loss=values["loss"],
                                           data_wait_fraction=wait_s / max(time.perf_counter() - epoch_t0, 1e-9),
                                           lr=sched.lr[step], teacher_temp=sched.teacher_temp[step]))
            step += 1
            n_steps += 1
            t_wait = time.perf_counter()

        epoch_s = time.perf_counter() - epoch_t0
        metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch, step=step, images_per_s=n_steps * accumulate * batch * world / max(epoch_s, 1e-9),
                       data_wait_fraction=wait_s / max(epoch_s, 1e-9))
        # None (not a made-up number) where MFU cannot be measured.
        metrics["mfu"] = (None if flops_per_image is None else
                          model_flops_utilisation(flops_per_image, metrics["images_per_s"], world, peak_flops))
        # A sweep's objective: rank 0 scores the teacher (Ray Tune forwards rank 0's metrics only).
        if epoch_evaluator is not None and rank == 0:
            evaluated = epoch_evaluator(meta_arch.teacher.backbone)
            metrics.update(evaluated)
            if writer is not None:
                for name, value in evaluated.items():
                    writer.add_scalar(f"eval/{name}", value, step)
        if rank == 0:
            log_progress("end of " + progress.line(epoch=epoch, epochs=cfg.optim.epochs, step=step, loss=metrics.get("loss", float("nan")),
                                                   data_wait_fraction=metrics["data_wait_fraction"],
                                                   images_per_s=metrics["images_per_s"]))
        if events is not None:
            writer.add_scalar("perf/data_wait_fraction", metrics["data_wait_fraction"], step)
            writer.add_scalar("train/epoch_loss", metrics["loss"], step)
            if metrics["mfu"] is not None:
                writer.add_scalar("perf/epoch_mfu", metrics["mfu"], step)
            events.flush()
        # Every rank writes its part (if any) into a folder of the same name; Ray Train merges them.
        with tempfile.TemporaryDirectory() as tmp:
            meta_arch.save(Path(tmp), epoch=epoch, step=step)
            part = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
            ray.train.report(metrics, checkpoint=part, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")
    if events is not None:
        events.close()

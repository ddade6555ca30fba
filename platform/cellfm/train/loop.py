"""The per-worker training loop run by Ray Train: DINO self-distillation with DINOv2 schedules on the
configured engine (DDP or DeepSpeed ZeRO, cellfm.train.engines), EMA teacher, batched multi-crop on the
worker's device, an epoch checkpoint through Ray Train, TensorBoard events and a progress line from rank 0."""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cellfm.config import Config
from cellfm.data.pipeline import iter_training_batches
from cellfm.ssl.ema import update_ema
from cellfm.ssl.multicrop import MultiCrop
from cellfm.ssl.schedules import cosine_schedule
from cellfm.train.checkpoint import load_training_checkpoint, save_training_checkpoint
from cellfm.train.engines import build_engine
from cellfm.train.param_groups import parameter_groups
from cellfm.train.progress import TrainingProgress
from cellfm.train.self_distillation import build_objective, build_student_teacher, supcon_label
from cellfm.train.telemetry import RunEvents, model_flops_utilisation, peak_flops_per_s


def log_progress(message: str) -> None:
    """One line to the worker's stdout (forwarded to the driver). Not `print`: Ray Train V2
    patches print inside workers to also log, so every line would show up twice."""
    sys.stdout.write(f"[cellfm] {message}\n")
    sys.stdout.flush()


class Schedules:
    """Per-step values of every scheduled hyperparameter (DINOv2 recipe)."""

    def __init__(self, cfg: Config, steps_per_epoch: int, global_batch: int):
        o, s = cfg.optim, cfg.ssl
        total = o.epochs * steps_per_epoch
        peak_lr = o.base_lr * math.sqrt(global_batch / 1024)
        self.lr = cosine_schedule(peak_lr, o.min_lr, total, warmup_steps=o.warmup_epochs * steps_per_epoch)
        self.wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
        self.momentum = cosine_schedule(s.ema_momentum_start, s.ema_momentum_end, total)
        warm = min(s.warmup_teacher_temp_epochs * steps_per_epoch, total)
        self.teacher_temp = np.concatenate(
            [np.linspace(s.warmup_teacher_temp, s.teacher_temp, warm), np.full(total - warm, s.teacher_temp)]
        )
        self.last_layer_frozen_steps = s.freeze_last_layer_epochs * steps_per_epoch


def build_multicrop(cfg: Config) -> MultiCrop:
    s = cfg.ssl
    return MultiCrop(
        s.global_crop_size, s.local_crop_size, s.n_local_crops, global_scale=tuple(s.global_crop_scale),
        local_scale=tuple(s.local_crop_scale), intensity_jitter=s.intensity_jitter, flip=s.flip, rot90=s.rot90,
        blur_probability=s.blur_probability, blur_sigma=tuple(s.blur_sigma),
    )


def set_step_hyperparameters(param_groups: list[dict], sched: Schedules, step: int) -> None:
    """The scheduled lr (times each group's `lr_scale`) and weight decay (where it applies) of `step`."""
    for group in param_groups:
        group["lr"] = float(sched.lr[step]) * group["lr_scale"]
        if group["apply_wd"]:
            group["weight_decay"] = float(sched.wd[step])


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    n_fields: int = loop_config["n_train_fields"]
    tensorboard_dir: str | None = loop_config.get("tensorboard_dir")
    epoch_evaluator = loop_config.get("epoch_evaluator")  # e.g. a sweep's objective (cellfm.tune.objective)
    torch.set_num_threads(cfg.train.torch_threads)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch, accumulate = cfg.optim.batch_size_per_worker, cfg.optim.accumulate_steps
    # Streaming split is equal across workers and batches drop the remainder, so every rank
    # runs the same number of steps (a rank with one step more would hang DDP).
    steps_per_epoch = (n_fields // world) // batch // accumulate
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_fields} training fields over {world} workers cannot fill one step of "
            f"optim.batch_size_per_worker={batch} x optim.accumulate_steps={accumulate}; lower them or add plates"
        )
    sched = Schedules(cfg, steps_per_epoch, batch * world * accumulate)

    # Same seed on every rank for initialization (the teacher is a copy of the student, and DDP
    # only broadcasts the student), then a per-rank seed for augmentation.
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    objective = build_objective(cfg)
    device = ray.train.torch.get_device()
    engine = build_engine(cfg, student, parameter_groups(student, cfg.optim.layerwise_decay,
                                                         cfg.optim.patch_embed_lr_mult), world)
    teacher.to(device)
    objective.to(device)
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_checkpoint(Path(ckpt_dir), teacher=teacher, dino_loss=objective.dino_loss,
                                             engine=engine, rank=rank)
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            log_progress(f"resumed from epoch {state['epoch']} step {step}")

    generator = torch.Generator(device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.train.mixed_precision == "bf16")
    multicrop = build_multicrop(cfg)
    # MFU only where a peak is known (GPUs); the FLOPs of one training image (student forward + backward
    # over all crops, teacher forward) are counted on the first micro-batch.
    peak_flops = peak_flops_per_s(device, cfg.train.peak_tflops)
    flops_per_image: float | None = None

    events = RunEvents(tensorboard_dir, cfg.data.storage_options) if rank == 0 and tensorboard_dir else None
    writer = events.writer if events is not None else None
    if rank == 0 and peak_flops is None:
        log_progress(f"MFU not reported: no known peak FLOP/s for {device} (set train.peak_tflops on a GPU)")

    shard = ray.train.get_dataset_shard("train")
    progress = TrainingProgress(cfg.optim.epochs * steps_per_epoch, batch * world * accumulate, first_step=step)
    for epoch in range(start_epoch, cfg.optim.epochs):
        # Augmentation randomness is a pure function of (seed, rank, epoch): a resumed run replays it.
        generator.manual_seed(cfg.train.seed * 1_000_003 + epoch * 1009 + rank)
        sums: dict[str, float] = {}
        n_steps, micro, wait_s, epoch_t0 = 0, 0, 0.0, time.perf_counter()
        t_wait = time.perf_counter()
        for fields in iter_training_batches(shard, cfg.data, batch, device, label_column=supcon_label(cfg)):
            t_step = time.perf_counter()
            wait_s += t_step - t_wait
            if n_steps == steps_per_epoch:
                t_wait = time.perf_counter()
                continue  # remainder micro-batches that cannot fill an accumulation step
            last_micro = micro == accumulate - 1
            if micro == 0:
                step_started = t_wait  # the step's first wait for data counts toward its time
                set_step_hyperparameters(engine.param_groups, sched, step)
            global_crops, local_crops = multicrop(fields.images, generator=generator, channel_mask=fields.channel_mask)
            frozen = step < sched.last_layer_frozen_steps
            count_flops = peak_flops is not None and flops_per_image is None
            flop_counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
            with engine.micro_batch(last=last_micro, freeze_last_layer=frozen), flop_counter:
                with autocast:
                    losses = objective(engine.model, teacher, global_crops, local_crops, float(sched.teacher_temp[step]),
                                       channel_names=fields.channel_names, channel_mask=fields.channel_mask,
                                       labels=fields.labels)
                engine.backward(losses.total)
            if count_flops:
                flops_per_image = flop_counter.get_total_flops() / batch
            values = {"loss": losses.total.item(), **{k: v.item() for k, v in losses.terms.items()}}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {step}")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / accumulate
            micro += 1
            if not last_micro:
                t_wait = time.perf_counter()
                continue
            micro = 0

            # DINO: keeping the prototypes (of every head) fixed at first stabilizes early training.
            grad_norm = engine.step(freeze_last_layer=frozen)
            update_ema(teacher, engine.student, float(sched.momentum[step]))

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
        # --- epoch evaluator hook (issue 16): rank 0 scores the teacher; Ray Tune forwards rank 0's metrics.
        if epoch_evaluator is not None and rank == 0:
            evaluated = epoch_evaluator(teacher.backbone)
            metrics.update(evaluated)
            if writer is not None:
                for name, value in evaluated.items():
                    writer.add_scalar(f"eval/{name}", value, step)
        # --- end of the epoch evaluator hook
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
            save_training_checkpoint(Path(tmp), cfg=cfg, student=engine.student, teacher=teacher,
                                     dino_loss=objective.dino_loss, engine=engine, rank=rank, epoch=epoch, step=step)
            part = ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None
            ray.train.report(metrics, checkpoint=part, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")
    if events is not None:
        events.close()

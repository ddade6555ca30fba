"""The per-worker training loop run by Ray Train: DINO self-distillation with DINOv2 schedules,
EMA teacher, batched multi-crop on the worker's device, an epoch checkpoint through Ray Train,
TensorBoard events and a progress line from rank 0."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellfm.config import Config
from cellfm.ssl.ema import update_ema
from cellfm.ssl.multicrop import MultiCrop
from cellfm.ssl.schedules import cosine_schedule
from cellfm.train.checkpoint import load_training_checkpoint, save_training_checkpoint
from cellfm.train.self_distillation import DinoObjective, build_student_teacher

# Parameters that get no weight decay besides biases and norm weights (all 1-D).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "register_tokens")


def log_progress(message: str) -> None:
    """One line to the worker's stdout (forwarded to the driver). Not `print`: Ray Train V2
    patches print inside workers to also log, so every line would show up twice."""
    sys.stdout.write(f"[cellfm] {message}\n")
    sys.stdout.flush()


def parameter_groups(model: nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(n in name for n in _NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_config["config"], source="train_loop_config")
    n_fields: int = loop_config["n_train_fields"]
    tensorboard_dir: str | None = loop_config.get("tensorboard_dir")
    torch.set_num_threads(cfg.train.torch_threads)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch = cfg.optim.batch_size_per_worker
    # Streaming split is equal across workers and batches drop the remainder, so every rank
    # runs the same number of steps (a rank with one step more would hang DDP).
    steps_per_epoch = (n_fields // world) // batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_fields} training fields over {world} workers cannot fill one batch of "
            f"optim.batch_size_per_worker={batch}; lower the batch size or add plates"
        )
    sched = Schedules(cfg, steps_per_epoch, batch * world)

    # Same seed on every rank for initialization (the teacher is a copy of the student, and DDP
    # only broadcasts the student), then a per-rank seed for augmentation.
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    objective = DinoObjective(cfg)
    optimizer = torch.optim.AdamW(parameter_groups(student), lr=0.0, betas=(0.9, 0.999))
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_checkpoint(Path(ckpt_dir), student=student, teacher=teacher,
                                             dino_loss=objective.dino_loss, optimizer=optimizer)
        start_epoch, step = state["epoch"] + 1, state["step"]
        if rank == 0:
            log_progress(f"resumed from epoch {state['epoch']} step {step}")

    device = ray.train.torch.get_device()
    student_ddp = ray.train.torch.prepare_model(student)
    teacher.to(device)
    objective.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank + 7919 * start_epoch)
    multicrop = MultiCrop(
        cfg.ssl.global_crop_size, cfg.ssl.local_crop_size, cfg.ssl.n_local_crops,
        global_scale=tuple(cfg.ssl.global_crop_scale), local_scale=tuple(cfg.ssl.local_crop_scale),
        intensity_jitter=cfg.ssl.intensity_jitter,
    )

    writer = None
    if rank == 0 and tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tensorboard_dir)

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.optim.epochs):
        sums = {"loss": 0.0, "dino_global": 0.0, "dino_local": 0.0, "kl_uniform": 0.0}
        n_steps, wait_s, epoch_t0 = 0, 0.0, time.perf_counter()
        batches = shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=cfg.data.shuffle_buffer or None)
        t_wait = time.perf_counter()
        for data in batches:
            t_step = time.perf_counter()
            wait_s += t_step - t_wait
            for group in optimizer.param_groups:
                group["lr"] = float(sched.lr[step])
                if group["apply_wd"]:
                    group["weight_decay"] = float(sched.wd[step])
            images = torch.from_numpy(data["image"]).to(device=device, dtype=torch.float32)
            global_crops, local_crops = multicrop(images, generator=generator)
            losses = objective(student_ddp, teacher, global_crops, local_crops, float(sched.teacher_temp[step]))

            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.clip_grad)
            if step < sched.last_layer_frozen_steps:
                # DINO: keeping the prototypes fixed at first stabilizes early training.
                for p in student.head.last_layer.parameters():
                    p.grad = None
            optimizer.step()
            update_ema(teacher, student, float(sched.momentum[step]))

            values = {"loss": losses.total.item(), "dino_global": losses.dino_global.item(),
                      "dino_local": losses.dino_local.item(), "kl_uniform": losses.kl_uniform.item()}
            for k, v in values.items():
                sums[k] += v
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at epoch {epoch} step {step}")
            step_s = time.perf_counter() - t_step
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("schedule/lr", sched.lr[step], step)
                writer.add_scalar("schedule/weight_decay", sched.wd[step], step)
                writer.add_scalar("schedule/teacher_temp", sched.teacher_temp[step], step)
                writer.add_scalar("schedule/ema_momentum", sched.momentum[step], step)
                writer.add_scalar("perf/images_per_s", batch * world / max(step_s + (t_step - t_wait), 1e-9), step)
            if rank == 0 and step % cfg.train.log_every_steps == 0:
                log_progress(f"epoch {epoch + 1}/{cfg.optim.epochs} step {step + 1}/{cfg.optim.epochs * steps_per_epoch} "
                             f"loss {values['loss']:.4f} lr {sched.lr[step]:.2e} teacher_temp {sched.teacher_temp[step]:.3f}")
            step += 1
            n_steps += 1
            t_wait = time.perf_counter()

        epoch_s = time.perf_counter() - epoch_t0
        metrics = {k: v / max(n_steps, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch, step=step, images_per_s=n_steps * batch * world / max(epoch_s, 1e-9),
                       data_wait_fraction=wait_s / max(epoch_s, 1e-9))
        if writer is not None:
            writer.add_scalar("perf/data_wait_fraction", metrics["data_wait_fraction"], step)
            writer.add_scalar("train/epoch_loss", metrics["loss"], step)
            writer.flush()
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_training_checkpoint(Path(tmp), cfg=cfg, student=student, teacher=teacher,
                                         dino_loss=objective.dino_loss, optimizer=optimizer, epoch=epoch, step=step)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()

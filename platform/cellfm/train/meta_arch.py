"""The one owner of the training step, as DINOv2's SSLMetaArch: student and EMA teacher (backbone + heads),
the objective's losses, the multi-crop, the student's channel sampling (MCD, hierarchical or diverse channel
sampling), the iBOT block masks or MAE token masks, the engine (DDP or DeepSpeed ZeRO) with its optimizer, and
the schedules.
The Ray Train loop (`cellfm.train.loop`) and every benchmark that trains call this step; nothing else
computes a training loss.

    meta_arch = SSLMetaArch(cfg, steps_per_epoch=..., rank=..., world_size=..., device=...)
    for each optimizer step `step` of epoch `epoch`, for micro in range(optim.accumulate_steps):
        losses = meta_arch.forward_backward(batch, epoch=epoch, step=step, micro=micro)   # FieldBatch
    grad_norm = meta_arch.optimizer_step(step)

Padding: a batch's `channel_mask` (True = real channel) reaches the teacher as is and the student combined
with its channel sampling, so a padded channel is never seen by either; every draw is made per real channel,
so a padded batch trains exactly as the unpadded one.

Determinism: every draw of a micro-batch (crops, flips, rotations, blur, jitter, iBOT / MAE masks, MCD / HCS /
DCS) comes from generators seeded by (train.seed, epoch, rank, step, micro) (`cellfm.seeding`), and the weights
are initialized from train.seed alone (or loaded from `train.init_from`): a rerun, or a run resumed from a
checkpoint, draws the same numbers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cellfm.config import Config, ConfigError, student_channel_sampling
from cellfm.data.batch import FieldBatch
from cellfm.seeding import Stream, torch_generator
from cellfm.ssl.channel_sampling import diverse_channel_mask, hierarchical_channel_mask
from cellfm.ssl.ema import update_ema
from cellfm.ssl.masking import BlockMaskGenerator
from cellfm.ssl.mcd import MCDSampler, context_channel_mask
from cellfm.ssl.multicrop import MultiCrop
from cellfm.ssl.schedules import cosine_schedule
from cellfm.ssl.token_masking import random_token_mask
from cellfm.train.checkpoint import load_initial_weights, load_training_checkpoint, save_training_checkpoint
from cellfm.train.engines import TrainingEngine, build_engine
from cellfm.train.init_from import resolve_init_from
from cellfm.train.param_groups import parameter_groups
from cellfm.train.self_distillation import StepLosses, StepViews, build_objective, build_student_teacher


class Schedules:
    """Per-step values of every scheduled hyperparameter (DINOv2 recipe)."""

    def __init__(self, cfg: Config, steps_per_epoch: int, global_batch: int):
        o, s = cfg.optim, cfg.ssl
        total = o.epochs * steps_per_epoch
        peak_lr = o.base_lr * math.sqrt(global_batch / 1024)
        self.lr = cosine_schedule(peak_lr, o.min_lr, total, warmup_steps=o.warmup_epochs * steps_per_epoch)
        self.wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
        # MAE has no teacher: its "teacher" copies the student (momentum 0), so the inference weights are the encoder.
        self.momentum = np.zeros(total) if s.objective == "mae" else \
            cosine_schedule(s.ema_momentum_start, s.ema_momentum_end, total)
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


def check_training_config(cfg: Config) -> None:
    """What the step needs of a config beyond `cellfm.config.validate`, once the driver has filled
    `model.channel_groups` from the manifest: call it before Ray starts."""
    if cfg.ssl.mcd and not cfg.model.channel_groups:
        raise ConfigError("ssl.mcd=true needs model.channel_groups (channel name -> context | concept)")


class SSLMetaArch:
    """Student, teacher, losses, augmentation and optimizer of one training worker; see the module doc.

    rank / world_size: this worker's place in the run (1 worker outside Ray). prepare_model wraps the
    student for DDP (default: Ray Train's `prepare_model`; the identity for one process outside Ray).
    With `train.init_from` the student, teacher (with heads) and centers start as that checkpoint's, before the
    engine builds its (fresh) optimizer, unless `resuming` (a checkpoint of this run will be `load`ed)."""

    def __init__(self, cfg: Config, *, steps_per_epoch: int, rank: int, world_size: int, device: torch.device,
                 prepare_model: Callable[[nn.Module], nn.Module] | None = None, resuming: bool = False):

        check_training_config(cfg)
        self.cfg = cfg
        self.rank = rank
        self.device = torch.device(device)
        self.accumulate_steps = cfg.optim.accumulate_steps
        self.schedules = Schedules(cfg, steps_per_epoch,
                                   cfg.optim.batch_size_per_worker * world_size * cfg.optim.accumulate_steps)
        # Same seed on every rank: the teacher starts as a copy of the student, and DDP broadcasts only the student.
        torch.manual_seed(cfg.train.seed)
        self.student, self.teacher = build_student_teacher(cfg)
        self.objective = build_objective(cfg)
        if cfg.train.init_from and not resuming:
            options = cfg.data.storage_options or None
            load_initial_weights(resolve_init_from(cfg.train.init_from, options), student=self.student,
                                 teacher=self.teacher, dino_loss=self.objective.dino_loss, storage_options=options)
        if cfg.train.compile:
            self.student.backbone.compile(dynamic=False)  # crop sizes are few: one graph each
            self.teacher.backbone.compile(dynamic=False)
        groups = parameter_groups(self.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.engine: TrainingEngine = build_engine(cfg, self.student, groups, world_size, prepare_model)
        self.teacher.to(self.device)
        self.objective.to(self.device)
        self.multicrop = build_multicrop(cfg)
        self.patch_masking: BlockMaskGenerator | None = None
        if cfg.ssl.objective == "ibot":
            grid = cfg.ssl.global_crop_size // cfg.model.patch_size
            self.patch_masking = BlockMaskGenerator(grid, tuple(cfg.ssl.mask_ratio_min_max),
                                                    cfg.ssl.mask_sample_probability)
        self.token_masking = cfg.ssl.objective == "mae"
        self.channel_sampling = "mcd" if cfg.ssl.mcd else student_channel_sampling(cfg)
        self.mcd = MCDSampler(cfg.ssl.mcd_keep_counts) if cfg.ssl.mcd else None
        self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                       enabled=self.device.type == "cuda" and cfg.train.mixed_precision == "bf16")

    # ------------------------------------------------------------------------------------- one step

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.schedules.last_layer_frozen_steps

    def student_channels(self, batch: FieldBatch, generator: torch.Generator) -> torch.Tensor | None:
        """(B, C) bool: the real channels the student sees, after MCD, hierarchical or diverse channel sampling
        (a padded channel never), or the batch's padding mask (None: nothing padded) without sampling. DCS
        compares the student's current channel embeddings."""
        if self.channel_sampling == "none":
            return batch.channel_mask
        real = batch.real_channels
        if self.channel_sampling == "hcs":
            return hierarchical_channel_mask(real, generator)
        if self.channel_sampling == "dcs":
            with torch.no_grad():
                embeddings = self.engine.student.backbone.channel_embeddings(batch.channel_names, real)
            return diverse_channel_mask(real, embeddings, self.cfg.ssl.dcs_temperature, generator)
        is_context = context_channel_mask(batch.channel_names, self.cfg.model.channel_groups, real, real.device)
        return self.mcd(is_context, real, generator)

    def views(self, batch: FieldBatch, *, epoch: int, step: int, micro: int) -> StepViews:
        """Everything random about a micro-batch, from generators seeded by (seed, epoch, rank, step, micro):
        multi-crop views, the student's channels and the iBOT patch masks or MAE token masks."""
        position = (epoch, self.rank, step, micro)
        seed = self.cfg.train.seed
        crops = torch_generator(seed, Stream.CROPS, *position, device=batch.images.device)
        global_crops, local_crops = self.multicrop(batch.images, generator=crops, channel_mask=batch.channel_mask)
        student_channels = self.student_channels(batch, torch_generator(seed, Stream.CHANNEL_SAMPLING, *position))
        patch_mask = None
        if self.patch_masking is not None:
            n_global, batch_size = global_crops.shape[:2]
            masks = self.patch_masking(n_global * batch_size,
                                       generator=torch_generator(seed, Stream.PATCH_MASKS, *position))
            patch_mask = masks.to(batch.images.device).view(n_global, batch_size, -1)
        token_mask = None
        if self.token_masking:
            n_global, batch_size, channels = global_crops.shape[:3]
            grid = self.cfg.ssl.global_crop_size // self.cfg.model.patch_size
            real = batch.real_channels if student_channels is None else student_channels
            token_mask = random_token_mask(real.repeat(n_global, 1), grid * grid, self.cfg.ssl.mae_mask_ratio,
                                           generator=torch_generator(seed, Stream.PATCH_MASKS, *position))
            token_mask = token_mask.view(n_global, batch_size, channels, grid * grid)
        return StepViews(global_crops=global_crops, local_crops=local_crops, channel_names=batch.channel_names,
                         teacher_channels=batch.channel_mask, student_channels=student_channels,
                         patch_mask=patch_mask, labels=batch.labels, token_mask=token_mask)

    def forward(self, batch: FieldBatch, *, epoch: int, step: int, micro: int) -> StepLosses:
        """The micro-batch's losses (no backward). Adds the term `student_channels_seen` (mean real channels
        the student saw per sample) when channels are sampled."""
        views = self.views(batch, epoch=epoch, step=step, micro=micro)
        with self.autocast:
            losses = self.objective(self.engine.model, self.teacher, views, float(self.schedules.teacher_temp[step]))
        if self.channel_sampling != "none":
            losses.terms["student_channels_seen"] = views.student_channels.float().sum(dim=1).mean()
        return losses

    def forward_backward(self, batch: FieldBatch, *, epoch: int, step: int, micro: int) -> StepLosses:
        """forward, then the engine's backward (gradients all-reduced on the step's last micro-batch only)."""
        if not 0 <= micro < self.accumulate_steps:
            raise ValueError(f"micro-batch {micro} is not one of optim.accumulate_steps={self.accumulate_steps}")
        if not 0 <= step < len(self.schedules.lr):
            raise ValueError(f"step {step} is outside the run's {len(self.schedules.lr)} steps (optim.epochs)")
        last = micro == self.accumulate_steps - 1
        with self.engine.micro_batch(last=last, freeze_last_layer=self.last_layer_frozen(step)):
            losses = self.forward(batch, epoch=epoch, step=step, micro=micro)
            self.engine.backward(losses.total)
        return losses

    def optimizer_step(self, step: int) -> float:
        """After the step's last micro-batch: the scheduled lr and weight decay, the engine's clipped AdamW
        step (the heads' prototypes held still while frozen: DINO's stabilizer), the EMA teacher update.
        Returns the gradient norm before clipping."""
        for group in self.engine.param_groups:
            group["lr"] = float(self.schedules.lr[step]) * group["lr_scale"]
            if group["apply_wd"]:
                group["weight_decay"] = float(self.schedules.wd[step])
        grad_norm = self.engine.step(freeze_last_layer=self.last_layer_frozen(step))
        update_ema(self.teacher, self.engine.student, float(self.schedules.momentum[step]))
        return grad_norm

    # ------------------------------------------------------------------------------------- checkpoints

    def save(self, directory: Path, *, epoch: int, step: int) -> None:
        """This rank's part of the checkpoint after `epoch` (global step `step` done)."""
        save_training_checkpoint(directory, cfg=self.cfg, student=self.engine.student, teacher=self.teacher,
                                 dino_loss=self.objective.dino_loss, engine=self.engine, rank=self.rank,
                                 epoch=epoch, step=step)

    def load(self, directory: Path) -> dict:
        """Restore student, teacher, centers and optimizer state; returns {"epoch", "step"}. Nothing else
        carries over between steps: every draw is seeded from its position."""
        return load_training_checkpoint(directory, teacher=self.teacher, dino_loss=self.objective.dino_loss,
                                        engine=self.engine, rank=self.rank)

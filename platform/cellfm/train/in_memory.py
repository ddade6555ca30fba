"""Single-process training on fields held in memory: the training step of every run (`SSLMetaArch`) without
Ray, DDP or a data stream. For benchmarks that compare models on one budget (benchmarks/model_quality.py)
and for the plain-loop baseline that Ray Train's throughput is measured against
(benchmarks/train_throughput.py).

    fields = load_normalized_fields(manifest, cfg.data)          # (N, C, H, W) float32 in [0, 1]
    meta_arch = train_in_memory(cfg, fields, channel_names, on_step=...)

One process, one batch of `optim.batch_size_per_worker` fields per optimizer step (world size 1, so the
schedules see that global batch). Each epoch draws the field order and, with `data.channel_permutation`,
every field's channel order (as the pipeline does) from (train.seed, epoch, field): a rerun is bit-identical."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, ConfigError, DataConfig
from cellfm.data.cells import CELLS_X, CELLS_Y, crop_cells
from cellfm.data.normalize import normalize_field
from cellfm.data.batch import FieldBatch
from cellfm.data.plate import read_field
from cellfm.seeding import Stream, numpy_rng, torch_generator
from cellfm.train.meta_arch import SSLMetaArch
from cellfm.train.self_distillation import StepLosses

# Called after every optimizer step with (epoch, step, the step's losses).
StepCallback = Callable[[int, int, StepLosses], None]


def load_normalized_fields(manifest: pd.DataFrame, data: DataConfig) -> torch.Tensor:
    """(N, C, H, W) float32: every field of the manifest (one channel count and size), normalized as the
    pipeline does (`data.normalization` and its parameters), in manifest order and channel order."""
    counts = {len(names) for names in manifest["channel_names"]}
    sizes = set(zip(manifest["height"], manifest["width"]))
    if len(counts) != 1 or len(sizes) != 1:
        raise ValueError(f"fields held in memory must share one channel count and size, got {sorted(counts)} "
                         f"channels and sizes {sorted(sizes)}")
    return torch.from_numpy(np.stack([
        normalize_field(read_field(r.store_uri, r.row, r.col, r.field)[0], data.normalization,
                        clip_low=data.clip_low, clip_high=data.clip_high, clahe_clip_limit=data.clahe_clip_limit,
                        clahe_tiles=data.clahe_tiles, dtype=np.float32)
        for r in manifest.itertuples()]))


def cell_crops(fields: torch.Tensor, manifest: pd.DataFrame, size: int) -> torch.Tensor:
    """(M, C, size, size) float32: the crops around every cell centre of the manifest's fields (its
    `cellfm.data.cells.with_cell_locations` columns), fields in manifest order then cells in table order, cut
    from `fields` (the manifest's normalized fields, as `load_normalized_fields` gives them) as the pipeline
    cuts them (`cellfm.data.cells.crop_cells`)."""
    crops = [crop_cells(field.numpy(), ys, xs, size) for field, ys, xs in zip(fields, manifest[CELLS_Y], manifest[CELLS_X])]
    return torch.from_numpy(np.concatenate(crops))


def epoch_batches(cfg: Config, fields: torch.Tensor, channel_names: list[str], epoch: int,
                  max_steps: int | None = None) -> list[FieldBatch]:
    """The epoch's batches: fields in a seeded order, the last incomplete batch dropped, each field's channels
    permuted (with `data.channel_permutation`) by a draw from (seed, epoch, field index); at most `max_steps`
    of them (the first of the seeded order: each epoch then sees another draw of the samples)."""
    batch_size = cfg.optim.batch_size_per_worker
    order = torch.randperm(len(fields), generator=torch_generator(cfg.train.seed, Stream.FIELD_ORDER, epoch))
    stop = len(fields) - batch_size + 1 if max_steps is None else min(len(fields) - batch_size + 1, max_steps * batch_size)
    batches = []
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size].tolist()
        if cfg.data.channel_permutation:
            perms = [numpy_rng(cfg.train.seed, Stream.CHANNEL_PERMUTATION, epoch, i).permutation(len(channel_names))
                     for i in index]
        else:
            perms = [np.arange(len(channel_names))] * len(index)
        images = torch.stack([fields[i][torch.from_numpy(p)] for i, p in zip(index, perms)])
        batches.append(FieldBatch(images, [[channel_names[j] for j in p] for p in perms]))
    return batches


def train_in_memory(cfg: Config, fields: torch.Tensor, channel_names: list[str], *,
                    on_step: StepCallback | None = None, steps_per_epoch: int | None = None) -> SSLMetaArch:
    """`optim.epochs` epochs of `len(fields) // optim.batch_size_per_worker` optimizer steps on one process,
    or of `steps_per_epoch` (at most that) to give more samples (e.g. cell crops) the schedule and budget of
    fewer; returns the trained SSLMetaArch (its `teacher.backbone` is what evaluation embeds with)."""
    if cfg.optim.accumulate_steps != 1:
        raise ConfigError(f"in-memory training takes one batch per step; optim.accumulate_steps="
                          f"{cfg.optim.accumulate_steps} is not supported")
    available = len(fields) // cfg.optim.batch_size_per_worker
    steps_per_epoch = available if steps_per_epoch is None else min(steps_per_epoch, available)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(fields)} fields are fewer than one batch of {cfg.optim.batch_size_per_worker}")
    meta_arch = SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=0, world_size=1, device=torch.device("cpu"),
                            prepare_model=lambda model: model)
    step = 0
    for epoch in range(cfg.optim.epochs):
        for batch in epoch_batches(cfg, fields, channel_names, epoch, steps_per_epoch):
            losses = meta_arch.forward_backward(batch, epoch=epoch, step=step, micro=0)
            meta_arch.optimizer_step(step)
            if on_step is not None:
                on_step(epoch, step, losses)
            step += 1
    return meta_arch

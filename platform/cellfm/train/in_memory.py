"""Single-process training on fields held in memory: the training step of every run (`SSLMetaArch`) without
Ray, DDP or a data stream. For benchmarks that compare models on one budget (benchmarks/model_quality.py)
and for the plain-loop baseline that Ray Train's throughput is measured against
(benchmarks/train_throughput.py).

    fields = load_normalized_fields(manifest, cfg.data)          # (N, C, H, W) float32 in [0, 1]
    meta_arch = train_in_memory(cfg, fields, channel_names, on_step=...)

One process, one batch of `optim.batch_size_per_worker` fields per optimizer step (world size 1, so the
schedules see that global batch). Each epoch draws the field order and, with `data.channel_permutation`,
every field's channel order (as the pipeline does) from (train.seed, epoch, field): a rerun is bit-identical.

Several channel configurations train together (pre-training on a mix of configurations) as the pipeline's
``data.mixed_channels=pad`` stream does: `pad_field_sets` zero-pads every set to the largest channel count,
padding named ``""``; each field's real channels are permuted, its padding stays last, and the batch
carries the channel mask.

    fields, names = pad_field_sets([(cp5_fields, cp5_names), (hpa4_fields, hpa4_names)])
    meta_arch = train_in_memory(cfg, fields, names)                  # names: one list per field"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from cellfm.config import Config, ConfigError, DataConfig
from cellfm.data.cells import CELLS_X, CELLS_Y, crop_cells
from cellfm.data.normalize import normalize_field
from cellfm.data.pipeline.layout import PAD_CHANNEL_NAME
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


# Channel names of the fields held in memory: one list for every field, or one list per field (padding "").
ChannelNames = list[str] | list[list[str]]


def pad_field_sets(sets: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[list[str]]]:
    """Fields of several channel configurations (each set (N_i, C_i, H, W) with its channel names) as one
    (sum N_i, max C_i, H, W) tensor, every set zero-padded to the largest channel count, and each field's
    channel names with ``""`` for padding: the input of `train_in_memory` for a mix of configurations."""
    sizes = {tuple(fields.shape[2:]) for fields, _ in sets}
    if len(sizes) != 1:
        raise ValueError(f"field sets must share one field size, got {sorted(sizes)}")
    for fields, names in sets:
        if fields.shape[1] != len(names) or PAD_CHANNEL_NAME in names:
            raise ValueError(f"a set of {fields.shape[1]}-channel fields has channel names {names}")
    channels = max(fields.shape[1] for fields, _ in sets)
    names = [[*set_names, *[PAD_CHANNEL_NAME] * (channels - len(set_names))]
             for fields, set_names in sets for _ in range(len(fields))]
    if len(sets) == 1:  # nothing to pad or join: no copy of the fields
        return sets[0][0], names
    padded = torch.cat([torch.nn.functional.pad(fields, (0, 0, 0, 0, 0, channels - fields.shape[1])) for fields, _ in sets])
    return padded, names


def _per_field_names(fields: torch.Tensor, channel_names: ChannelNames) -> list[list[str]]:
    if all(isinstance(name, str) for name in channel_names):
        channel_names = [list(channel_names)] * len(fields)
    if len(channel_names) != len(fields) or any(len(names) != fields.shape[1] for names in channel_names):
        raise ValueError(f"channel_names must be one list of {fields.shape[1]} names or one such list per field "
                         f"({len(fields)})")
    return channel_names


def epoch_batches(cfg: Config, fields: torch.Tensor, channel_names: ChannelNames, epoch: int,
                  max_steps: int | None = None) -> list[FieldBatch]:
    """The epoch's batches: fields in a seeded order, the last incomplete batch dropped, each field's real
    channels permuted (with `data.channel_permutation`) by a draw from (seed, epoch, field index), its padding
    (channel name "") kept last and masked; at most `max_steps` of them (the first of the seeded order: each
    epoch then sees another draw of the samples)."""
    names_per_field = _per_field_names(fields, channel_names)
    batch_size = cfg.optim.batch_size_per_worker
    order = torch.randperm(len(fields), generator=torch_generator(cfg.train.seed, Stream.FIELD_ORDER, epoch))
    stop = len(fields) - batch_size + 1 if max_steps is None else min(len(fields) - batch_size + 1, max_steps * batch_size)
    batches = []
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size].tolist()
        perms = []
        for i in index:
            n_real = sum(1 for name in names_per_field[i] if name != PAD_CHANNEL_NAME)
            real = (numpy_rng(cfg.train.seed, Stream.CHANNEL_PERMUTATION, epoch, i).permutation(n_real)
                    if cfg.data.channel_permutation else np.arange(n_real))
            perms.append(np.concatenate([real, np.arange(n_real, fields.shape[1])]))
        images = torch.stack([fields[i][torch.from_numpy(p)] for i, p in zip(index, perms)])
        names = [[names_per_field[i][j] for j in p] for i, p in zip(index, perms)]
        mask = torch.tensor([[name != PAD_CHANNEL_NAME for name in row] for row in names])
        batches.append(FieldBatch(images, names, None if bool(mask.all()) else mask))
    return batches


def train_in_memory(cfg: Config, fields: torch.Tensor, channel_names: ChannelNames, *,
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

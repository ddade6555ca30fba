"""The consumer side of a field stream: a rank's stream as ``FieldBatch``es of exactly one batch size (with
``data.mixed_channels=group``, regrouped by channel count), images as float32 tensors."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from cellfm.config import DataConfig
from cellfm.data.batch import FieldBatch
from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR

def to_float_images(images: np.ndarray):
    """A batch's ``image`` column as a float32 torch tensor ([0, 1] for uint8 transfers)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).mul_(1.0 / 255.0)
    return tensor.to(torch.float32)


def iter_training_batches(stream, cfg: DataConfig, batch_size: int, device, label_column: str = "",
                          shuffle_seed: int | None = None) -> Iterator[FieldBatch]:
    """One epoch of a rank's field stream (a Ray Dataset or DataIterator) as FieldBatches of exactly
    `batch_size` samples, floor(samples / batch_size) of them, so every rank runs the same number of steps.
    `label_column`: a manifest column carried by the dataset (keep_columns) to hand out as per-sample
    labels. `shuffle_seed`: the seed of the local shuffle buffer (`data.shuffle_buffer`); with a stream in
    a fixed order, the batches are then the same in every rerun.

    ``data.mixed_channels=pad``: the remainder is dropped. ``group``: each batch holds fields of one
    channel count (no padding; ``channel_mask`` None); an epoch's leftovers of each count (fewer than
    a batch) top up to full batches with repeats of that count's own fields, up to the same number
    of batches as ``pad`` (DDP ranks must step together).
    """
    group = cfg.mixed_channels == "group"
    batches = stream.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=not group,
                                  local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=shuffle_seed)
    if group:
        batches = _group_by_channel_count(batches, batch_size)
    for data in batches:
        yield _field_batch(data, device, label_column)


def _field_batch(data: dict[str, np.ndarray], device, label_column: str) -> FieldBatch:
    import torch

    mask = data.get("channel_mask")
    channel_mask = None
    if mask is not None and not mask.all():
        channel_mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).to(device)
    return FieldBatch(
        images=to_float_images(data["image"]).to(device),
        channel_names=[names.split(CHANNEL_SEPARATOR) for names in data["channel_names"]],
        channel_mask=channel_mask,
        labels=[str(v) for v in data[label_column]] if label_column else None,
    )


def _group_by_channel_count(batches: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-batch a stream whose rows have different channel counts into batches of one count.

    Rows of several counts in one incoming batch arrive as an object array of (C, H, W) images
    (Ray's variable-shaped tensors); of one count, as a (N, C, H, W) array.
    """
    pending: dict[int, list[dict[str, Any]]] = {}
    seen = emitted = 0
    for data in batches:
        images = data["image"]
        for i in range(len(images)):
            row = {key: values[i] for key, values in data.items()}
            rows = pending.setdefault(row["image"].shape[0], [])
            rows.append(row)
            seen += 1
            if len(rows) == batch_size:
                yield _stack_rows(rows)
                rows.clear()
                emitted += 1
    # Each count has < batch_size left, so the counts with the most left always suffice.
    for rows in sorted(pending.values(), key=len, reverse=True):
        if emitted >= seen // batch_size or not rows:
            break
        yield _stack_rows([rows[i % len(rows)] for i in range(batch_size)])
        emitted += 1


def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) if key in ("image", "channel_mask")
            else np.asarray([row[key] for row in rows], dtype=object) for key in rows[0]}

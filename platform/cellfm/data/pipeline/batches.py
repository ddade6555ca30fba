"""The consumer side of a field stream: a rank's rows, locally shuffled, as ``FieldBatch``es of exactly one
batch size (with ``data.mixed_channels=group``, regrouped by channel count), images as float32 tensors."""

from __future__ import annotations

import threading
from queue import Full, Queue
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np

from cellfm.config import DataConfig
from cellfm.data.batch import FieldBatch
from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR

T = TypeVar("T")

def to_float_images(images: np.ndarray):
    """A batch's ``image`` column as a float32 torch tensor ([0, 1] for uint8 transfers)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).mul_(1.0 / 255.0)
    return tensor.to(torch.float32)


def iter_training_batches(blocks: Iterable[dict[str, np.ndarray]], cfg: DataConfig, batch_size: int, device,
                          label_column: str = "", shuffle_seed: int | None = None) -> Iterator[FieldBatch]:
    """One epoch of a rank's field rows (``training_epoch_blocks``: blocks of numpy columns in a fixed order)
    as FieldBatches of exactly `batch_size` samples, floor(samples / batch_size) of them, so every rank runs
    the same number of steps. `label_column`: a manifest column carried by the stream (keep_columns) to hand
    out as per-sample labels. `shuffle_seed`: the seed of the local shuffle buffer (`data.shuffle_buffer`
    rows); the batches depend on the rows and their order only, not on how they were cut into blocks, so
    they are the same in every rerun and whichever way the rows were read.

    ``data.mixed_channels=pad``: the remainder is dropped. ``group``: each batch holds fields of one
    channel count (no padding; ``channel_mask`` None); an epoch's leftovers of each count (fewer than
    a batch) top up to full batches with repeats of that count's own fields, up to the same number
    of batches as ``pad`` (DDP ranks must step together).
    """
    rows = _shuffled(_rows(blocks), cfg.shuffle_buffer, np.random.default_rng(shuffle_seed))
    batches = _group_by_channel_count(rows, batch_size) if cfg.mixed_channels == "group" else _batched(rows, batch_size)
    for data in batches:
        yield _field_batch(data, device, label_column)


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` made by a background thread up to ``depth`` ahead of the consumer, in the same order: the
    next batch is assembled (rows stacked, converted, copied to the device) while the training step computes.
    An exception in the producer is raised to the consumer at that item; a consumer that stops early stops
    the producer (at its next item)."""
    if depth < 1:
        yield from items
        return
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(entry: tuple) -> bool:
        """Queue ``entry`` unless the consumer has stopped; whether it was queued."""
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer((end, exc))

    producer = threading.Thread(target=produce, name="cellfm-batch-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def _rows(blocks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
    """The rows of a stream of blocks. A block holding rows of several channel counts has an object array
    of (C, H, W) images (Ray's variable-shaped tensors); of one count, an (N, C, H, W) array."""
    for block in blocks:
        for i in range(len(block["image"])):
            yield {key: values[i] for key, values in block.items()}


def _shuffled(rows: Iterator[dict[str, Any]], buffer_size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A local shuffle: rows enter a buffer in order and, once it holds more than `buffer_size`, leave
    it at random (a draw per row), so a row moves at most about `buffer_size` places; 0 keeps the order."""
    buffer: list[dict[str, Any]] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) > buffer_size:
            yield _take_random(buffer, rng)
    while buffer:
        yield _take_random(buffer, rng)


def _take_random(buffer: list, rng: np.random.Generator):
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def _batched(rows: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Full batches of `batch_size` rows; the remainder is dropped."""
    pending: list[dict[str, Any]] = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch_size:
            yield _stack_rows(pending)
            pending = []


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


def _group_by_channel_count(rows: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of rows of one channel count each (see iter_training_batches)."""
    pending: dict[int, list[dict[str, Any]]] = {}
    seen = emitted = 0
    for row in rows:
        same_count = pending.setdefault(row["image"].shape[0], [])
        same_count.append(row)
        seen += 1
        if len(same_count) == batch_size:
            yield _stack_rows(same_count)
            same_count.clear()
            emitted += 1
    # Each count has < batch_size left, so the counts with the most left always suffice.
    for same_count in sorted(pending.values(), key=len, reverse=True):
        if emitted >= seen // batch_size or not same_count:
            break
        yield _stack_rows([same_count[i % len(same_count)] for i in range(batch_size)])
        emitted += 1


def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) if key in ("image", "channel_mask")
            else np.asarray([row[key] for row in rows], dtype=object) for key in rows[0]}

"""iter_training_batches: a rank's rows, locally shuffled, into batches of one size. The batches are a
function of the rows, their order and the seed only, not of how the rows were cut into blocks (a Ray Data
stream's blocks or the cached path's read blocks)."""

import time

import numpy as np
import pytest

from cellfm.config import DataConfig
from cellfm.data.pipeline.batches import iter_training_batches, prefetched
from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR

N_ROWS = 23


def _blocks(cuts: list[int], channels=lambda i: 2) -> list[dict[str, np.ndarray]]:
    """Rows 0..N_ROWS-1 cut into blocks at `cuts`; row i's image is filled with i (float16, as streamed)."""
    edges = [0, *cuts, N_ROWS]
    blocks = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        images = [np.full((channels(i), 3, 3), i, dtype=np.float16) for i in range(lo, hi)]
        same_count = len({image.shape[0] for image in images}) == 1
        blocks.append({
            "image": np.stack(images) if same_count else np.array(images + [None], dtype=object)[:-1],
            "channel_mask": np.ones((hi - lo, 2), dtype=bool),
            "channel_names": np.array([CHANNEL_SEPARATOR.join("AB"[:channels(i)]) for i in range(lo, hi)], dtype=object),
            "well": np.array([f"w{i}" for i in range(lo, hi)], dtype=object),
        })
    return blocks


def _row_ids(batches) -> list[list[int]]:
    return [[int(image[0, 0, 0]) for image in batch.images] for batch in batches]


def test_batches_depend_on_rows_order_and_seed_not_on_blocks():
    cfg = DataConfig(shuffle_buffer=5)
    one_block = _row_ids(iter_training_batches(_blocks([]), cfg, 4, "cpu", shuffle_seed=7))
    for cuts in ([1, 2, 3], [4, 8, 12, 16, 20], [11]):
        assert _row_ids(iter_training_batches(_blocks(cuts), cfg, 4, "cpu", shuffle_seed=7)) == one_block
    assert one_block != _row_ids(iter_training_batches(_blocks([]), cfg, 4, "cpu", shuffle_seed=8))
    ids = [i for batch in one_block for i in batch]
    assert len(one_block) == N_ROWS // 4 and len(set(ids)) == len(ids) == 20  # full batches, no repeats
    assert ids != sorted(ids)
    # The buffer holds 5 rows and takes one more before each draw: the k-th row out is one of the first k + 6 in.
    assert all(row <= k + 5 for k, row in enumerate(ids))


def test_a_zero_buffer_keeps_the_order_and_labels_travel_with_their_rows():
    batches = list(iter_training_batches(_blocks([5, 9]), DataConfig(shuffle_buffer=0), 4, "cpu",
                                         label_column="well", shuffle_seed=1))
    assert _row_ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert [b.labels for b in batches][1] == ["w4", "w5", "w6", "w7"]
    assert batches[0].channel_names[0] == ["A", "B"] and batches[0].channel_mask is None


@pytest.mark.parametrize("cuts", [[], [3, 10, 17]])
def test_group_mode_batches_one_channel_count_each_whatever_the_blocks(cuts):
    counts = lambda i: 1 + i % 2  # noqa: E731 - rows alternate 1 and 2 channels, mixed inside blocks
    cfg = DataConfig(shuffle_buffer=0, mixed_channels="group")
    batches = list(iter_training_batches(_blocks(cuts, counts), cfg, 4, "cpu", shuffle_seed=0))
    assert len(batches) == N_ROWS // 4
    for batch in batches:
        assert len({counts(i) for i in _row_ids([batch])[0]}) == 1
    # 12 one-channel and 11 two-channel rows: 3 + 2 full batches, as many as 23 rows give in pad mode.
    assert sorted(batch.images.shape[1] for batch in batches) == [1, 1, 1, 2, 2]


def test_prefetched_keeps_the_order_and_runs_ahead_of_the_consumer():
    made: list[int] = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    stream = prefetched(items(), depth=2)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(made) < 4 and time.monotonic() < deadline:  # 1 and 2 queued, 3 made and waiting for room
        time.sleep(0.01)
    assert made == [0, 1, 2, 3]
    assert list(stream) == [1, 2, 3, 4, 5]
    assert list(prefetched(items(), depth=0)) == list(range(6))


def test_prefetched_raises_the_producers_error_at_its_place_and_stops_when_the_consumer_does():
    def failing():
        yield 1
        raise ValueError("plate P1 well A01 field 0: unreadable")

    stream = prefetched(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="plate P1 well A01"):
        next(stream)

    made: list[int] = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    stream = prefetched(endless(), depth=1)
    assert next(stream) == 0
    stream.close()  # the consumer stops early (generator closed): so does the producer
    time.sleep(0.5)
    stopped_at = len(made)
    time.sleep(0.3)
    assert len(made) == stopped_at <= 4


def test_cpu_workers_with_several_torch_threads_take_no_prefetch_thread():
    import torch

    from cellfm.config import load_config
    from cellfm.train.loop import prefetch_depth

    cfg = load_config("configs/smoke.yaml", ["data.prefetch_batches=3"])
    assert prefetch_depth(cfg, torch.device("cpu")) == 3  # one torch thread per worker (the default)
    cfg.train.torch_threads = 2
    assert prefetch_depth(cfg, torch.device("cpu")) == 0
    assert prefetch_depth(cfg, torch.device("cuda")) == 3

"""data.cache_fields: the training fields are read once into Ray's object store, and every epoch's stream
taken from there is bit for bit the stream read from the plates (same fields, order, channel permutations,
padding, shuffle), without reading a plate again; read blocks never span plates."""

import dataclasses
import re
import shutil

import pandas as pd
import pytest
import torch

from cellfm.config import ConfigError, DataConfig, load_config
from cellfm.data.pipeline.batches import iter_training_batches
from cellfm.data.pipeline.cache import fill_field_cache
from cellfm.data.pipeline.dataset import epoch_shard, load_manifests, training_epoch_blocks
from cellfm.data.pipeline.layout import read_blocks
from cellfm.data.synthetic.screens import generate_screen
from cellfm.preflight import preflight_problems
from cellfm.train import trainer

SEED, WORKERS, BATCH = 3, 2, 4


def _epoch_batches(manifest: pd.DataFrame, cfg: DataConfig, epoch: int, rank: int, cache=None) -> list:
    shard = epoch_shard(manifest, cfg, seed=SEED, epoch=epoch, rank=rank, world_size=WORKERS)
    blocks = training_epoch_blocks(shard, cfg, seed=SEED, epoch=epoch, cache=cache)
    return list(iter_training_batches(blocks, cfg, BATCH, "cpu", shuffle_seed=100 * epoch + rank))


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["pad", "group"])
def test_cached_epochs_equal_plate_reads_bit_for_bit_without_reading_a_plate(ray_session, tmp_path, mode):
    screen = generate_screen(tmp_path / "screen", layout="tiny", seed=0)  # its own plates: this test deletes them
    # 5-channel training and 4-channel unseen plates: padding (pad) or regrouping (group) is exercised.
    manifest = load_manifests([screen["train"], screen["unseen"]])
    # Two read tasks at a time: still out of order in time, and no more worker processes than 2 cores run.
    cfg = DataConfig(mixed_channels=mode, read_batch_size=3, shuffle_buffer=8, progress_interval_s=0, read_concurrency=2)
    expected = {(epoch, rank): _epoch_batches(manifest, cfg, epoch, rank) for epoch in (0, 1) for rank in range(WORKERS)}

    cache = fill_field_cache(manifest, cfg)
    assert sorted(cache.where) == list(range(len(manifest)))
    for store in {uri.split(".zarr")[0] + ".zarr" for uri in manifest["store_uri"]}:
        assert store.startswith(str(tmp_path))
        shutil.rmtree(store)  # from here on, a read of any plate would fail
    for (epoch, rank), batches in expected.items():
        cached = _epoch_batches(manifest, cfg, epoch, rank, cache=cache)
        assert len(cached) == len(batches) > 0
        for got, want in zip(cached, batches):
            assert torch.equal(got.images, want.images)
            assert got.channel_names == want.channel_names
            assert (got.channel_mask is None) == (want.channel_mask is None)
            if want.channel_mask is not None:
                assert torch.equal(got.channel_mask, want.channel_mask)
    # The permutation is drawn per epoch from the cache's fixed order, not frozen at the filling pass.
    first = {tuple(n) for b in expected[(0, 0)] for n in b.channel_names}
    second = {tuple(n) for b in expected[(1, 0)] for n in b.channel_names}
    assert first != second
    with pytest.raises(Exception, match=r"\.zarr.*cannot open"):
        _epoch_batches(manifest, cfg, 2, 0)  # the plates are gone: only the cache can deliver
    # A field the filling pass could not read (skipped and counted there) is left out of every epoch.
    shard = epoch_shard(manifest, cfg, seed=SEED, epoch=0, rank=0, world_size=WORKERS)
    unread = int(shard.index[1])
    partial = dataclasses.replace(cache, where={i: w for i, w in cache.where.items() if i != unread})
    rows = [len(block["image"]) for block in training_epoch_blocks(shard, cfg, seed=SEED, epoch=0, cache=partial)]
    assert sum(rows) == len(shard) - 1


@pytest.mark.integration
def test_the_cache_fills_inside_a_placement_group_that_captures_its_tasks(ray_session, tiny_screen):
    # A sweep trial's driver runs in a 0.01-CPU placement group that captures child tasks (Tune's); the cache's
    # read tasks (data.read_cpus each) must run outside it, on the CPUs kept free for Ray Data.
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = ray_session
    manifest = load_manifests([tiny_screen["train"]]).head(6)
    cfg = DataConfig(read_batch_size=3, read_cpus=0.5, progress_interval_s=0)
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())

    @ray.remote(num_cpus=0.01)
    def fill() -> list[int]:
        return sorted(fill_field_cache(manifest, cfg).where)

    inside = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    try:
        assert ray.get(fill.options(scheduling_strategy=inside).remote(), timeout=600) == list(range(len(manifest)))
    finally:
        remove_placement_group(group)


def test_read_blocks_never_span_plates():
    plates = ["P1"] * 5 + ["P2"] * 7 + ["P3"] * 2
    table = pd.DataFrame({"plate": plates, "channel_names": [["DNA"]] * len(plates)})
    blocks = read_blocks(table, DataConfig(read_batch_size=4))
    assert [len(b) for b in blocks] == [4, 1, 4, 3, 2]
    assert all(b["plate"].nunique() == 1 for b in blocks)
    assert pd.concat(blocks).index.tolist() == list(range(len(plates)))


def test_a_cache_above_its_limit_is_refused_before_ray_starts(smoke_overrides, monkeypatch):
    def ray_started(*_):
        raise AssertionError("Ray was started before the cache limit was checked")

    # (Ray may already run in this module, so the order is checked at the trainer's one init_ray call.)
    monkeypatch.setattr(trainer, "init_ray", ray_started)
    cfg = load_config("configs/smoke.yaml", smoke_overrides + ["data.cache_fields=true", "data.cache_max_mb=1"])
    refused = r"data.cache_fields: the \d+ training fields .* need \d+ MB .*data.cache_max_mb=1"
    with pytest.raises(ConfigError, match=refused):
        trainer.run_pretraining(cfg)
    # cellfm pretrain's preflight reports it with every other problem, before the trainer is built.
    assert [p for p in preflight_problems(cfg, train=True) if re.match(refused, p)]
    cfg.data.cache_max_mb = 4096
    assert not [p for p in preflight_problems(cfg, train=True) if "cache" in p]

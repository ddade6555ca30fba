"""Single-process training on fields held in memory (cellfm.train.in_memory): fields load exactly as the
pipeline normalizes them, every epoch's batches are a seeded permutation of fields and channels with names
that follow the pixels, and a run through the one training step is a function of its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfm.config import load_config
from cellfm.data.manifest import read_manifest
from cellfm.data.normalize import normalize_field
from cellfm.data.plate import read_field
from cellfm.train.in_memory import epoch_batches, load_normalized_fields, pad_field_sets, train_in_memory
from tests.conftest import SMOKE_CONFIG

CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]


def test_fields_load_as_the_pipeline_normalizes_them(family_screen):
    paths = family_screen("cp5")
    manifest = read_manifest(paths["heldout"])
    cfg = load_config(SMOKE_CONFIG)
    fields = load_normalized_fields(manifest, cfg.data)
    assert fields.shape == (len(manifest), 5, 64, 64) and fields.dtype == torch.float32
    for i in (0, len(manifest) - 1):
        r = manifest.iloc[i]
        expected = normalize_field(read_field(r.store_uri, r.row, r.col, r.field)[0], "percentile")
        np.testing.assert_array_equal(fields[i].numpy(), expected)
    # Percentile normalization clips at the field's own percentiles: every field's every channel spans
    # exactly [0, 1] (a loader that skipped or doubled the normalization would not).
    assert float(fields.amin(dim=(2, 3)).max()) == 0.0 and float(fields.amax(dim=(2, 3)).min()) == 1.0

    mixed = manifest.copy()
    mixed.at[mixed.index[0], "channel_names"] = CP5[:4]
    with pytest.raises(ValueError, match="one channel count"):
        load_normalized_fields(mixed, cfg.data)


def labelled_fields(n: int) -> torch.Tensor:
    """Field i, channel c is the constant 10 * i + c: a batch's pixels say which field and stain they are."""
    values = 10 * torch.arange(n, dtype=torch.float32)[:, None] + torch.arange(len(CP5), dtype=torch.float32)
    return values[:, :, None, None].expand(n, len(CP5), 4, 4).clone()


def test_epoch_batches_permute_fields_and_channels_with_their_names():
    cfg = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=4", "train.seed=3"])
    fields = labelled_fields(10)
    batches = epoch_batches(cfg, fields, CP5, epoch=0)
    assert len(batches) == 2 and all(b.images.shape == (4, 5, 4, 4) for b in batches)  # 10 // 4, rest dropped
    seen, permuted = [], 0
    for batch in batches:
        for image, names in zip(batch.images, batch.channel_names):
            field = int(image[0, 0, 0]) // 10
            seen.append(field)
            # Each plane is the stain its name says, whatever order the channels were drawn in.
            assert [int(image[j, 0, 0]) for j in range(5)] == [10 * field + CP5.index(n) for n in names]
            permuted += names != CP5
    assert len(set(seen)) == 8 and permuted > 0
    again = epoch_batches(cfg, fields, CP5, epoch=0)
    assert all(torch.equal(a.images, b.images) and a.channel_names == b.channel_names for a, b in zip(batches, again))
    assert not torch.equal(epoch_batches(cfg, fields, CP5, epoch=1)[0].images, batches[0].images)

    fixed = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=4", "data.channel_permutation=false"])
    assert all(names == CP5 for b in epoch_batches(fixed, fields, CP5, epoch=0) for names in b.channel_names)


def test_mixed_configurations_pad_and_permute_only_real_channels():
    """Fields of 5, 4 and 1 channels train together: padded to 5 with zero planes named "", each field's real
    channels permuted among themselves, the padding last and masked out."""
    novel4, brightfield = ["Golgi", "Mito", "DNA", "Tubulin"], ["Brightfield"]
    sets = [(labelled_fields(6), CP5), (100 + labelled_fields(6)[:, :4], novel4), (200 + labelled_fields(4)[:, :1], brightfield)]
    fields, names = pad_field_sets(sets)
    assert fields.shape == (16, 5, 4, 4) and names[0] == CP5 and names[6] == [*novel4, ""] and names[15] == ["Brightfield", *[""] * 4]
    assert float(fields[6:12, 4].abs().max()) == 0.0 and float(fields[12:, 1:].abs().max()) == 0.0
    with pytest.raises(ValueError, match="one field size"):
        pad_field_sets([(labelled_fields(2), CP5), (labelled_fields(2)[:, :, :2, :2], CP5)])

    cfg = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=8", "train.seed=1"])
    batches = epoch_batches(cfg, fields, names, epoch=0)
    assert len(batches) == 2
    stain_sets, padded_batches = set(), 0
    for batch in batches:
        padded_batches += batch.channel_mask is not None
        for image, row, mask in zip(batch.images, batch.channel_names, batch.real_channels):
            real = [n for n in row if n]
            stain_sets.add(frozenset(real))
            # The real channels come first (in a drawn order) and the mask says which they are.
            assert row == [*real, *[""] * (5 - len(real))] and mask.tolist() == [bool(n) for n in row]
            assert not image[len(real):].any()
            # Each real plane is the stain its name says: constants 10 * field + stain index (+100, +200 per set).
            base = int(image[0, 0, 0]) - (CP5.index(real[0]) if len(real) == 5 else
                                          novel4.index(real[0]) if len(real) == 4 else 0)
            order = CP5 if len(real) == 5 else novel4 if len(real) == 4 else brightfield
            assert [int(image[j, 0, 0]) for j in range(len(real))] == [base + order.index(n) for n in real]
    assert padded_batches == 2 and stain_sets == {frozenset(CP5), frozenset(novel4), frozenset(brightfield)}
    # One configuration alone: no mask, and the batches equal those from its single list of names.
    alone = epoch_batches(cfg, labelled_fields(16), [CP5] * 16, epoch=0)
    same = epoch_batches(cfg, labelled_fields(16), CP5, epoch=0)
    assert all(a.channel_mask is None and torch.equal(a.images, b.images) and a.channel_names == b.channel_names
               for a, b in zip(alone, same))

    # The training step runs on the mixed stream: a mixed run is a function of its seed.
    def run() -> dict[str, torch.Tensor]:
        train_cfg = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=8", "optim.epochs=1"])
        rand = torch.rand(16, 5, 32, 32, generator=torch.Generator().manual_seed(0))
        mixed, mixed_names = pad_field_sets([(rand[:8], CP5), (rand[8:12, :4], novel4), (rand[12:, :1], brightfield)])
        return train_in_memory(train_cfg, mixed, mixed_names).teacher.backbone.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_runs_every_step_and_is_a_function_of_the_seed():
    fields = torch.rand(12, 5, 32, 32, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> tuple[list[tuple[int, int]], dict[str, torch.Tensor]]:
        cfg = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=4", "optim.epochs=2", f"train.seed={seed}"])
        calls = []
        meta_arch = train_in_memory(cfg, fields, CP5, on_step=lambda epoch, step, losses: calls.append(
            (epoch, step)) if torch.isfinite(losses.total) else None)
        return calls, {k: v.clone() for k, v in meta_arch.teacher.backbone.state_dict().items()}

    calls, weights = run(0)
    assert calls == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    _, rerun = run(0)
    assert all(torch.equal(weights[k], rerun[k]) for k in weights)
    _, other = run(1)
    assert any(not torch.equal(weights[k], other[k]) for k in weights)

    too_many = load_config(SMOKE_CONFIG, ["optim.batch_size_per_worker=16"])
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_in_memory(too_many, fields, CP5)

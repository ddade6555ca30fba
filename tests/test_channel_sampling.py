"""Hierarchical channel sampling (ChannelViT) and the per-real-channel draws behind it, MCD and the
multi-crop jitter: the exact HCS distribution, padding never kept, and padding changing no draw."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from cellfm.ssl.channel_sampling import hierarchical_channel_mask, spread_over_real_channels
from cellfm.ssl.multicrop import MultiCrop


def _subset_counts(keep: torch.Tensor, real: list[int]) -> Counter:
    """How often each subset of the real slots was kept (as a tuple of slot indices)."""
    return Counter(tuple(c for c in real if row[c]) for row in keep.tolist())


def _hcs_expected(n: int) -> dict[tuple[int, ...], float]:
    """HCS: P(S) = P(m = |S|) / C(n, |S|) = 1 / (n * C(n, |S|)) for every non-empty subset S of n channels."""
    return {s: 1 / (n * math.comb(n, len(s))) for m in range(1, n + 1) for s in itertools.combinations(range(n), m)}


@pytest.mark.parametrize("valid_row", [[True] * 5, [True, False, True, True, False, False]],
                         ids=["5 real", "3 real among 6 slots"])
def test_hcs_draws_every_subset_with_its_exact_probability(valid_row):
    """Chi-square of the kept subsets over 40000 samples against P(S) = 1 / (n C(n, |S|)); the same
    statistic rejects a sampler that keeps each channel independently with probability 1/2 (uniform over
    subsets: the right support, the wrong law), so the test can tell them apart."""
    n_samples = 40_000
    valid = torch.tensor([valid_row] * n_samples)
    real = [c for c, v in enumerate(valid_row) if v]
    keep = hierarchical_channel_mask(valid, torch.Generator().manual_seed(0))
    assert not (keep & ~valid).any() and keep.any(dim=1).all()  # padding never kept, >= 1 channel kept
    counts = _subset_counts(keep, real)
    expected = {tuple(real[i] for i in s): p for s, p in _hcs_expected(len(real)).items()}
    assert set(counts) <= set(expected)
    subsets = sorted(expected)
    observed = [counts.get(s, 0) for s in subsets]
    assert chisquare(observed, [n_samples * expected[s] for s in subsets]).pvalue > 1e-3
    # m ~ U{1..n}: each count of kept channels about 1/n of the samples.
    sizes = keep.sum(dim=1).bincount(minlength=len(real) + 1)[1:].float() / n_samples
    assert torch.allclose(sizes, torch.full_like(sizes, 1 / len(real)), atol=0.01)

    bernoulli = torch.rand(n_samples, len(valid_row), generator=torch.Generator().manual_seed(1)) < 0.5
    bernoulli &= valid
    bernoulli_counts = _subset_counts(bernoulli[bernoulli.any(dim=1)], real)
    n_kept = sum(bernoulli_counts.values())
    wrong = [bernoulli_counts.get(s, 0) for s in subsets]
    assert chisquare(wrong, [n_kept * expected[s] for s in subsets]).pvalue < 1e-6


def test_hcs_draws_do_not_depend_on_padding():
    """Same generator state, the same fields unpadded (4 channels) and padded to 7 slots with padding in
    between: the same real channels are kept in every sample."""
    B = 300
    plain = hierarchical_channel_mask(torch.ones(B, 4, dtype=torch.bool), torch.Generator().manual_seed(5))
    slots = [0, 2, 3, 5]  # where the 4 real channels sit among the 7 padded slots
    valid = torch.zeros(B, 7, dtype=torch.bool)
    valid[:, slots] = True
    padded = hierarchical_channel_mask(valid, torch.Generator().manual_seed(5))
    assert torch.equal(padded[:, slots], plain)
    assert not padded[:, [1, 4, 6]].any()


def test_hcs_mixed_counts_and_refuses_a_sample_without_channels():
    valid = torch.tensor([[True] * 5, [True] * 4 + [False], [True] + [False] * 4] * 2000)
    keep = hierarchical_channel_mask(valid, torch.Generator().manual_seed(2))
    assert not (keep & ~valid).any()
    assert keep[2::3, 0].all()  # a 1-channel field always keeps its channel
    for row, n in ((0, 5), (1, 4)):
        sizes = keep[row::3].sum(dim=1).bincount(minlength=n + 1)[1:].float() / 2000
        assert torch.allclose(sizes, torch.full((n,), 1 / n), atol=0.03), (n, sizes)
    with pytest.raises(ValueError, match="no real channel"):
        hierarchical_channel_mask(torch.tensor([[True, True], [False, False]]))


def test_spread_over_real_channels_places_the_jth_draw_on_the_jth_real_channel():
    draws = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    valid = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    assert spread_over_real_channels(draws, valid, fill=-1.0).tolist() == [
        [-1.0, 10.0, 11.0, -1.0, 12.0], [20.0, -1.0, -1.0, -1.0, -1.0]]


@pytest.mark.parametrize("blur", [0.0, 0.5])
def test_multicrop_padded_and_unpadded_fields_give_the_same_views(blur):
    """Same generator seed: a batch padded with garbage-filled masked channels gives, in its real channels,
    the views of the unpadded batch (boxes, flips, blur and per-channel jitter alike), and zeros elsewhere."""
    images = torch.rand(3, 4, 32, 32)
    crop = MultiCrop(16, 8, n_local=2, intensity_jitter=0.3, blur_probability=blur)
    plain_global, plain_local = crop(images, torch.Generator().manual_seed(4))
    padded = torch.cat([images[:, :2], torch.rand(3, 1, 32, 32), images[:, 2:], torch.rand(3, 2, 32, 32)], dim=1)
    valid = torch.tensor([[True, True, False, True, True, False, False]] * 3)
    padded_global, padded_local = crop(padded, torch.Generator().manual_seed(4), channel_mask=valid)
    for plain, views in ((plain_global, padded_global), (plain_local, padded_local)):
        torch.testing.assert_close(views[:, :, [0, 1, 3, 4]], plain, rtol=0, atol=1e-6)
        assert torch.all(views[:, :, [2, 5, 6]] == 0)

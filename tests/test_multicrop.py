"""Batched multi-crop honours the data pipeline's channel padding: padded channels stay exactly zero
in every view and the mask is left as it is."""

import pytest
import torch

from cellfm.ssl.multicrop import MultiCrop


def _padded_batch():
    images = torch.rand(4, 5, 32, 32) + 0.1
    mask = torch.tensor([[True] * 5, [True] * 4 + [False], [True] + [False] * 4, [True] * 3 + [False] * 2])
    images[~mask] = 0
    return images, mask


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_padded_channels_stay_zero_in_every_view(jitter):
    images, mask = _padded_batch()
    original = mask.clone()
    g, loc = MultiCrop(16, 8, n_local=3, intensity_jitter=jitter)(images, torch.Generator().manual_seed(0),
                                                                  channel_mask=mask)
    assert torch.equal(mask, original)
    for views in (g, loc):
        assert torch.all(views[:, ~mask] == 0)
        assert views[:, mask].abs().amax(dim=(-2, -1)).gt(0).all()  # real channels keep content


def test_mask_zeroes_padding_even_if_input_is_not_zero():
    images, mask = _padded_batch()
    images[~mask] = 5.0  # a caller that padded with junk
    g, _ = MultiCrop(16, 8, n_local=0)(images, channel_mask=mask)
    assert torch.all(g[:, ~mask] == 0)


def test_mask_does_not_change_real_channels():
    images, mask = _padded_batch()
    with_mask = MultiCrop(16, 8, n_local=2)(images, torch.Generator().manual_seed(5), channel_mask=mask)
    without = MultiCrop(16, 8, n_local=2)(images, torch.Generator().manual_seed(5))
    for a, b in zip(with_mask, without):
        assert torch.equal(a, b)  # padded inputs are zero, so masking changes nothing


def test_bad_mask_raises():
    images, mask = _padded_batch()
    with pytest.raises(ValueError, match="channel_mask"):
        MultiCrop(16, 8, n_local=0)(images, channel_mask=mask[:, :4])
    with pytest.raises(ValueError, match="channel_mask"):
        MultiCrop(16, 8, n_local=0)(images, channel_mask=mask.float())

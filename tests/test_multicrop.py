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


# ---------------------------------------------------------------- geometry and intensity semantics


def _dihedral(image):
    """The 8 flips/rot90s of a (C, H, W) image."""
    return [torch.rot90(v, k, dims=(-2, -1)) for v in (image, image.flip(-1)) for k in range(4)]


def test_whole_image_views_are_exact_flips_and_rotations_of_every_channel():
    # Box = the whole image at the input size: every view must be one of its 8 dihedral transforms,
    # the same one for all channels (one box and one orientation per view).
    images = torch.rand(3, 4, 24, 24)
    crop = MultiCrop(24, 8, n_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), intensity_jitter=0.0)
    views, _ = crop(images, torch.Generator().manual_seed(1))
    seen = set()
    for v in range(2):
        for b in range(3):
            matches = [k for k, t in enumerate(_dihedral(images[b])) if torch.allclose(views[v, b], t, atol=1e-5)]
            assert len(matches) == 1
            seen.add(matches[0])
    assert len(seen) > 1  # orientations are drawn, not fixed


def test_views_keep_channels_spatially_aligned():
    base = torch.rand(2, 1, 40, 40)
    images = base.expand(2, 5, 40, 40).contiguous()  # five identical channels
    g, loc = MultiCrop(16, 8, n_local=3, intensity_jitter=0.0)(images, torch.Generator().manual_seed(2))
    for views in (g, loc):
        assert torch.equal(views, views[:, :, :1].expand_as(views))


def test_jitter_is_a_gain_then_contrast_around_each_channel_mean():
    images = torch.rand(3, 4, 32, 32) + 0.2
    j = 0.3
    plain, _ = MultiCrop(16, 8, n_local=0, intensity_jitter=0.0)(images, torch.Generator().manual_seed(3))
    jittered, _ = MultiCrop(16, 8, n_local=0, intensity_jitter=j)(images, torch.Generator().manual_seed(3))
    # Same seed, same boxes (drawn before the jitter): per view and channel, jittered = a * plain + b.
    x = plain.flatten(-2)
    y = jittered.flatten(-2)
    x_mean, y_mean = x.mean(-1, keepdim=True), y.mean(-1, keepdim=True)
    a = ((x - x_mean) * (y - y_mean)).sum(-1) / (x - x_mean).pow(2).sum(-1)
    residual = y - (a[..., None] * (x - x_mean) + y_mean)
    assert residual.abs().max() < 1e-4
    assert ((1 - j) ** 2 - 1e-4 <= a).all() and (a <= (1 + j) ** 2 + 1e-4).all()  # gain * contrast
    gain = y_mean / x_mean  # the contrast keeps the mean, so only the gain moves it
    assert ((1 - j - 1e-4 <= gain) & (gain <= 1 + j + 1e-4)).all()
    assert gain.std() > 0.01 and a.std() > 0.01  # drawn per view and channel

"""Batched multi-crop: channel padding (padded channels stay exactly zero, the mask is left as it is),
geometry and intensity semantics, and the resampling against independent references."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from cellfm.ssl import multicrop
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


# ---------------------------------------------------------------- resampling against references


@pytest.fixture(params=["grid_sample", "per_view"])
def resampler(request, monkeypatch):
    """Runs a test with every view resampled by batched grid_sample, then by one F.interpolate per view."""
    monkeypatch.setattr(multicrop, "_PER_VIEW_MIN_SIZE", 1 << 30 if request.param == "grid_sample" else 1)
    return request.param


def _boxes(boxes):
    """_Boxes of ((x, y, w, h), (k quarter turns, x mirror, y mirror)) per view."""
    (x, y, w, h), (k, fx, fy) = (torch.tensor(c).T for c in zip(*boxes))
    return multicrop._Boxes(x, y, w, h, transpose=k % 2 == 1,
                            **multicrop._orientation_flips(k, fx.bool(), fy.bool()))


def _crop_with_boxes(monkeypatch, images, size, boxes):
    """Global views of the given boxes (2 per image, in image-major order), no jitter."""
    crop = MultiCrop(size, 8, n_local=0, intensity_jitter=0.0)
    monkeypatch.setattr(crop, "_draw_boxes", lambda *_: _boxes(boxes))
    views, _ = crop(images)
    return views


def test_boxes_are_cropped_then_resized_as_f_interpolate_does(monkeypatch, resampler):
    # Down- and up-scaling boxes: the view is exactly what cropping the box and resizing it with
    # F.interpolate (bilinear, align_corners=False, no antialiasing) gives, in every channel: up-scaled
    # edges clamp at the box, not at the image border.
    images = torch.rand(4, 4, 40, 48)
    boxes = [((0, 0, 48, 40), (0, 0, 0)), ((5, 3, 20, 17), (0, 0, 0)), ((30, 21, 18, 19), (0, 0, 0)),
             ((11, 8, 33, 16), (0, 0, 0)), ((2, 30, 16, 10), (0, 0, 0)), ((47 - 24, 1, 24, 37), (0, 0, 0)),
             ((20, 12, 5, 7), (0, 0, 0)), ((1, 1, 3, 30), (0, 0, 0))]
    views = _crop_with_boxes(monkeypatch, images, 10, boxes)
    for i, ((x, y, w, h), _) in enumerate(boxes):
        b, v = divmod(i, 2)
        expected = F.interpolate(images[b:b + 1, :, y:y + h, x:x + w], size=(10, 10), mode="bilinear",
                                 align_corners=False)[0]
        assert (views[v, b] - expected).abs().max() < 1e-5


def test_orientations_of_a_box_are_its_eight_dihedral_transforms(monkeypatch, resampler):
    # One box in 16 (quarter turns, x mirror, y mirror) draws: without mirrors, k quarter turns are
    # torch.rot90(k); with them each view is one of the 8 flips/rotations of the upright view (exactly,
    # up to float64 rounding), all 8 occur equally often, and all channels turn together.
    images = torch.rand(1, 3, 40, 48, dtype=torch.float64).expand(8, -1, -1, -1)
    orientations = [(k, fx, fy) for k in range(4) for fx in (0, 1) for fy in (0, 1)]
    views = _crop_with_boxes(monkeypatch, images, 12, [((7, 4, 26, 30), o) for o in orientations])
    upright = _dihedral(views[0, 0])
    counts = [0] * 8
    for i, (k, fx, fy) in enumerate(orientations):
        b, v = divmod(i, 2)
        if not fx and not fy:
            assert (views[v, b] - torch.rot90(views[0, 0], k, dims=(-2, -1))).abs().max() < 1e-12
        matches = [t for t, d in enumerate(upright) if (views[v, b] - d).abs().max() < 1e-12]
        assert len(matches) == 1
        counts[matches[0]] += 1
    assert counts == [2] * 8


def test_both_resamplers_give_the_same_views(monkeypatch):
    # The same draws (boxes, orientations, jitter, padding) through batched grid_sample and through one
    # F.interpolate per view: equal up to float rounding; each is bit-identical for the same seed.
    images, mask = _padded_batch()
    crop = MultiCrop(16, 12, n_local=3, local_scale=(0.05, 0.2), intensity_jitter=0.3)
    results = {}
    for name, min_size in (("grid_sample", 1 << 30), ("per_view", 1)):
        monkeypatch.setattr(multicrop, "_PER_VIEW_MIN_SIZE", min_size)
        results[name] = crop(images, torch.Generator().manual_seed(9), channel_mask=mask)
        again = crop(images, torch.Generator().manual_seed(9), channel_mask=mask)
        assert all(torch.equal(a, b) for a, b in zip(results[name], again))
    for a, b in zip(results["grid_sample"], results["per_view"]):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5
        assert torch.all(b[:, ~mask] == 0)


def test_views_switch_to_per_view_resizing_from_the_size_threshold_on_cpu(monkeypatch):
    # 128-px globals go view by view, 32-px locals through grid_sample.
    crop = MultiCrop(multicrop._PER_VIEW_MIN_SIZE, 32, n_local=2)
    with mock.patch.object(multicrop.F, "interpolate", wraps=F.interpolate) as interpolate, \
            mock.patch.object(multicrop.F, "grid_sample", wraps=F.grid_sample) as grid_sample:
        crop(torch.rand(3, 2, 160, 160), torch.Generator().manual_seed(0))
    assert interpolate.call_count == 3 * 2
    assert grid_sample.call_count >= 1
    assert all(c.args[1].shape[1:3] == (2 * 32, 32) for c in grid_sample.call_args_list)  # locals only


def test_boxes_follow_random_resized_crop_scale_ratio_and_position():
    # Whole-pixel boxes inside the image whose area fraction and aspect ratio span the configured
    # ranges (up to rounding to whole pixels) and whose position is uniform over every valid pixel.
    crop = MultiCrop(16, 8, n_local=0, ratio=(3 / 4, 4 / 3))
    H, W, n = 60, 80, 4000
    boxes = crop._draw_boxes(n, H, W, (0.2, 0.6), torch.Generator().manual_seed(0))
    w, h = boxes.w.double(), boxes.h.double()
    assert boxes.w.dtype == torch.long and (boxes.x0 >= 0).all() and (boxes.x0 + boxes.w <= W).all()
    assert (boxes.y0 >= 0).all() and (boxes.y0 + boxes.h <= H).all()
    area = w * h / (H * W)
    assert 0.19 < area.min() < 0.21 and 0.58 < area.max() < 0.61
    log_ratio = (w / h).log()
    assert -0.33 < log_ratio.min() < -0.25 and 0.25 < log_ratio.max() < 0.33  # log(4/3) = 0.288
    slack = W - boxes.w  # the left column is uniform over 0..slack: its mean fraction is 1/2
    assert abs(float((boxes.x0 / slack.clamp_min(1)).mean()) - 0.5) < 0.02
    assert bool((boxes.x0 == slack).any()) and bool((boxes.x0 == 0).any())
    assert boxes.transpose.float().mean().sub(0.5).abs() < 0.03
    assert boxes.flip_x.float().mean().sub(0.5).abs() < 0.03


def test_block_size_does_not_change_the_views(monkeypatch, resampler):
    # Whole batch in one block vs one image per block, through either resampler.
    images, mask = _padded_batch()
    crop = MultiCrop(16, 8, n_local=3, intensity_jitter=0.3)
    monkeypatch.setattr(multicrop, "_CPU_BLOCK_BYTES_PER_THREAD", 1 << 30)
    whole = crop(images, torch.Generator().manual_seed(6), channel_mask=mask)
    monkeypatch.setattr(multicrop, "_CPU_BLOCK_BYTES_PER_THREAD", 1)
    per_image = crop(images, torch.Generator().manual_seed(6), channel_mask=mask)
    for a, b in zip(whole, per_image):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_is_kept(dtype, resampler):
    g, loc = MultiCrop(16, 8, n_local=2)(torch.rand(2, 3, 32, 32, dtype=dtype), torch.Generator().manual_seed(0))
    assert g.dtype == loc.dtype == dtype
    assert g.shape == (2, 2, 3, 16, 16) and loc.shape == (2, 2, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_kept_and_a_cpu_generator_gives_the_same_views_there():
    images, mask = _padded_batch()
    crop = MultiCrop(16, 8, n_local=3)
    on_cpu = crop(images, torch.Generator().manual_seed(8), channel_mask=mask)
    on_gpu = crop(images.cuda(), torch.Generator().manual_seed(8), channel_mask=mask.cuda())
    for a, b in zip(on_cpu, on_gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=0)


def test_gaussian_blur_views_matches_a_per_view_reference_and_keeps_sharp_views():
    from cellfm.ssl.multicrop import gaussian_blur_views

    torch.manual_seed(0)
    views = torch.rand(2, 3, 4, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, 1.5]], dtype=torch.float64)
    out = gaussian_blur_views(views, sigma)
    radius = 6  # ceil(3 * max sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    for v in range(2):
        for b in range(3):
            if sigma[v, b] == 0:
                assert torch.equal(out[v, b], views[v, b])
                continue
            k1 = torch.exp(-0.5 * (x / sigma[v, b]) ** 2)
            k2 = torch.outer(k1, k1) / k1.sum() ** 2  # the separable kernel as one 2-D kernel
            padded = torch.nn.functional.pad(views[v, b][None], (radius,) * 4, mode="reflect")
            expected = torch.nn.functional.conv2d(padded, k2[None, None].expand(4, 1, -1, -1), groups=4)[0]
            torch.testing.assert_close(out[v, b], expected, rtol=0, atol=1e-12)
    # Blurring keeps each channel's mean roughly (reflect padding) and lowers its variance.
    assert out[0, 2].var() < 0.5 * views[0, 2].var()


def test_multicrop_blur_probability_draws_from_the_generator_and_validates():
    images = torch.rand(4, 3, 32, 32)
    crop = MultiCrop(16, 8, 2, blur_probability=1.0, blur_sigma=(1.0, 1.0), intensity_jitter=0.0)
    sharp = MultiCrop(16, 8, 2, intensity_jitter=0.0)
    g1, l1 = crop(images, generator=torch.Generator().manual_seed(3))
    g2, l2 = crop(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    gs, ls = sharp(images, generator=torch.Generator().manual_seed(3))
    # Same boxes (blur draws come after every box draw), blurred: smoother, same mean.
    assert g1.diff(dim=-1).abs().mean() < 0.6 * gs.diff(dim=-1).abs().mean()
    torch.testing.assert_close(g1.mean(), gs.mean(), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="blur_probability"):
        MultiCrop(16, 8, 2, blur_probability=1.5)

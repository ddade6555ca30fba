"""Per-channel normalizations (percentile clipping, CLAHE, self-standardization): exact where
there is a reference, [0, 1] / z-scored output, safe on constant, all-zero and NaN channels."""

from __future__ import annotations

import numpy as np
import pytest

from cellfm.data.normalize import NORMALIZATIONS, clahe, normalize_field, percentile_clip, standardize


def test_known_percentiles_map_linearly_and_clip():
    # 0..100: the 1st/99th percentiles are exactly 1 and 99.
    ramp = np.arange(101, dtype=np.uint16).reshape(1, 1, 101)
    out = percentile_clip(ramp, 1.0, 99.0)
    expected = np.clip((np.arange(101) - 1.0) / 98.0, 0.0, 1.0)
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
    assert out[0, 0, 0] == 0.0 and out[0, 0, 100] == 1.0


def test_channels_are_normalized_independently():
    base = np.arange(1000, dtype=np.float32).reshape(10, 100)
    image = np.stack([base, 50.0 * base + 7.0])
    out = percentile_clip(image, 5.0, 95.0)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("low, high", [(1.0, 99.0), (0.0, 100.0), (0.3, 99.7), (37.5, 62.5)])
def test_matches_numpy_percentile_reference(dtype, low, high):
    rng = np.random.default_rng(0)
    image = (rng.gamma(2.0, 40.0, (3, 33, 47))).astype(dtype)
    out = percentile_clip(image, low, high)
    p = np.percentile(image.reshape(3, -1).astype(np.float64), [low, high], axis=1)
    expected = np.clip((image - p[0][:, None, None]) / (p[1] - p[0])[:, None, None], 0.0, 1.0)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, expected, atol=2e-6)


@pytest.mark.parametrize("value", [0, 1234])
def test_constant_channel_becomes_zeros(value):
    image = np.stack([np.full((8, 8), value, np.uint16), np.arange(64, dtype=np.uint16).reshape(8, 8)])
    out = percentile_clip(image)
    assert np.all(out[0] == 0.0)
    assert np.isfinite(out).all() and out[1].max() == 1.0


def test_nans_are_ignored_for_percentiles_and_mapped_to_zero():
    channel = np.arange(100, dtype=np.float32).reshape(10, 10)
    with_nan = channel.copy()
    with_nan[0, :5] = np.nan
    with_nan[9, 9] = np.inf
    out = percentile_clip(np.stack([with_nan, np.full((10, 10), np.nan, np.float32)]), 2.0, 98.0)
    assert np.isfinite(out).all()
    assert np.all(out[0, 0, :5] == 0.0) and out[0, 9, 9] == 0.0
    assert np.all(out[1] == 0.0)  # an all-NaN channel
    valid = with_nan[np.isfinite(with_nan)]
    p_low, p_high = np.percentile(valid, [2.0, 98.0])
    expected = np.clip((channel - p_low) / (p_high - p_low), 0.0, 1.0)
    finite = np.isfinite(with_nan)
    np.testing.assert_allclose(out[0][finite], expected[finite], atol=1e-6)


def test_output_range_and_input_untouched():
    image = np.random.default_rng(1).integers(0, 65535, (5, 64, 64)).astype(np.uint16)
    original = image.copy()
    out = percentile_clip(image)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_array_equal(image, original)


@pytest.mark.parametrize("shape, low, high", [((64, 64), 1.0, 99.0), ((1, 8, 8), 99.0, 1.0), ((1, 8, 8), -1.0, 99.0)])
def test_bad_arguments_raise(shape, low, high):
    with pytest.raises(ValueError):
        percentile_clip(np.zeros(shape, np.uint16), low, high)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_percentile_clip_float16_output_matches_float32(dtype):
    image = np.random.default_rng(2).gamma(2.0, 30.0, (3, 40, 50)).astype(dtype)
    half = percentile_clip(image, 0.1, 99.9, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), percentile_clip(image, 0.1, 99.9), atol=1e-3)


# Hand-made channels where an off-by-one in the histogram's order statistics or the interpolation
# between them would show: one pixel, two values, a huge gap, the dtype's extremes, ties, spikes.
_HAND_MADE = {
    "one_pixel": [7],
    "two_values": [0, 65535],
    "gap": [3] * 50 + [60000] * 50,
    "ties_and_spike": [5] * 98 + [9, 65535],
    "ramp_0_99": list(range(100)),
    "mostly_zero": [0] * 997 + [1, 2, 40000],
    "reversed_odd": list(range(300, 0, -3)),
}


@pytest.mark.parametrize("values", list(_HAND_MADE.values()), ids=list(_HAND_MADE))
@pytest.mark.parametrize("low, high", [(1.0, 99.0), (0.1, 99.9), (0.0, 100.0), (25.0, 75.0), (49.0, 51.0)])
def test_histogram_percentiles_equal_numpy_percentile_on_hand_made_channels(values, low, high):
    channel = np.asarray(values, dtype=np.uint16)
    p_low, p_high = np.percentile(channel.astype(np.float64), [low, high])
    out = percentile_clip(channel.reshape(1, 1, -1), low, high)[0, 0]
    if p_high > p_low:
        expected = np.clip((channel - p_low) / (p_high - p_low), 0.0, 1.0)
    else:  # numpy's percentiles coincide: the channel is constant between them -> zeros
        expected = np.zeros(channel.shape)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # uint8 inputs take the same histogram path.
    if channel.max() < 256:
        np.testing.assert_allclose(percentile_clip(channel.astype(np.uint8).reshape(1, 1, -1), low, high)[0, 0],
                                   expected, atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_all_zero_constant_and_nan_channels_side_by_side(dtype):
    ramp = np.arange(64, dtype=np.float64).reshape(8, 8)
    channels = [np.zeros((8, 8)), np.full((8, 8), 200.0), ramp]
    if dtype == "float32":
        channels.append(np.full((8, 8), np.nan))
    image = np.stack(channels).astype(dtype)
    for out_dtype in (np.float32, np.float16, np.uint8):
        out = percentile_clip(image, 1.0, 99.0, dtype=out_dtype)
        assert out.dtype == out_dtype
        assert np.all(out[:2] == 0) and np.all(out[3:] == 0)
        assert out[2].min() == 0 and out[2].max() == (255 if out_dtype == np.uint8 else 1)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_uint8_output_is_the_rounded_float_output(dtype):
    image = np.random.default_rng(3).gamma(2.0, 300.0, (3, 30, 40)).astype(dtype)
    levels = percentile_clip(image, 0.5, 99.5, dtype=np.uint8)
    exact = percentile_clip(image, 0.5, 99.5).astype(np.float64)
    assert levels.dtype == np.uint8
    # Round half up of exact values: at most half a level off (float32 rounding at the .5 ties).
    assert np.abs(levels - exact * 255).max() <= 0.5 + 1e-3


def test_out_is_written_in_place_and_shape_checked():
    image = np.random.default_rng(4).integers(0, 4000, (2, 16, 16)).astype(np.uint16)
    image[1] = 9  # constant: must overwrite stale values in `out` with zeros
    out = np.full((2, 16, 16), 7, np.float16)
    result = normalize_field(image, "percentile", out=out)
    assert result is out
    np.testing.assert_allclose(out.astype(np.float32), percentile_clip(image), atol=1e-3)
    assert np.all(out[1] == 0)
    for method in ("clahe", "standardize"):
        target = np.empty((2, 16, 16), np.float32)
        np.testing.assert_array_equal(normalize_field(image, method, out=target), normalize_field(image, method))
    with pytest.raises(ValueError, match="out has shape"):
        percentile_clip(image, out=np.empty((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize_field(image, "standardize", dtype=np.uint8)


# ---------------------------------------------------------------- CLAHE


def _low_contrast(seed=0, shape=(2, 96, 128)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    ramp = 1000 + 3 * xx + 2 * yy  # a gentle gradient...
    return np.stack([ramp + rng.integers(0, 20, shape[1:]) for _ in range(shape[0])]).astype(np.uint16)


def test_clahe_one_tile_equals_hand_computed_equalization():
    # Values 0..3 (min-max clipped, 4 bins: value v is bin v), 16 pixels of which 10 are 0: counts 10, 2, 2, 2.
    image = np.array([0] * 10 + [1, 1, 2, 2, 3, 3], np.uint16).reshape(1, 4, 4)
    plain = clahe(image, clip_limit=1.0, tiles=1, nbins=4, low=0.0, high=100.0)
    # No clipping: the cumulative histogram over the pixel count, 10/16, 12/16, 14/16, 16/16.
    np.testing.assert_allclose(plain[0], np.array([0.625, 0.75, 0.875, 1.0])[image[0]], rtol=1e-6)
    # Clip at 25% of 16 pixels = 4: bin 0 gives its excess 6 spread evenly (1.5 each): 5.5, 3.5, 3.5, 3.5.
    limited = clahe(image, clip_limit=0.25, tiles=1, nbins=4, low=0.0, high=100.0)
    np.testing.assert_allclose(limited[0], np.array([5.5, 9.0, 12.5, 16.0])[image[0]] / 16, rtol=1e-6)
    assert limited.dtype == np.float32 and clahe(image, dtype=np.float16).dtype == np.float16


def test_clahe_one_tile_unclipped_is_histogram_equalization_of_the_percentile_bins():
    image = _low_contrast()
    out = clahe(image, clip_limit=1.0, tiles=1)
    assert out.shape == image.shape and out.dtype == np.float32
    for c in range(image.shape[0]):
        p_low, p_high = np.percentile(image[c].astype(np.float64), [1.0, 99.0])
        bins = np.floor(np.clip((image[c] - p_low) / (p_high - p_low), 0, 1) * 255 + 0.5).astype(int)
        cdf = np.cumsum(np.bincount(bins.ravel(), minlength=256)) / bins.size
        np.testing.assert_allclose(out[c], cdf[bins], rtol=1e-6)


def test_clahe_equalizes_locally():
    # A bright half and a dark half, each with faint texture: after CLAHE both halves use the range.
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 300, (1, 64, 128))
    image = (texture + np.where(np.arange(128) < 64, 100, 3000)[None, None, :]).astype(np.uint16)
    out = clahe(image, clip_limit=0.05, tiles=4)[0]
    percentile = percentile_clip(image)[0]
    for half in (slice(8, 56), slice(72, 120)):  # away from the boundary's interpolation band
        assert out[:, half].std() > 3 * percentile[:, half].std()
        assert out[:, half].max() - out[:, half].min() > 0.5


def test_clahe_one_tile_is_a_monotone_mapping():
    image = _low_contrast(3)
    out = clahe(image, tiles=1, clip_limit=1.0)
    for c in range(image.shape[0]):
        order = np.argsort(image[c].ravel(), kind="stable")
        assert np.all(np.diff(out[c].ravel()[order]) >= -1e-6)


def test_clahe_tile_grid_has_no_seams():
    # A smooth ramp stays smooth: bilinear interpolation between tile mappings leaves no jumps.
    image = np.broadcast_to(np.linspace(0, 4000, 256).astype(np.uint16), (1, 256, 256)).copy()
    out = clahe(image, tiles=8, clip_limit=0.02)[0]
    assert np.abs(np.diff(out, axis=1)).max() < 0.05


@pytest.mark.parametrize("value", [0, 1234])
def test_clahe_constant_channel_becomes_zeros(value):
    image = np.stack([np.full((16, 16), value, np.uint16), _low_contrast(shape=(1, 16, 16))[0]])
    out = clahe(image)
    # The constant channel is zeros and leaves the other channel as CLAHE gives it alone.
    assert np.all(out[0] == 0.0)
    np.testing.assert_array_equal(out[1], clahe(image[1:])[0])


def test_clahe_nan_pixels_and_all_nan_channel():
    channel = _low_contrast(shape=(1, 32, 32))[0].astype(np.float32)
    channel[3, :7] = np.nan
    channel[5, 5] = np.inf
    out = clahe(np.stack([channel, np.full((32, 32), np.nan, np.float32)]))
    assert np.isfinite(out).all()
    assert np.all(out[0, 3, :7] == 0.0) and out[0, 5, 5] == 0.0
    assert np.all(out[1] == 0.0)
    assert out[0].max() > 0.5


@pytest.mark.parametrize("kwargs", [dict(clip_limit=0.0), dict(clip_limit=2.0), dict(tiles=0), dict(nbins=1),
                                    dict(low=50.0, high=10.0)])
def test_clahe_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        clahe(np.zeros((1, 8, 8), np.uint16), **kwargs)


# ---------------------------------------------------------------- self-standardization


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int32"])
def test_standardize_zero_mean_unit_variance(dtype):
    image = np.random.default_rng(4).gamma(2.0, 50.0, (3, 30, 40)).astype(dtype)
    out = standardize(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.reshape(3, -1).mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(3, -1).std(axis=1), 1.0, atol=1e-4)
    expected = (image - image.reshape(3, -1).mean(1)[:, None, None]) / image.reshape(3, -1).std(1)[:, None, None]
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_standardize_constant_nan_and_spikes_are_safe():
    spike = np.zeros((64, 64), np.float32)
    spike[0, 0] = 1e6  # one hot pixel: z ~ 64, well within float16
    with_nan = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    with_nan[:2] = np.nan
    with_nan[5, 5] = -np.inf
    image = np.stack([np.zeros((64, 64), np.float32), np.full((64, 64), 7.0, np.float32), with_nan, spike,
                      np.full((64, 64), np.nan, np.float32)])
    out = standardize(image, dtype=np.float16)
    assert np.isfinite(out).all()
    assert np.all(out[[0, 1, 4]] == 0)
    finite = np.isfinite(with_nan)
    assert np.all(out[2][~finite] == 0)
    values = out[2][finite].astype(np.float64)
    assert abs(values.mean()) < 1e-2 and abs(values.std() - 1) < 1e-2
    # One spike among n pixels: mean s/n, std s*sqrt(n-1)/n, so the spike is at sqrt(n - 1), the rest at
    # -1/sqrt(n - 1) (to float16's precision).
    n = spike.size
    assert out[3, 0, 0] == np.float16(np.sqrt(n - 1))
    np.testing.assert_allclose(out[3].ravel()[1:].astype(np.float64), -1 / np.sqrt(n - 1), rtol=1e-3)


def test_normalize_field_dispatches_every_method():
    image = _low_contrast()
    assert set(NORMALIZATIONS) == {"percentile", "clahe", "standardize"}
    np.testing.assert_array_equal(normalize_field(image, "percentile", clip_low=0.1, clip_high=99.9),
                                  percentile_clip(image, 0.1, 99.9))
    np.testing.assert_array_equal(normalize_field(image, "clahe", clahe_clip_limit=0.02, clahe_tiles=4),
                                  clahe(image, clip_limit=0.02, tiles=4))
    np.testing.assert_array_equal(normalize_field(image, "standardize"), standardize(image))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize_field(image, "zscore")

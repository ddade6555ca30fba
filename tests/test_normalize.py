"""Per-channel percentile clipping: exact percentiles, float32 [0, 1] output, safe on bad channels."""

from __future__ import annotations

import numpy as np
import pytest

from cellfm.data.normalize import percentile_clip


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

"""Per-channel intensity normalization applied on the fly in the data pipeline.

Three methods (``data.normalization``), all per image and per channel, all safe on what real plates
contain (NaN/inf pixels are ignored for the statistics and become 0; a constant, e.g. all-zero,
channel becomes all zeros; nothing divides by zero):

- ``percentile``: clip between the ``low``/``high`` percentiles (default 1/99) and map to [0, 1];
- ``clahe``: percentile clipping, then contrast-limited adaptive histogram equalization (CLAHE) on a
  grid of tiles with bilinear interpolation between tile mappings, in [0, 1];
- ``standardize``: per-image per-channel self-standardization (zero mean, unit variance).

Integer images (uint8/uint16, what microscopes write) take a fast exact path: one histogram
(``bincount``) per channel gives the exact percentiles, and the whole normalization is a lookup table
applied with one gather per channel, written straight into the output dtype (float16 or uint8 in the
pipeline), i.e. no float32/float64 temporaries of the whole field.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NORMALIZATIONS = ("percentile", "clahe", "standardize")
_LUT_DTYPES = (np.uint8, np.uint16)


def _order_statistics_from_cumulative(cumulative: np.ndarray, ks: list[int]) -> np.ndarray:
    """The ``ks``-th smallest values (0-based) given a histogram's cumulative counts per value."""
    return np.searchsorted(cumulative, np.asarray(ks) + 1)


def _interpolated_pair(n: int, low: float, high: float, order_stats) -> tuple[float, float]:
    """The ``low``/``high`` percentiles of ``n`` values with numpy's default linear interpolation;
    ``order_stats(ks)`` returns the ``ks``-th smallest values."""
    last = n - 1
    positions = (low / 100.0 * last, high / 100.0 * last)
    ks = sorted({int(np.floor(p)) for p in positions} | {int(np.ceil(p)) for p in positions})
    stats = dict(zip(ks, (float(v) for v in order_stats(ks))))

    def interpolate(position: float) -> float:
        below, above = int(np.floor(position)), int(np.ceil(position))
        fraction = position - below
        return stats[below] * (1.0 - fraction) + stats[above] * fraction

    return interpolate(positions[0]), interpolate(positions[1])


def _percentile_pair(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The ``low``/``high`` percentiles of a 1-D (float) array with numpy's default linear
    interpolation: O(n) ``np.partition`` at the few order statistics needed, not a full sort."""
    return _interpolated_pair(values.size, low, high, lambda ks: np.partition(values, ks)[ks])


def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{name} expects a (C, H, W) image, got shape {image.shape}")
    return image


def _check_percentiles(low: float, high: float, name: str) -> None:
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"{name} needs 0 <= low < high <= 100, got low={low}, high={high}")


def _channel_index(channel: np.ndarray):
    """A uint8/uint16 channel as a flat int32 torch tensor: torch's bincount and index_select take it
    as is and run ~2-3x faster than numpy's, which cast their input to intp on every call."""
    import torch

    return torch.from_numpy(channel.astype(np.int32).reshape(-1))


def _channel_lut(index, low: float, high: float, levels: int | None) -> np.ndarray | None:
    """For a uint8/uint16 channel (``_channel_index``): a lookup table value -> normalized value
    (float64 in [0, 1], or integer bins ``0..levels-1`` when ``levels`` is given), or None for a
    constant channel. Exact: the percentiles come from the channel's full histogram."""
    import torch

    counts = torch.bincount(index).numpy()
    cumulative = np.cumsum(counts)
    p_low, p_high = _interpolated_pair(
        int(cumulative[-1]), low, high, lambda ks: _order_statistics_from_cumulative(cumulative, ks))
    if not p_high > p_low:
        return None
    lut = (np.arange(counts.size, dtype=np.float64) - p_low) * (1.0 / (p_high - p_low))
    np.clip(lut, 0.0, 1.0, out=lut)
    if levels is not None:
        return np.floor(lut * (levels - 1) + 0.5).astype(np.uint8 if levels <= 256 else np.uint16)
    return lut


def _gather(lut: np.ndarray, index, out: np.ndarray) -> None:
    """``out[...] = lut[index]`` (``index`` from ``_channel_index``), written in place when ``out`` is contiguous."""
    import torch

    table = torch.from_numpy(lut)
    if out.flags.c_contiguous:
        torch.index_select(table, 0, index, out=torch.from_numpy(out).view(-1))
    else:
        out[...] = table.index_select(0, index).numpy().reshape(out.shape)


def _clip_float_channel(channel: np.ndarray, low: float, high: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A float channel clipped to [0, 1] float32 (None if constant/empty) and its non-finite mask."""
    flat = channel.ravel()
    finite = np.isfinite(flat)
    bad = None
    if not finite.all():
        bad = ~finite.reshape(channel.shape)
        flat = flat[finite]
    if flat.size == 0:
        return None, bad
    p_low, p_high = _percentile_pair(flat, low, high)
    if not p_high > p_low:
        return None, bad
    scaled = channel.astype(np.float32, copy=True)
    scaled -= np.float32(p_low)
    scaled *= np.float32(1.0 / (p_high - p_low))
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if bad is not None:
        scaled[bad] = 0.0  # NaN stays NaN through clip; inf would clip to 0/1
    return scaled, bad


def _output(image: np.ndarray, dtype, out: np.ndarray | None, name: str) -> np.ndarray:
    """The output array for ``image``: ``out`` (filled in place) or a new one of ``dtype``; the
    caller writes every channel (no zeroing pass over the whole field)."""
    if out is None:
        return np.empty(image.shape, dtype=dtype)
    if out.shape != image.shape:
        raise ValueError(f"{name}: out has shape {out.shape}, the image {image.shape}")
    return out


def quantize_unit(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> 256 levels (round half up) written into the uint8 array ``out``."""
    np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5, out=out, casting="unsafe")
    return out


def percentile_clip(image: np.ndarray, low: float = 1.0, high: float = 99.0, dtype=np.float32,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Map each channel of a ``(C, H, W)`` image to ``[0, 1]`` between its ``low`` and ``high``
    percentiles (numpy's linear interpolation, exact), clipping outside; returns ``dtype``
    (float32 by default; the pipeline asks for float16, or uint8 = 256 levels of [0, 1]), written
    into ``out`` when given (its dtype then decides).

    Robust to what real plates contain: NaN (and inf) values are ignored for the percentiles and
    become 0; a constant (e.g. all-zero, empty) channel becomes all zeros instead of dividing by zero.
    """
    image = _check_image(image, "percentile_clip")
    _check_percentiles(low, high, "percentile_clip")
    out = _output(image, dtype, out, "percentile_clip")
    levels = 256 if out.dtype == np.uint8 else None
    for c, channel in enumerate(image):
        if image.dtype in _LUT_DTYPES and channel.size:
            index = _channel_index(channel)
            lut = _channel_lut(index, low, high, levels)
            if lut is None:
                out[c] = 0
            else:
                # The table already holds output values: one gather per channel, no float temporaries.
                _gather(lut.astype(out.dtype, copy=False), index, out[c])
            continue
        if not np.issubdtype(image.dtype, np.floating):
            channel = channel.astype(np.float64)
        scaled, _ = _clip_float_channel(channel, low, high)
        if scaled is None:
            out[c] = 0
        elif levels is None:
            out[c] = scaled
        else:
            quantize_unit(scaled, out[c])
    return out


def standardize(image: np.ndarray, dtype=np.float32, eps: float = 1e-6) -> np.ndarray:
    """Per-channel self-standardization of a ``(C, H, W)`` image: ``(x - mean) / std`` over the
    channel's finite pixels (statistics in float64). Non-finite pixels become 0 (the mean); a
    channel whose std is below ``eps`` times its mean magnitude (constant, all-zero, all-NaN) becomes
    all zeros. Values are clipped to +-``6e4`` so float16 output never overflows."""
    image = _check_image(image, "standardize")
    out = np.zeros(image.shape, dtype=dtype)
    for c, channel in enumerate(image):
        if channel.size == 0:
            continue
        bad = None
        if np.issubdtype(image.dtype, np.floating):
            finite = np.isfinite(channel)
            if not finite.all():
                bad = ~finite
        values = channel[~bad] if bad is not None else channel.ravel()
        if values.size == 0:
            continue
        mean = float(values.mean(dtype=np.float64))
        std = float(np.sqrt(max(float(values.var(dtype=np.float64)), 0.0)))
        if not std > eps * max(abs(mean), 1.0):
            continue
        scaled = channel.astype(np.float32, copy=True)
        scaled -= np.float32(mean)
        scaled *= np.float32(1.0 / std)
        if bad is not None:
            scaled[bad] = 0.0
        np.clip(scaled, -6e4, 6e4, out=scaled)
        out[c] = scaled
    return out


@lru_cache(maxsize=16)
def _clahe_geometry(height: int, width: int, tiles_y: int, tiles_x: int, nbins: int):
    """Per-shape index arrays for CLAHE (cached: every field of a plate has the same shape).

    Returns the tile id of every pixel (for the tile histograms), the pixel count of every tile, and
    for the bilinear interpolation between the four nearest tile centres: four (H, W) offsets into
    the flattened (tiles, nbins) mapping table and the (H, 1) / (1, W) weights.
    """
    row_tile = np.minimum(np.arange(height) * tiles_y // height, tiles_y - 1)
    col_tile = np.minimum(np.arange(width) * tiles_x // width, tiles_x - 1)
    tile_id = (row_tile[:, None] * tiles_x + col_tile[None, :]).astype(np.intp)
    tile_pixels = np.bincount(tile_id.ravel(), minlength=tiles_y * tiles_x)

    def neighbours(size: int, n_tiles: int):
        # Tile centres at (i + 0.5) * size / n_tiles; outside the first/last centre: the edge tile only.
        position = (np.arange(size) + 0.5) * n_tiles / size - 0.5
        first = np.clip(np.floor(position), 0, n_tiles - 1).astype(np.intp)
        second = np.minimum(first + 1, n_tiles - 1)
        weight = np.clip(position - first, 0.0, 1.0).astype(np.float32)
        weight[second == first] = 0.0
        return first, second, weight

    y0, y1, wy = neighbours(height, tiles_y)
    x0, x1, wx = neighbours(width, tiles_x)
    offsets = tuple(((ty[:, None] * tiles_x + tx[None, :]) * nbins).astype(np.int32)
                    for ty in (y0, y1) for tx in (x0, x1))
    for array in (tile_id, tile_pixels, wy, wx, *offsets):
        array.setflags(write=False)
    return tile_id, tile_pixels, offsets, wy[:, None], wx[None, :]


def _clahe_bins(bins: np.ndarray, clip_limit: float, tiles: tuple[int, int], nbins: int, dtype) -> np.ndarray:
    """CLAHE of one channel given as integer bins ``0..nbins-1`` -> values in [0, 1] of ``dtype``."""
    height, width = bins.shape
    tiles_y, tiles_x = min(tiles[0], height), min(tiles[1], width)
    tile_id, tile_pixels, offsets, wy, wx = _clahe_geometry(height, width, tiles_y, tiles_x, nbins)
    n_tiles = tiles_y * tiles_x
    hist = np.bincount((tile_id * nbins + bins).ravel(), minlength=n_tiles * nbins)
    hist = hist.reshape(n_tiles, nbins).astype(np.float64)
    # Contrast limit: no bin above clip_limit of the tile's pixels (at least 1); the excess is
    # spread evenly over all bins (as in skimage's normalized clip_limit).
    limit = np.maximum(clip_limit * tile_pixels, 1.0)[:, None]
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / nbins
    mapping = (np.cumsum(hist, axis=1) / tile_pixels[:, None]).astype(np.float32).ravel()
    b = bins.astype(np.int32)
    v00, v01, v10, v11 = (np.take(mapping, offset + b) for offset in offsets)
    top = v00 + (v01 - v00) * wx
    bottom = v10 + (v11 - v10) * wx
    out = top + (bottom - top) * wy
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(dtype, copy=False)


def clahe(image: np.ndarray, clip_limit: float = 0.01, tiles: int | tuple[int, int] = 8, nbins: int = 256,
          low: float = 1.0, high: float = 99.0, dtype=np.float32) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization per channel of a ``(C, H, W)`` image.

    Each channel is first percentile-clipped (``low``/``high``) and quantized to ``nbins`` levels;
    a histogram per tile of a ``tiles`` grid is clipped at ``clip_limit`` (fraction of the tile's
    pixels, like skimage's ``equalize_adapthist``) and equalized, and every pixel interpolates
    bilinearly between the mappings of its four nearest tile centres. Fully vectorized (a few
    whole-channel ``bincount``/``take`` passes, no per-tile Python). Output in [0, 1].

    Constant, all-zero and all-NaN channels become all zeros; NaN/inf pixels become 0.
    """
    image = _check_image(image, "clahe")
    _check_percentiles(low, high, "clahe")
    tiles = (tiles, tiles) if isinstance(tiles, int) else tuple(tiles)
    if len(tiles) != 2 or min(tiles) < 1:
        raise ValueError(f"clahe tiles must be a positive int or (rows, cols), got {tiles}")
    if not 0.0 < clip_limit <= 1.0:
        raise ValueError(f"clahe clip_limit must be in (0, 1], got {clip_limit}")
    if not 2 <= nbins <= 65536:
        raise ValueError(f"clahe nbins must be in [2, 65536], got {nbins}")
    out = np.zeros(image.shape, dtype=dtype)
    for c, channel in enumerate(image):
        if channel.size == 0:
            continue
        bad = None
        if image.dtype in _LUT_DTYPES:
            index = _channel_index(channel)
            lut = _channel_lut(index, low, high, nbins)
            if lut is None:
                continue
            bins = np.empty(channel.shape, lut.dtype)
            _gather(lut, index, bins)
        else:
            if not np.issubdtype(image.dtype, np.floating):
                channel = channel.astype(np.float64)
            scaled, bad = _clip_float_channel(channel, low, high)
            if scaled is None:
                continue
            bins = np.floor(scaled * (nbins - 1) + 0.5).astype(np.uint8 if nbins <= 256 else np.uint16)
        equalized = _clahe_bins(bins, clip_limit, tiles, nbins, dtype)
        if bad is not None:
            equalized[bad] = 0
        out[c] = equalized
    return out


def normalize_field(image: np.ndarray, method: str = "percentile", *, clip_low: float = 1.0, clip_high: float = 99.0,
                    clahe_clip_limit: float = 0.01, clahe_tiles: int = 8, dtype=np.float32,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Dispatch on ``method`` (one of ``NORMALIZATIONS``): a (C, H, W) field -> normalized ``dtype``
    (uint8 = 256 levels of [0, 1], not for ``standardize``), written into ``out`` when given."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; choose one of {NORMALIZATIONS}")
    target = np.dtype(out.dtype if out is not None else dtype)
    if method == "percentile":
        return percentile_clip(image, clip_low, clip_high, dtype=target, out=out)
    if target == np.uint8 and method == "standardize":
        raise ValueError("standardize yields unbounded values; uint8 output holds [0, 1] only")
    compute = np.float32 if target == np.uint8 else target
    if method == "clahe":
        result = clahe(image, clip_limit=clahe_clip_limit, tiles=clahe_tiles, low=clip_low, high=clip_high, dtype=compute)
    else:
        result = standardize(image, dtype=compute)
    if target == np.uint8:
        return quantize_unit(result, out if out is not None else np.empty(result.shape, np.uint8))
    if out is not None:
        out[...] = result
        return out
    return result

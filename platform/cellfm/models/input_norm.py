"""Optional in-model intensity normalization per channel plane (batched torch, any device):
percentile clipping to [0, 1] and contrast-limited adaptive histogram equalization (CLAHE).

The data pipeline normalizes on the CPU (cellfm.data.normalize); these are for models that should
carry their own preprocessing (e.g. inference on raw uint16 planes, or on the accelerator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_NORMS = ("none", "percentile", "adaptive_hist")


def percentile_scale(x: Tensor, low: float = 1.0, high: float = 99.0, eps: float = 1e-6) -> Tensor:
    """(B, C, H, W) -> same shape in [0, 1]: every plane clipped to its own [low, high] percentiles
    (nearest rank) and rescaled; a constant plane becomes 0."""
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got {low}, {high}")
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W).float()
    n = H * W
    k_lo = int(round(low / 100.0 * (n - 1))) + 1
    k_hi = int(round(high / 100.0 * (n - 1))) + 1
    lo = flat.kthvalue(k_lo, dim=1, keepdim=True).values
    hi = flat.kthvalue(k_hi, dim=1, keepdim=True).values
    span = hi - lo
    out = ((flat - lo) / span.clamp_min(eps)).clamp(0.0, 1.0)
    out = torch.where(span > eps, out, torch.zeros_like(out))
    return out.reshape(B, C, H, W).to(x.dtype)


def clahe(x: Tensor, grid: tuple[int, int] = (8, 8), clip_limit: float = 2.0, nbins: int = 256) -> Tensor:
    """Contrast-limited adaptive histogram equalization of every plane of x (B, C, H, W) with values in
    [0, 1] -> same shape in [0, 1].

    Per tile of a `grid` of tiles: histogram with `nbins` bins, counts clipped at clip_limit x the mean
    bin count (OpenCV's clipLimit convention) and the excess spread uniformly, CDF as the tile's mapping;
    each pixel's output interpolates bilinearly between the mappings of the 4 nearest tile centres."""
    B, C, H, W = x.shape
    gh, gw = grid
    th, tw = -(-H // gh), -(-W // gw)  # tile size (ceil): the image is reflect-padded to gh*th x gw*tw
    pad_h, pad_w = gh * th - H, gw * tw - W
    planes = x.reshape(B * C, 1, H, W).float().clamp(0.0, 1.0)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < H and pad_w < W else "replicate"
        planes = F.pad(planes, (0, pad_w, 0, pad_h), mode=mode)
    P = planes.shape[0]
    bins = (planes[:, 0] * (nbins - 1)).round().long()  # (P, gh*th, gw*tw)

    # Per-tile histograms in one scatter: flat index = (plane, tile) * nbins + bin.
    tiles = bins.reshape(P, gh, th, gw, tw).permute(0, 1, 3, 2, 4).reshape(P, gh * gw, th * tw)
    offsets = (torch.arange(P * gh * gw, device=x.device) * nbins).reshape(P, gh * gw, 1)
    hist = torch.zeros(P * gh * gw * nbins, device=x.device)
    hist.scatter_add_(0, (tiles + offsets).reshape(-1), torch.ones(tiles.numel(), device=x.device))
    hist = hist.reshape(P, gh * gw, nbins)

    n_pix = th * tw
    limit = max(clip_limit * n_pix / nbins, 1.0)
    excess = (hist - limit).clamp_min(0.0).sum(dim=-1, keepdim=True)
    hist = hist.clamp_max(limit) + excess / nbins
    lut = hist.cumsum(dim=-1) / n_pix  # (P, T, nbins), the tile mappings in [0, 1]

    # Bilinear interpolation between tile centres (pixels beyond the outer centres use the edge tiles).
    bins = bins[:, :H, :W]
    ys = (torch.arange(H, device=x.device, dtype=torch.float32) + 0.5) / th - 0.5
    xs = (torch.arange(W, device=x.device, dtype=torch.float32) + 0.5) / tw - 0.5
    y0 = ys.floor().clamp(0, gh - 1).long()
    x0 = xs.floor().clamp(0, gw - 1).long()
    y1 = (y0 + 1).clamp_max(gh - 1)
    x1 = (x0 + 1).clamp_max(gw - 1)
    wy = (ys - y0.float()).clamp(0.0, 1.0)[:, None]
    wx = (xs - x0.float()).clamp(0.0, 1.0)[None, :]
    lut_flat = lut.reshape(P, gh * gw * nbins)

    def lookup(ty: Tensor, tx: Tensor) -> Tensor:
        tile = (ty[:, None] * gw + tx[None, :]) * nbins  # (H, W)
        return lut_flat.gather(1, (tile[None] + bins).reshape(P, -1)).reshape(P, H, W)

    top = lookup(y0, x0) * (1 - wx) + lookup(y0, x1) * wx
    bottom = lookup(y1, x0) * (1 - wx) + lookup(y1, x1) * wx
    out = top * (1 - wy) + bottom * wy
    return out.reshape(B, C, H, W).to(x.dtype)


class InputNorm(nn.Module):
    """mode: "none" (identity) | "percentile" (per-plane [low, high] percentile clip -> [0, 1]) |
    "adaptive_hist" (per-plane min-max -> CLAHE). No parameters; channel-wise, so it keeps every
    channel-order invariance of the model."""

    def __init__(self, mode: str = "none", low: float = 1.0, high: float = 99.0,
                 grid: tuple[int, int] = (8, 8), clip_limit: float = 2.0, nbins: int = 256):
        super().__init__()
        if mode not in INPUT_NORMS:
            raise ValueError(f"input_norm={mode!r} is not one of {list(INPUT_NORMS)}")
        self.mode, self.low, self.high = mode, low, high
        self.grid, self.clip_limit, self.nbins = tuple(grid), clip_limit, nbins

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        if self.mode == "percentile":
            return percentile_scale(x, self.low, self.high)
        return clahe(percentile_scale(x, 0.0, 100.0), self.grid, self.clip_limit, self.nbins)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

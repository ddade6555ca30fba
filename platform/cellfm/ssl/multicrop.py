"""Multi-crop augmentation as batched tensor work on the training device: every view of an image
is one affine resampling shared by all of its channels, so channels stay spatially aligned."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Rejection-sampling attempts per box before falling back to the whole image (as torchvision does).
_BOX_ATTEMPTS = 10


class MultiCrop:
    """Batched multi-crop on the training device (no per-image Python loops): each view is a random box
    (scale, aspect ratio) shared by ALL channels of that image, resampled with affine_grid + grid_sample,
    plus random h/v flip, rot90, and per-channel intensity jitter (brightness/contrast).

    scale is the box area as a fraction of the image area, ratio its width/height (log-uniform), as in
    torchvision's RandomResizedCrop. Brightness multiplies a channel by U(1-j, 1+j); contrast scales its
    deviation from its own mean by U(1-j, 1+j), drawn independently for every view and channel."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        rot90: bool = True,
        intensity_jitter: float = 0.2,
    ):
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise ValueError(f"bad crop sizes: global={global_size}, local={local_size}, n_local={n_local}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if not 0.0 <= intensity_jitter < 1.0:
            # >= 1 could flip a channel's sign, which is not a plausible imaging change.
            raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.ratio = ratio
        self.flip = flip
        self.rot90 = rot90
        self.intensity_jitter = intensity_jitter

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """images (B, C, H, W) float -> globals (2, B, C, g, g), locals (n_local, B, C, l, l) or None.

        channel_mask (B, C) bool (True = real channel; the data pipeline's padding is False): padded
        channels come out exactly zero in every view (no jitter, no interpolation leak); the mask
        itself is unchanged, since every view keeps all channels of its image.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"MultiCrop expects float (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if channel_mask is not None and (channel_mask.shape != images.shape[:2] or channel_mask.dtype != torch.bool):
            raise ValueError(f"channel_mask must be a bool tensor of shape {tuple(images.shape[:2])}, "
                             f"got {channel_mask.dtype} {tuple(channel_mask.shape)}")
        globals_ = self._views(images, 2, self.global_size, self.global_scale, generator, channel_mask)
        if self.n_local == 0:
            return globals_, None
        return globals_, self._views(images, self.n_local, self.local_size, self.local_scale, generator, channel_mask)

    def _views(
        self, images: Tensor, n_views: int, size: int, scale: tuple[float, float], gen: torch.Generator | None,
        channel_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W) -> (n_views, B, C, size, size)."""
        B, C, H, W = images.shape
        theta = self._sample_theta(B * n_views, H, W, scale, gen).to(images.device)
        grid = F.affine_grid(theta, [B * n_views, 1, size, size], align_corners=False)
        # Stack each image's views along the grid height: one grid_sample call, no copies of the input.
        grid = grid.reshape(B, n_views * size, size, 2).to(images.dtype)
        sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views = sampled.view(B, C, n_views, size, size).permute(2, 0, 1, 3, 4)
        # Jitter and mask are one per-(view, image, channel) affine map a * x + b, applied in a single
        # pass that also writes the (views, B, C) layout: every extra pass over the views costs as
        # much as the resampling itself once they outgrow the CPU caches.
        scale_, shift = self._intensity_affine(sampled, n_views, gen)
        if channel_mask is not None and not bool(channel_mask.all()):
            keep = channel_mask.to(device=images.device, dtype=images.dtype)[None, :, :, None, None]
            scale_ = keep if scale_ is None else scale_ * keep
            shift = None if shift is None else shift * keep
        out = torch.empty((n_views, B, C, size, size), dtype=images.dtype, device=images.device)
        if scale_ is None:
            return out.copy_(views)
        if shift is None:
            return torch.mul(views, scale_, out=out)
        return torch.addcmul(shift, views, scale_, out=out)

    def _intensity_affine(self, sampled: Tensor, n_views: int, gen: torch.Generator | None
                          ) -> tuple[Tensor | None, Tensor | None]:
        """Per-(view, image, channel) brightness gain g then contrast k around the channel's mean m
        as one affine map: k * (g * x - g * m) + g * m = (g * k) * x + g * m * (1 - k). (None, None)
        without jitter. ``sampled``: the resampled views as (B, C, n_views * size, size)."""
        if self.intensity_jitter <= 0:
            return None, None
        B, C = sampled.shape[:2]
        j = self.intensity_jitter
        gain = self._uniform((n_views, B, C, 1, 1), 1 - j, 1 + j, gen).to(sampled)
        contrast = self._uniform((n_views, B, C, 1, 1), 1 - j, 1 + j, gen).to(sampled)
        mean = sampled.view(B, C, n_views, -1).mean(dim=-1).permute(2, 0, 1)[..., None, None]
        return gain * contrast, gain * mean * (1 - contrast)

    def _sample_theta(
        self, n: int, H: int, W: int, scale: tuple[float, float], gen: torch.Generator | None
    ) -> Tensor:
        """(n, 2, 3) affine maps from output to input normalised coordinates (align_corners=False)."""
        area = H * W
        s = self._uniform((n, _BOX_ATTEMPTS), *scale, gen) * area
        log_r = self._uniform((n, _BOX_ATTEMPTS), math.log(self.ratio[0]), math.log(self.ratio[1]), gen)
        w_try, h_try = torch.sqrt(s * log_r.exp()), torch.sqrt(s / log_r.exp())
        fits = (w_try <= W) & (h_try <= H)
        first = fits.float().argmax(dim=1, keepdim=True)  # first attempt that fits
        found = fits.any(dim=1)
        w = torch.where(found, w_try.gather(1, first)[:, 0], torch.full_like(found, W, dtype=s.dtype))
        h = torch.where(found, h_try.gather(1, first)[:, 0], torch.full_like(found, H, dtype=s.dtype))
        cx = w / 2 + (W - w) * self._uniform((n,), 0.0, 1.0, gen)
        cy = h / 2 + (H - h) * self._uniform((n,), 0.0, 1.0, gen)

        # Rotation (k * 90 deg) and flips act on output coordinates, so a square view stays square.
        if self.rot90:
            k = torch.randint(0, 4, (n,), generator=gen, device=s.device)
            cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=s.device)[k]
            sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=s.device)[k]
        else:
            cos, sin = torch.ones(n, device=s.device), torch.zeros(n, device=s.device)
        if self.flip:
            fx = torch.randint(0, 2, (n,), generator=gen, device=s.device) * 2.0 - 1.0
            fy = torch.randint(0, 2, (n,), generator=gen, device=s.device) * 2.0 - 1.0
        else:
            fx, fy = torch.ones(n, device=s.device), torch.ones(n, device=s.device)
        sx, sy = w / W, h / H
        return torch.stack(
            [
                torch.stack([sx * cos * fx, -sx * sin * fy, 2 * cx / W - 1], dim=1),
                torch.stack([sy * sin * fx, sy * cos * fy, 2 * cy / H - 1], dim=1),
            ],
            dim=1,
        )

    @staticmethod
    def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
        # Draw on the generator's device so a seeded CPU generator gives the same crops on any device.
        device = gen.device if gen is not None else None
        return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)

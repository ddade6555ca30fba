"""Multi-crop augmentation as batched tensor work on the training device: every view of an image
is one affine resampling shared by all of its channels, so channels stay spatially aligned."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellfm.ssl.channel_sampling import spread_over_real_channels

# Rejection-sampling attempts per box before falling back to the whole image (as torchvision does).
_BOX_ATTEMPTS = 10
# Bytes of input images, views and sampling grid handled at a time on CPU, per intra-op thread: enough
# that the per-block calls and each multithreaded op's fork-join are paid rarely, while the temporaries
# (grid, samples) of a large batch stay bounded (multicrop_ablation, block size section: 4 MB blocks
# take about 1.2x the time of 32 MB ones, 16 MB up to 1.1x, 64 MB alike).
_CPU_BLOCK_BYTES_PER_THREAD = 1 << 25
# On CPU, views at least this size are resampled one F.interpolate per view instead of by batched
# grid_sample: a separable resize of a box costs less per pixel than grid_sample's gathers, which
# outweighs the per-call Python for large views (multicrop_ablation, resampler section: grid_sample
# takes about 0.9x the per-view time for 96-px locals from 512-px fields, 0.85x / 1.25x for 128-px
# views from 256 / 512-px fields, 1.6x for 224-px globals).
_PER_VIEW_MIN_SIZE = 128


@dataclass
class _Boxes:
    """The drawn views of one size, image-major ((image, view) pairs, flattened): an integer box per view
    and its orientation as a transpose and two flips of the input axes' sample order."""

    x0: Tensor  # (n,) long: the box's left column
    y0: Tensor  # (n,) long: its top row
    w: Tensor  # (n,) long: its width in input pixels
    h: Tensor  # (n,) long: its height
    transpose: Tensor  # (n,) bool: x runs along the view's rows (a quarter turn)
    flip_x: Tensor  # (n,) bool: x positions run backwards along their view axis
    flip_y: Tensor  # (n,) bool: y positions run backwards


@dataclass
class _ViewSet:
    """The drawn views of one size for a whole batch, resampled into ``out`` block by block (one
    grid_sample per block) or view by view (one F.interpolate per view, see _PER_VIEW_MIN_SIZE)."""

    boxes: _Boxes
    grid_column: Tensor | None  # (B, n_views, 1, size) complex: x + iy grid term of each output column
    grid_row: Tensor | None  # (B, n_views, size, 1) complex: x + iy grid term of each output row
    slope: Tensor  # (n_views, B, C): intensity map slope (0 for masked channels)
    mean_weight: Tensor | None  # (n_views, B, C): weight of the view's channel mean; None without jitter
    out: Tensor  # (n_views, B, C, size, size)

    def resample(self, images: Tensor, start: int, stop: int) -> None:
        n_views, _, C, size, _ = self.out.shape
        b = stop - start
        grid = torch.empty((b, n_views * size, size, 2), dtype=self.grid_row.real.dtype, device=self.out.device)
        # As complex numbers x + iy, the grid's interleaved (x, y) pairs are one contiguous broadcast add:
        # 3-5x faster on CPU than one add per coordinate into the strided halves (multicrop_ablation).
        torch.add(self.grid_column[start:stop], self.grid_row[start:stop],
                  out=torch.view_as_complex(grid).view(b, n_views, size, size))
        # Each image's views stacked along the grid height: one grid_sample call, no copies of the input.
        sampled = F.grid_sample(images[start:stop], grid.to(images.dtype), mode="bilinear", padding_mode="border",
                                align_corners=False)
        views = sampled.view(b, C, n_views, size, size).permute(2, 0, 1, 3, 4)
        slope = self.slope[:, start:stop, :, None, None]
        out = self.out[:, start:stop]
        # Jitter and mask: one multiply that also writes the (views, B, C) layout, then the per-channel
        # offset. (Not one addcmul: on CPU it is slower than mul + add_ here, multicrop_ablation.)
        torch.mul(views, slope, out=out)
        if self.mean_weight is not None:
            mean = sampled.view(b, C, n_views, size * size).mean(dim=-1).permute(2, 0, 1)
            out.add_((self.mean_weight[:, start:stop] * mean)[..., None, None])

    def resample_per_view(self, images: Tensor, start: int, stop: int) -> None:
        """Crop each box of images start..stop and resize it with F.interpolate, then flip and jitter it
        while it is in cache: the same views as resample (up to float rounding), cheaper per pixel for
        large views on CPU."""
        n_views = self.out.shape[0]
        columns = (self.boxes.x0, self.boxes.y0, self.boxes.w, self.boxes.h, self.boxes.transpose,
                   self.boxes.flip_x, self.boxes.flip_y)
        rows = slice(start * n_views, stop * n_views)
        for n, (x0, y0, w, h, transpose, flip_x, flip_y) in enumerate(zip(*(c[rows].tolist() for c in columns)),
                                                                      start * n_views):
            b, v = divmod(n, n_views)
            region = images[b:b + 1, :, y0:y0 + h, x0:x0 + w]
            view = F.interpolate(region, size=self.out.shape[-2:], mode="bilinear", align_corners=False)[0]
            flips = [dim for dim, flip in ((-2, flip_y), (-1, flip_x)) if flip]
            if flips:
                view = view.flip(flips)
            if transpose:
                # Rows along x: the upright view transposed (views are square), not a resize of the
                # transposed box, which F.interpolate reads across its rows (multicrop_ablation: "transposed").
                view = view.transpose(-1, -2)
            out = self.out[v, b]
            torch.mul(view, self.slope[v, b, :, None, None], out=out)
            if self.mean_weight is not None:
                out.add_((self.mean_weight[v, b] * view.mean(dim=(-2, -1)))[:, None, None])


def _axis_positions(start: Tensor, length: Tensor, size: int, extent: int, backwards: Tensor,
                    dtype: torch.dtype) -> Tensor:
    """(n, size) normalised (align_corners=False) sample positions along one input axis of ``extent``
    pixels: the centres of ``size`` equal cells of the box [start, start + length), clamped to the box's
    edge pixels, i.e. where cropping the box and resizing it with F.interpolate (bilinear,
    align_corners=False) samples it; in reverse order where ``backwards``."""
    start, length = start.double()[:, None], length.double()[:, None]
    cells = torch.arange(size, dtype=torch.float64, device=start.device) + 0.5
    pixel = torch.minimum(torch.maximum(start + cells * length / size - 0.5, start), start + length - 1)
    pixel = torch.where(backwards[:, None], pixel.flip(-1), pixel)
    return ((2 * pixel + 1) / extent - 1).to(dtype)


def _orientation_flips(k: Tensor, fx: Tensor, fy: Tensor) -> dict[str, Tensor]:
    """Which input axes a view samples backwards, for k quarter turns (odd k: transposed) and mirror
    flags fx, fy: without flips, k gives torch.rot90(box, k); with uniform fx, fy each of the 8 flips
    and rotations is equally likely, for any k."""
    return {"flip_x": torch.stack([fx, ~fy, ~fx, fy], dim=1).gather(1, k[:, None])[:, 0],
            "flip_y": torch.stack([fy, fx, ~fy, ~fx], dim=1).gather(1, k[:, None])[:, 0]}


def gaussian_blur_views(views: Tensor, sigma: Tensor) -> Tensor:
    """Blur every (view, image) of ``views`` (V, B, C, s, s) with its own isotropic Gaussian, the same
    for all channels of that view (defocus blurs every stain alike). sigma (V, B) in pixels; 0 leaves a
    view unchanged. Separable, as two depthwise convolutions over all views at once (reflect padding)."""
    V, B, C, size, _ = views.shape
    radius = max(1, min(size // 2 - 1, math.ceil(3 * float(sigma.max())))) if bool((sigma > 0).any()) else 0
    if radius == 0:
        return views
    offsets = torch.arange(-radius, radius + 1, device=views.device, dtype=views.dtype)
    safe = sigma.to(views.dtype).clamp_min(1e-6)[..., None]  # (V, B, 1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = torch.where((sigma > 0)[..., None], kernel, (offsets == 0).to(views.dtype))  # sigma 0: identity
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(C, dim=1).reshape(V * B * C, 1, 1, -1)
    flat = F.pad(views.reshape(1, V * B * C, size, size), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel, groups=V * B * C)
    flat = F.conv2d(flat, kernel.transpose(-1, -2), groups=V * B * C)
    return flat.view(V, B, C, size, size)


class MultiCrop:
    """Batched multi-crop on the training device: each view is a random box (scale, aspect ratio) shared
    by ALL channels of that image, cropped and resized bilinearly as F.interpolate does (align_corners=False,
    no antialiasing, edges clamped at the box), plus random h/v flip, rot90, and per-channel intensity
    jitter (brightness/contrast). One grid_sample call resamples all views of a block of images (the
    whole batch on accelerators, a block of a few tens of MB on CPU); on CPU, views of _PER_VIEW_MIN_SIZE pixels
    or more are resized one F.interpolate per view instead. The views depend on neither choice.

    scale is the box area as a fraction of the image area, ratio its width/height (log-uniform), and the
    box has whole-pixel sides and position, as in torchvision's RandomResizedCrop. Brightness
    multiplies a channel by U(1-j, 1+j); contrast scales its deviation from its own mean by U(1-j, 1+j),
    drawn independently for every view and channel.
    With ``blur_probability`` > 0 each view is, with that probability, Gaussian-blurred with a sigma
    drawn from ``blur_sigma`` (pixels of the view), as DINO's augmentations do: a field's focus is
    then no shortcut for telling fields apart."""

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
        blur_probability: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
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
        if not 0.0 <= blur_probability <= 1.0 or not 0.0 <= blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_probability must be in [0, 1] and blur_sigma 0 <= lo <= hi, "
                             f"got {blur_probability}, {tuple(blur_sigma)}")
        self.blur_probability = blur_probability
        self.blur_sigma = tuple(blur_sigma)
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
        B, C, H, W = images.shape
        valid = torch.ones(B, C, dtype=torch.bool) if channel_mask is None else channel_mask
        # Every draw happens here, globals then locals, so the views depend on the generator only,
        # not on how the batch is split into blocks below, nor on padding (jitter is drawn per real channel).
        view_sets = [self._view_set(images, 2, self.global_size, self.global_scale, generator, valid)]
        if self.n_local > 0:
            view_sets.append(self._view_set(images, self.n_local, self.local_size, self.local_scale, generator, valid))
        sigmas = [self._blur_sigmas(view_set.out.shape[:2], gen=generator) for view_set in view_sets]
        gridded = [view_set for view_set in view_sets if view_set.grid_row is not None]
        block = self._images_per_block(images, gridded)
        # One pass over blocks of images for both resamplers, each block's view sets in turn.
        for start in range(0, B, block):
            stop = min(B, start + block)
            for view_set in view_sets:
                if view_set.grid_row is None:
                    view_set.resample_per_view(images, start, stop)
                else:
                    view_set.resample(images, start, stop)
        views = [view_set.out if sigma is None else gaussian_blur_views(view_set.out, sigma.to(images.device))
                 for view_set, sigma in zip(view_sets, sigmas)]
        return views[0], views[1] if self.n_local > 0 else None

    def _blur_sigmas(self, shape: torch.Size, gen: torch.Generator | None) -> Tensor | None:
        """(n_views, B) blur sigmas, 0 for views left sharp; None when blurring is off (no draws)."""
        if self.blur_probability <= 0:
            return None
        blurred = self._uniform(tuple(shape), 0.0, 1.0, gen) < self.blur_probability
        return torch.where(blurred, self._uniform(tuple(shape), *self.blur_sigma, gen), 0.0)

    def _images_per_block(self, images: Tensor, view_sets: list[_ViewSet]) -> int:
        """How many images to resample at a time: on CPU as many as _CPU_BLOCK_BYTES_PER_THREAD per thread
        hold (input, grid, samples and views), on accelerators the whole batch, one launch per op."""
        B, C = images.shape[:2]
        if images.device.type != "cpu":
            return B
        pixels = sum(view_set.out[:, 0, 0].numel() for view_set in view_sets)
        # input, samples, output, (x, y) grid
        bytes_per_image = images.element_size() * (images[0].numel() + pixels * (2 * C + 2))
        return max(1, min(B, _CPU_BLOCK_BYTES_PER_THREAD * torch.get_num_threads() // bytes_per_image))

    def _view_set(self, images: Tensor, n_views: int, size: int, scale: tuple[float, float],
                  gen: torch.Generator | None, valid: Tensor) -> _ViewSet:
        """Draws the boxes and intensity jitter of n_views views of every image; valid (B, C) bool marks
        the real channels (padding comes out zero)."""
        B, C, H, W = images.shape
        boxes = self._draw_boxes(B * n_views, H, W, scale, gen)
        grid_column = grid_row = None
        if images.device.type != "cpu" or size < _PER_VIEW_MIN_SIZE:
            # The grid is built in complex numbers (see resample): in float32 for half-precision images,
            # which have no complex type of their own on every device, and rounded once to their dtype.
            grid_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
            x = _axis_positions(boxes.x0, boxes.w, size, W, boxes.flip_x, grid_dtype)
            y = _axis_positions(boxes.y0, boxes.h, size, H, boxes.flip_y, grid_dtype)
            x, y = torch.complex(x, torch.zeros_like(x)), torch.complex(torch.zeros_like(y), y)
            # x depends on one output axis and y on the other, so the grid is one term per output column
            # plus one per output row: built by one broadcast add per block, not a per-pixel affine map.
            transpose = boxes.transpose[:, None]
            grid_column = torch.where(transpose, y, x).to(images.device).view(B, n_views, 1, size)
            grid_row = torch.where(transpose, x, y).to(images.device).view(B, n_views, size, 1)
        slope, mean_weight = self._intensity_affine(n_views, valid, gen, images)
        if not bool(valid.all()):
            keep = valid.to(device=images.device, dtype=images.dtype)
            slope = slope * keep
            mean_weight = None if mean_weight is None else mean_weight * keep
        out = torch.empty((n_views, B, C, size, size), dtype=images.dtype, device=images.device)
        return _ViewSet(boxes, grid_column, grid_row, slope, mean_weight, out)

    def _intensity_affine(self, n_views: int, valid: Tensor, gen: torch.Generator | None, like: Tensor
                          ) -> tuple[Tensor, Tensor | None]:
        """Per-(view, image, channel) brightness gain g then contrast k around the view's channel mean m
        as one affine map: k * (g * x - g * m) + g * m = (g * k) * x + g * (1 - k) * m. Returns the
        slope g * k and the mean weight g * (1 - k), each (n_views, B, C); (ones, None) without jitter.
        Drawn per real channel (valid (B, C)), so padding leaves the real channels' jitter unchanged."""
        B, C = valid.shape
        if self.intensity_jitter <= 0:
            return torch.ones((n_views, B, C), dtype=like.dtype, device=like.device), None
        j = self.intensity_jitter
        n_real = int(valid.sum(dim=1).max())
        gain = self._uniform((n_views, B, n_real), 1 - j, 1 + j, gen)
        contrast = self._uniform((n_views, B, n_real), 1 - j, 1 + j, gen)
        gain, contrast = (spread_over_real_channels(d, valid, fill=1.0).to(like) for d in (gain, contrast))
        return gain * contrast, gain * (1 - contrast)

    def _draw_boxes(self, n: int, H: int, W: int, scale: tuple[float, float], gen: torch.Generator | None
                    ) -> _Boxes:
        """n boxes and orientations. As torchvision's RandomResizedCrop: area ~ U(scale) * H * W and
        log(w / h) ~ U(log ratio), sides rounded to whole pixels, the first of _BOX_ATTEMPTS draws that
        fits (else the whole image), at a uniform whole-pixel position."""
        area = self._uniform((n, _BOX_ATTEMPTS), *scale, gen) * H * W
        ratio = self._uniform((n, _BOX_ATTEMPTS), math.log(self.ratio[0]), math.log(self.ratio[1]), gen).exp()
        w_try, h_try = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
        fits = (w_try >= 1) & (w_try <= W) & (h_try >= 1) & (h_try <= H)
        first = fits.long().argmax(dim=1, keepdim=True)  # first attempt that fits
        found = fits.any(dim=1)
        w = torch.where(found, w_try.gather(1, first)[:, 0], W)
        h = torch.where(found, h_try.gather(1, first)[:, 0], H)
        x0 = (self._uniform((n,), 0.0, 1.0, gen) * (W - w + 1)).long().clamp_max(W - w)
        y0 = (self._uniform((n,), 0.0, 1.0, gen) * (H - h + 1)).long().clamp_max(H - h)

        device = area.device
        k = (torch.randint(0, 4, (n,), generator=gen, device=device) if self.rot90
             else torch.zeros(n, dtype=torch.long, device=device))
        if self.flip:
            fx = torch.randint(0, 2, (n,), generator=gen, device=device).bool()
            fy = torch.randint(0, 2, (n,), generator=gen, device=device).bool()
        else:
            fx = fy = torch.zeros(n, dtype=torch.bool, device=device)
        return _Boxes(x0, y0, w, h, transpose=k % 2 == 1, **_orientation_flips(k, fx, fy))

    @staticmethod
    def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
        # Draw on the generator's device so a seeded CPU generator gives the same crops on any device.
        device = gen.device if gen is not None else None
        return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)

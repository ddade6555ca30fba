"""Block masking of a grid of patch tokens for masked-image modelling (BEiT / iBOT / DINOv2 style):
rectangular blocks of random area and aspect ratio are stacked until an image's masked fraction
reaches a ratio drawn for that image. Batched over images; seeded through a torch.Generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BlockMaskGenerator:
    """Per image: with probability `mask_sample_probability` draw a ratio r ~ U(mask_ratio_min_max) and mask
    exactly n = round(r * N) of the N = H * W patches (n clamped so that n / N stays within the bounds), else
    mask nothing.

    The masked set is built from rectangles, as BEiT/DINOv2 do: each round proposes one block per image
    (area ~ U(min_block_patches, min(remaining, max_block_fraction * N)), aspect ratio log-uniform in
    `block_aspect_ratio`) and accepts it where it adds >= 1 and <= the remaining number of patches. All
    images are handled together with tensor ops, `max_rounds` rounds at most; whatever a hard image still
    lacks afterwards (rare: small remainders that no block fits) is topped up with random single patches,
    so the count is always exact."""

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        min_block_patches: int = 4,
        max_block_fraction: float = 0.5,
        block_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3),
        max_rounds: int = 32,
    ):
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        lo, hi = (float(v) for v in mask_ratio_min_max)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}")
        if not 0.0 <= mask_sample_probability <= 1.0:
            raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}")
        if min_block_patches < 1 or not 0.0 < max_block_fraction <= 1.0 or max_rounds < 0:
            raise ValueError("need min_block_patches >= 1, 0 < max_block_fraction <= 1, max_rounds >= 0")
        if not 0.0 < block_aspect_ratio[0] <= block_aspect_ratio[1]:
            raise ValueError(f"block_aspect_ratio must satisfy 0 < lo <= hi, got {block_aspect_ratio}")
        self.ratio = (lo, hi)
        self.probability = float(mask_sample_probability)
        self.min_block = int(min_block_patches)
        self.max_block = max(1, int(max_block_fraction * self.num_patches))
        self.log_aspect = (math.log(block_aspect_ratio[0]), math.log(block_aspect_ratio[1]))
        self.max_rounds = int(max_rounds)
        # Integer counts whose fraction lies inside the ratio bounds (empty when the grid is too coarse).
        n = self.num_patches
        self._count_bounds = (math.ceil(lo * n - 1e-9), math.floor(hi * n + 1e-9))

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """-> (batch_size, H * W) bool, True = masked, patches row-major. Drawn on the generator's device
        (CPU by default) and moved to `device`."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        B, H, W, N = batch_size, self.height, self.width, self.num_patches

        def uniform(shape: tuple[int, ...], lo: float | Tensor = 0.0, hi: float | Tensor = 1.0) -> Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=generator, device=gen_device)

        masked_image = uniform((B,)) < self.probability
        target = torch.round(uniform((B,), *self.ratio) * N)
        low, high = self._count_bounds
        if low <= high:
            target = target.clamp(low, high)
        target = torch.where(masked_image, target, torch.zeros_like(target)).long()  # (B,)

        rows = torch.arange(H, device=gen_device).view(1, H, 1)
        cols = torch.arange(W, device=gen_device).view(1, 1, W)
        mask = torch.zeros(B, H, W, dtype=torch.bool, device=gen_device)
        count = torch.zeros(B, dtype=torch.long, device=gen_device)
        for _ in range(self.max_rounds):
            remaining = target - count
            active = remaining > 0
            if not bool(active.any()):
                break
            rem = remaining.clamp_min(1).float()
            area = uniform((B,), torch.minimum(rem, torch.tensor(float(self.min_block))),
                           torch.minimum(rem, torch.tensor(float(self.max_block))))
            aspect = uniform((B,), *self.log_aspect).exp()
            h = torch.sqrt(area * aspect).round().clamp(1, H).long()
            w = torch.sqrt(area / aspect).round().clamp(1, W).long()
            top = (uniform((B,)) * (H - h + 1).float()).floor().long()
            left = (uniform((B,)) * (W - w + 1).float()).floor().long()
            block = ((rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))
                     & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1)))
            new = block & ~mask
            n_new = new.flatten(1).sum(dim=1)
            accept = active & (n_new > 0) & (n_new <= remaining)
            mask |= new & accept.view(B, 1, 1)
            count += torch.where(accept, n_new, torch.zeros_like(n_new))

        mask = mask.flatten(1)
        remaining = target - count
        if bool((remaining > 0).any()):
            # Rank the unmasked patches randomly and take the first `remaining` of them.
            scores = uniform((B, N)).masked_fill(mask, float("inf"))
            rank = scores.argsort(dim=1).argsort(dim=1)
            mask |= rank < remaining.view(B, 1)
        return mask.to(device) if device is not None else mask

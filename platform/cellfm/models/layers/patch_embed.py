"""Non-overlapping patch embedding and the patch grid of an image size."""

from __future__ import annotations

from torch import Tensor, nn


def grid_of(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image size (int = square, or (H, W)); H and W must be multiples of patch_size."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}")
    return h // patch_size, w // patch_size


class PatchEmbed(nn.Conv2d):
    """Conv2d(in_chans -> embed_dim, kernel = stride = patch_size) that returns the patch grid as a token
    sequence. A Conv2d subclass rather than a wrapper, so its parameters keep the names
    `<name>.weight` / `<name>.bias` of the plain convolution it replaces."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) -> (B, (H / p) * (W / p), embed_dim), grid positions row-major."""
        return super().forward(x).flatten(2).transpose(1, 2)

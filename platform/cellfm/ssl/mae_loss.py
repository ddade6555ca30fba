"""The channel-agnostic MAE's reconstruction loss (Phenom): mean squared error over the masked patches plus a
Fourier-domain term, the L1 distance between the magnitudes of the 2-D FFTs of the reconstructed and the original
channel images (Phenom mixes it in at weight 0.01)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, L, p * p): per channel the patches of the grid in row-major order, each patch's
    pixels row-major (the token order of the patch embedding)."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, C, h * w, p * p)


def unpatchify(patches: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """The inverse of `patchify`: (B, C, L, p * p) with L = h * w -> (B, C, h * p, w * p)."""
    B, C = patches.shape[:2]
    h, w = grid
    p = patch_size
    x = patches.reshape(B, C, h, w, p, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, C, h * p, w * p)


class MAELoss(nn.Module):
    """total = mse + fourier_weight * fourier, with

    mse: mean over the masked tokens (of real channels) of the mean squared error over the token's pixels;
    fourier: mean over the real (sample, channel) images of the mean over frequencies of
             | |FFT2(reconstruction)| - |FFT2(original)| |, where the reconstruction is the decoder's prediction
             of every patch (torch.fft.fft2, unnormalized)."""

    def __init__(self, patch_size: int, fourier_weight: float = 0.01):
        super().__init__()
        self.patch_size = patch_size
        self.fourier_weight = fourier_weight

    def forward(self, prediction: Tensor, target: Tensor, token_mask: Tensor, channel_mask: Tensor | None,
                grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """prediction, target (B, C, L, p * p); token_mask (B, C, L) bool, True = masked (the tokens the loss
        scores; a padded channel's tokens are left out whatever it says); channel_mask (B, C) bool or None (all
        real); grid (h, w) with L = h * w. Returns (total, mse, fourier), scalars."""
        prediction, target = prediction.float(), target.float()
        real = (torch.ones(prediction.shape[:2], dtype=torch.bool, device=prediction.device)
                if channel_mask is None else channel_mask)
        scored = (token_mask & real[:, :, None]).to(prediction.dtype)
        per_token = ((prediction - target) ** 2).mean(dim=-1)
        mse = (per_token * scored).sum() / scored.sum().clamp_min(1.0)

        magnitude = torch.fft.fft2(unpatchify(prediction, grid, self.patch_size)).abs()
        original = torch.fft.fft2(unpatchify(target, grid, self.patch_size)).abs()
        per_image = (magnitude - original).abs().mean(dim=(-2, -1))  # (B, C)
        weights = real.to(per_image.dtype)
        fourier = (per_image * weights).sum() / weights.sum()
        return mse + self.fourier_weight * fourier, mse, fourier

"""Baseline: every channel alone through one shared 1-channel ViT; embeddings averaged over channels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.models.layers import check_channel_mask, check_image, check_patch_mask, grid_of, normalize_channel_names
from cellfm.models.vit import VisionTransformer


class SingleChannelViT(nn.Module):
    """`single_channel`: a VisionTransformer(in_chans=1) run on each real channel plane independently
    (cost linear in C); cls, patch and register outputs are averaged over the sample's real channels
    (masked channels are not computed). Exactly invariant to channel order; names are not used."""

    def __init__(self, **vit_kwargs):
        """vit_kwargs go to VisionTransformer (img_size, patch_size, embed_dim, depth, num_heads, ...)."""
        super().__init__()
        vit_kwargs.pop("in_chans", None)
        self.vit = VisionTransformer(in_chans=1, **vit_kwargs)
        self.embed_dim = self.vit.embed_dim
        self.patch_size = self.vit.patch_size

    def num_patch_tokens(self, img_size) -> int:
        return self.vit.num_patch_tokens(img_size)

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        """patch_mask (B, L) masks the same grid positions in every channel."""
        B, C, H, W = check_image(x, "SingleChannelViT")
        check_channel_mask(channel_mask, B, C)
        normalize_channel_names(channel_names, B, C, "SingleChannelViT")
        grid = grid_of((H, W), self.patch_size)
        check_patch_mask(patch_mask, B, grid[0] * grid[1])
        valid = torch.ones(B, C, dtype=torch.bool, device=x.device) if channel_mask is None else channel_mask
        b_idx, c_idx = valid.nonzero(as_tuple=True)
        out = self.vit(x[b_idx, c_idx].unsqueeze(1), patch_mask=None if patch_mask is None else patch_mask[b_idx])
        count = valid.sum(dim=1).to(x.dtype)

        def mean(t: Tensor) -> Tensor:
            summed = t.new_zeros((B,) + t.shape[1:]).index_add_(0, b_idx, t)
            return summed / count.view((B,) + (1,) * (t.ndim - 1))

        return {key: mean(value) for key, value in out.items()}

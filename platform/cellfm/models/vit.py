"""A plain DINOv2-style ViT over a fixed number of input channels (the vit_rgb and single_channel
baselines, and the reference of the parameter ladder)."""

from __future__ import annotations

from torch import Tensor, nn

from cellfm.models.layers import (
    PatchEmbed,
    ViTTrunk,
    apply_patch_mask,
    check_channel_mask,
    check_image,
    check_patch_mask,
    drop_path_rates,
    grid_of,
    zero_padding,
)


class VisionTransformer(ViTTrunk):
    """PatchEmbed(in_chans -> D) on the image, then the ViT trunk (CLS with a learned position, optional
    registers, learned patch positions interpolated for other image sizes, pre-norm blocks, final LayerNorm).

    ViT-S/16 (3 channels, 224^2, no head) has 21.68M parameters, ViT-B/16 85.82M, ViT-L/16 303.35M."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 0,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        qkv_bias: bool = True,
    ):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                         block_drop_path=drop_path_rates(drop_path_rate, depth), mlp_ratio=mlp_ratio,
                         num_register_tokens=num_register_tokens, layerscale_init=layerscale_init, qkv_bias=qkv_bias)
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.init_weights()

    def input_embedding(self) -> list[nn.Module]:
        return [self.patch_embed]

    def prepare_tokens(self, x: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """(B, in_chans, H, W) -> (B, L, D) patch tokens (masked ones replaced by mask_token), positions added."""
        B, C, H, W = check_image(x, "VisionTransformer")
        if C != self.in_chans:
            raise ValueError(f"VisionTransformer was built for {self.in_chans} input channels, got {C}")
        grid = grid_of((H, W), self.patch_size)
        check_patch_mask(patch_mask, B, grid[0] * grid[1])
        tokens = apply_patch_mask(self.patch_embed(x), patch_mask, self.mask_token)
        return tokens + self.positions(grid)

    def forward(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """x: (B, in_chans, H, W). channel_names is ignored (the channel layout is fixed); channel_mask
        (B, in_chans) zeroes the masked input channels. Returns final-normed cls (B, D), patch (B, L, D),
        registers (B, R, D)."""
        check_channel_mask(channel_mask, x.shape[0], x.shape[1])
        return self.forward_trunk(self.prepare_tokens(zero_padding(x, channel_mask), patch_mask))

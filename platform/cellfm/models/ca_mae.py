"""Baseline: the channel-agnostic masked autoencoder's encoder (CA-MAE; Kraus et al., CVPR 2024, Recursion's
Phenom; reference github recursionpharma/maes_microscopy): each image standardized per channel, one patch
embedding shared by every channel, the same fixed 2-D sin-cos positions for every channel, no parameter tied to
a channel (so it takes any channel set, in any order), and a ViT over all L*C patch tokens + CLS. Pre-trained
with `ssl.objective: mae` (`cellfm.train.masked_autoencoding`): the encoder sees a random quarter of the tokens,
a light decoder reconstructs the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from cellfm.models.layers import (
    PatchEmbed,
    ViTTrunk,
    apply_patch_mask,
    check_channel_mask,
    check_image,
    check_patch_mask,
    drop_path_rates,
    grid_of,
    mean_over_channels,
    normalize_channel_names,
    zero_padding,
)

# InstanceNorm2d's default eps: a constant plane standardizes to 0.
STANDARDIZE_EPS = 1e-5


def self_standardize(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): every image's every channel shifted to mean 0 and scaled to variance 1 over
    its own pixels (biased variance + 1e-5), Phenom's self-standardization; padded (zero) planes stay 0."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    var = x.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + STANDARDIZE_EPS)


class ChannelAgnosticMAE(ViTTrunk):
    """`ca_mae`. Tokens: patch_embed(standardized channel c) + sincos(position), for every channel; sequence
    [CLS, registers, L*C patch tokens] through the trunk; padded channels (channel_mask False) are excluded as
    attention keys. Output `patch` is (B, L, D), per grid position the mean over the real channels (as
    ChannelViT), so the evaluation's feature (CLS concatenated with the mean patch token) is invariant to the
    order of the channels."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
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
                         num_register_tokens=num_register_tokens, layerscale_init=layerscale_init, qkv_bias=qkv_bias,
                         sincos_positions=True)
        self.patch_embed = PatchEmbed(1, embed_dim, patch_size)  # shared by every channel
        self.init_weights()

    def input_embedding(self) -> list:
        return [self.patch_embed]

    def channel_tokens(self, x: Tensor, channel_mask: Tensor | None,
                       patch_mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> ((B, C, L, D) tokens with positions, the patch grid). patch_mask (B, L): that grid
        position's token is the mask token in every channel."""
        B, C, H, W = check_image(x, "CA-MAE")
        check_channel_mask(channel_mask, B, C)
        grid = grid_of((H, W), self.patch_size)
        L = grid[0] * grid[1]
        check_patch_mask(patch_mask, B, L)
        planes = self_standardize(zero_padding(x, channel_mask)).reshape(B * C, 1, H, W)
        tokens = self.patch_embed(planes).reshape(B, C, L, self.embed_dim)
        tokens = apply_patch_mask(tokens, None if patch_mask is None else patch_mask[:, None], self.mask_token)
        return tokens + self.positions(grid)[:, None], grid

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        """The common interface; channel_names are checked for shape only (CA-MAE never looks at names)."""
        B, C = x.shape[:2]
        normalize_channel_names(channel_names, B, C, "CA-MAE")
        tokens, grid = self.channel_tokens(x, channel_mask, patch_mask)
        L = grid[0] * grid[1]
        key_mask = None if channel_mask is None else channel_mask.repeat_interleave(L, dim=1)
        out = self.forward_trunk(tokens.reshape(B, C * L, self.embed_dim), key_mask=key_mask)
        out["patch"] = mean_over_channels(out["patch"].reshape(B, C, L, self.embed_dim), channel_mask)
        return out

    def encode_visible(self, x: Tensor, channel_mask: Tensor | None, token_mask: Tensor) -> dict[str, Tensor]:
        """MAE's encoder pass: only the visible tokens enter the trunk.

        x (B, C, H, W); channel_mask (B, C) bool or None; token_mask (B, C, L) bool, True = masked (hidden from
        the encoder); a padded channel's tokens must be masked. The K_b visible tokens of sample b are gathered
        in their (channel, position) order into (B, K, D), K = max_b K_b, the rest of a row padding.
        Returns {"cls": (B, D), "visible": (B, K, D) final-normed visible tokens, "visible_index": (B, K) long
        index c * L + l of each into the C*L tokens, "visible_mask": (B, K) bool, False = a padding row entry}."""
        tokens, grid = self.channel_tokens(x, channel_mask)
        B, C, L, D = tokens.shape
        if token_mask.shape != (B, C, L) or token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a bool tensor of shape {(B, C, L)}, got "
                             f"{token_mask.dtype} {tuple(token_mask.shape)}")
        if channel_mask is not None and not bool(token_mask[~channel_mask].all()):
            raise ValueError("token_mask leaves a token of a padded channel visible")
        visible = ~token_mask.reshape(B, C * L)
        # A stable sort puts each row's visible tokens first, in their original order.
        order = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices
        K = int(visible.sum(dim=1).max())
        index = order[:, :K]
        kept = visible.gather(1, index)
        gathered = tokens.reshape(B, C * L, D).gather(1, index[..., None].expand(B, K, D))
        out = self.forward_trunk(gathered, key_mask=kept)
        return {"cls": out["cls"], "visible": out["patch"], "visible_index": index, "visible_mask": kept}

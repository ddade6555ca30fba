"""The light decoder of the channel-agnostic MAE: from the encoder's visible tokens, a prediction of every
patch of every channel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.models.layers import Block, LayerNorm, init_weights_trunc_normal, sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """Visible encoder tokens, projected to the decoder width, go back to their places among the C*L tokens;
    every other place holds the mask token. Every token gets the fixed sin-cos position of its grid position
    and its channel's summary (a projection of the mean of that channel's visible tokens, zero when a channel
    has none), the CLS token is prepended, `depth` blocks run (padded channels are never attention keys), and
    a linear layer predicts each token's patch_size**2 pixels.

    The channel summary is the decoder's only cue to which channel a masked token belongs to: no parameter is
    tied to a channel index, so the whole model stays equivariant to channel order. (Phenom's CA-MAE decoder
    adds a learned token per input channel instead, tied to its 6 channels; the decoder is dropped after
    pre-training either way.)"""

    def __init__(self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, patch_size: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim))
        self.channel_summary = nn.Linear(decoder_dim, decoder_dim)
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, layerscale_init=None)
                                    for _ in range(depth))
        self.norm = LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, patch_size * patch_size)
        self.apply(init_weights_trunc_normal)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, cls: Tensor, visible: Tensor, visible_index: Tensor, visible_mask: Tensor,
                channel_mask: Tensor | None, channels: int, grid: tuple[int, int]) -> Tensor:
        """cls (B, D), visible (B, K, D), visible_index (B, K), visible_mask (B, K): as
        `ChannelAgnosticMAE.encode_visible` returns them; channel_mask (B, C) bool or None; channels = C;
        grid = (h, w), L = h * w. Returns (B, C, L, patch_size**2) predicted pixels of every token."""
        B, K, _ = visible.shape
        C, L, Dd = channels, grid[0] * grid[1], self.decoder_dim
        v = self.embed(visible) * visible_mask[..., None].to(visible.dtype)
        placed = v.new_zeros(B, C * L, Dd).scatter(1, visible_index[..., None].expand(B, K, Dd), v)
        is_visible = visible_mask.new_zeros(B, C * L).scatter(1, visible_index, visible_mask)
        tokens = torch.where(is_visible[..., None], placed, self.mask_token.to(v.dtype)).reshape(B, C, L, Dd)

        seen = is_visible.reshape(B, C, L, 1).to(v.dtype)
        summary = (placed.reshape(B, C, L, Dd) * seen).sum(dim=2) / seen.sum(dim=2).clamp_min(1.0)
        pos = sincos_pos_embed_2d(grid, Dd).to(v.device, v.dtype)
        tokens = tokens + pos[:, None] + self.channel_summary(summary)[:, :, None]

        h = torch.cat([self.embed(cls)[:, None], tokens.reshape(B, C * L, Dd)], dim=1)
        key_mask = None
        if channel_mask is not None:
            key_mask = torch.cat([channel_mask.new_ones(B, 1), channel_mask.repeat_interleave(L, dim=1)], dim=1)
        for blk in self.blocks:
            h = blk(h, key_mask)
        return self.predict(self.norm(h[:, 1:])).reshape(B, C, L, -1)

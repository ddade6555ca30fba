"""Attention across the channels at one patch position (CellRep's cheap channel mixing)."""

from __future__ import annotations

from torch import Tensor, nn

from cellfm.models.layers.attention import Attention
from cellfm.models.layers.layer_scale import LayerScale
from cellfm.models.layers.norm import LayerNorm


class ChannelAxialAttention(nn.Module):
    """Pre-norm residual attention whose sequence is the C channel tokens of one patch position:
    x + LS(Attn(LN(x))) over (B * L) sequences of length C. Cost per layer: the q/k/v/output projections of every
    token (4 D^2 multiply-adds) plus C^2 attention scores per position, instead of a transformer block's
    12 D^2 and (L C)^2. No MLP: an MLP acts on one token and mixes no channels; the trunk after the channel
    pooling has them at 1/C of the cost. Equivariant to channel order (no parameter depends on C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, layerscale_init: float | None = 1e-5):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()

    def forward(self, tokens: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """tokens (B, C, L, D); channel_mask optional (B, C) bool, False = padding (never attended to)
        -> (B, C, L, D)."""
        B, C, L, D = tokens.shape
        x = tokens.transpose(1, 2).reshape(B * L, C, D)
        key_mask = None if channel_mask is None else channel_mask[:, None, :].expand(B, L, C).reshape(B * L, C)
        x = x + self.ls(self.attn(self.norm(x), key_mask))
        return x.reshape(B, L, C, D).transpose(1, 2)

"""The pre-norm transformer block (DINOv2: layerscale and stochastic depth on both residual branches)."""

from __future__ import annotations

from torch import Tensor, nn

from cellfm.models.layers.attention import Attention
from cellfm.models.layers.drop_path import DropPath
from cellfm.models.layers.layer_scale import LayerScale
from cellfm.models.layers.mlp import Mlp
from cellfm.models.layers.norm import LayerNorm


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(Mlp(LN(x))))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layerscale_init: float | None = 1e-5,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D), key_mask: optional (B, N) bool (True = real token) -> (B, N, D)."""
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), key_mask)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

"""ViT building blocks shared by the channel-adaptive backbones (DINOv2 conventions:
pre-norm blocks, layerscale, stochastic depth, fused scaled-dot-product attention)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DINOv2 uses eps=1e-6 everywhere; the PyTorch default (1e-5) changes bf16 numerics slightly.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> same shape; each sample's branch is zeroed with probability drop_prob,
        survivors are rescaled by 1 / keep_prob so the expectation is unchanged."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Learned per-channel scaling of a residual branch, initialised small so deep models
    start close to the identity (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention (picks the fused kernel)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, D). key_mask: optional (B, N) bool, True = token may be attended to,
        False = padding (never used as a key). Every row needs at least one True, otherwise the
        softmax is over an empty set. Returns (B, N, D); padded positions still get (ignorable) outputs."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


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


def interpolate_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resampling of a learned 2-D positional embedding to another patch grid.

    pos_embed: (1, old_h * old_w, D) (patch positions only, row-major); old_grid / new_grid: (h, w).
    Returns (1, new_h * new_w, D); the input tensor itself when the grids match."""
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != old_h * old_w:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not match grid {tuple(old_grid)}")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    # Interpolate in fp32: bicubic on bf16 weights is lossy and not implemented on every backend.
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)


def init_weights_trunc_normal(module: nn.Module) -> None:
    """DINOv2 init for use with `model.apply`: Linear weights ~ trunc normal(std .02), biases 0.
    Convs and norms keep their PyTorch defaults, as in DINOv2."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Helpers shared by every backbone's forward (the common interface, DESIGN §4):
#   forward(x (B,C,H,W), channel_names=None, channel_mask=None, patch_mask=None)
#     -> {"cls": (B,D), "patch": (B,N,D), "registers": (B,R,D)}


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Linearly increasing stochastic-depth rates 0 .. rate over n blocks (plain floats: works on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def grid_of(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image size (int = square, or (H, W)); H and W must be multiples of patch_size."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}")
    return h // patch_size, w // patch_size


def check_image(x: Tensor, model: str) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"{model} expects (B, C, H, W) input, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if not 1 <= C:
        raise ValueError(f"{model} needs at least one channel, got shape {tuple(x.shape)}")
    return B, C, H, W


def check_channel_mask(channel_mask: Tensor | None, B: int, C: int) -> None:
    """channel_mask: (B, C) bool, True = real channel, False = padding / dropped; every sample needs a real channel."""
    if channel_mask is None:
        return
    if channel_mask.shape != (B, C) or channel_mask.dtype != torch.bool:
        raise ValueError(
            f"channel_mask must be a bool tensor of shape {(B, C)}, got {channel_mask.dtype} {tuple(channel_mask.shape)}"
        )
    if not bool(channel_mask.any(dim=1).all()):
        raise ValueError("channel_mask has a sample with no real channel")


def check_patch_mask(patch_mask: Tensor | None, B: int, N: int) -> None:
    """patch_mask: (B, N) bool over the backbone's output patch tokens, True = replace by mask_token."""
    if patch_mask is None:
        return
    if patch_mask.shape != (B, N) or patch_mask.dtype != torch.bool:
        raise ValueError(
            f"patch_mask must be a bool tensor of shape {(B, N)} (N = num_patch_tokens), "
            f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
        )


def normalize_channel_names(channel_names, B: int, C: int, model: str) -> list[list[str]] | None:
    """Accepts None, one list of C names (shared by the batch) or B lists of C names; returns B lists or None."""
    if channel_names is None:
        return None
    names = list(channel_names)
    if names and all(isinstance(n, str) for n in names):
        names = [names] * B
    if len(names) != B or any(len(row) != C for row in names):
        raise ValueError(
            f"channel_names must give {C} names for each of the {B} samples (or one list of {C} names), "
            f"got {len(names)} rows of lengths {[len(row) for row in names][:8]}"
        )
    return [[str(n) for n in row] for row in names]


def apply_patch_mask(tokens: Tensor, patch_mask: Tensor | None, mask_token: Tensor) -> Tensor:
    """tokens (B, N, D), patch_mask (B, N) bool, mask_token (1, D) -> tokens with masked rows = mask_token
    (iBOT / DINOv2: replaced before the positional embedding is added)."""
    if patch_mask is None:
        return tokens
    return torch.where(patch_mask.unsqueeze(-1), mask_token.to(tokens.dtype).unsqueeze(0), tokens)


def zero_touch(params) -> Tensor:
    """A scalar 0 that depends on every given parameter. Added to an output, it keeps parameters that a
    particular forward does not use (mask_token without patch_mask, an absent-group token) in the autograd
    graph, so DDP with find_unused_parameters=False does not stall waiting for their gradients."""
    total = None
    for p in params:
        if p is None or not p.requires_grad:
            continue
        term = p.reshape(-1)[:1].sum()
        total = term if total is None else total + term
    return 0.0 if total is None else total * 0.0


class VisionTransformer(nn.Module):
    """Plain DINOv2-style ViT over a fixed number of input channels: Conv2d(in_chans->D, k=s=p) patch
    embedding, CLS (+ learned CLS position), optional register tokens (no position), learned patch
    positional embedding interpolated for other image sizes, pre-norm blocks with layerscale and
    drop-path, final LayerNorm. Used by the vit_rgb and single_channel baselines.

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
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_register_tokens = num_register_tokens
        self.grid_size = grid_of(img_size, patch_size)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens > 0 else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # DINOv2: zeros
        drop_rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=r, layerscale_init=layerscale_init)
            for r in drop_rates
        )
        self.norm = LayerNorm(embed_dim)
        for p in (self.pos_embed, self.cls_token, self.cls_pos_embed, self.register_tokens):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights_trunc_normal)

    def num_patch_tokens(self, img_size: int | tuple[int, int]) -> int:
        h, w = grid_of(img_size, self.patch_size)
        return h * w

    def prepare_tokens(self, x: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """(B, in_chans, H, W) -> (B, 1 + R + L, D): [CLS, registers, patches], positions added."""
        B, C, H, W = check_image(x, "VisionTransformer")
        if C != self.in_chans:
            raise ValueError(f"VisionTransformer was built for {self.in_chans} input channels, got {C}")
        grid = grid_of((H, W), self.patch_size)
        check_patch_mask(patch_mask, B, grid[0] * grid[1])
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D)
        tokens = apply_patch_mask(tokens, patch_mask, self.mask_token)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, self.grid_size, grid)
        prefix = [(self.cls_token + self.cls_pos_embed).expand(B, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, tokens], dim=1)

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
        if channel_mask is not None:
            check_channel_mask(channel_mask, x.shape[0], x.shape[1])
            x = x.masked_fill(~channel_mask[:, :, None, None], 0.0)
        h = self.prepare_tokens(x, patch_mask)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        R = self.num_register_tokens
        cls = h[:, 0]
        if patch_mask is None and torch.is_grad_enabled():
            cls = cls + zero_touch([self.mask_token])
        return {"cls": cls, "registers": h[:, 1 : 1 + R], "patch": h[:, 1 + R :]}

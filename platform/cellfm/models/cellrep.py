"""CellRep: a channel-adaptive ViT that embeds every channel with shared weights, lets the
channels talk in a small mixing transformer, then pools channels away before a standard ViT."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.models.input_norm import InputNorm
from cellfm.models.vit import (
    Block,
    LayerNorm,
    check_patch_mask,
    drop_path_rates,
    grid_of,
    init_weights_trunc_normal,
    interpolate_pos_embed,
    normalize_channel_names,
    zero_touch,
)


class CellRep(nn.Module):
    """CellRep: content-aware channel embedding + shared per-channel patch embedding + channel-mixing transformer
    over L*C tokens + mean pooling over channels + ViT trunk (DESIGN §4).

    No parameter is tied to a channel index, so one model accepts any number and order of channels;
    with pooling_ratio=1 it is exactly invariant to channel order."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        mixer_depth: int = 2,
        channel_encoder_dim: int = 64,
        channel_encoder_stride: int = 2,
        pooling_ratio: int = 1,
        num_register_tokens: int = 0,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        qkv_bias: bool = True,
        input_norm: str = "none",
    ):
        """input_norm: optional in-model per-channel preprocessing, "none" | "percentile" (1-99th percentile
        clip to [0, 1]) | "adaptive_hist" (min-max then CLAHE), see cellfm.models.input_norm."""
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        if pooling_ratio < 1:
            raise ValueError(f"pooling_ratio must be >= 1, got {pooling_ratio}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pooling_ratio = pooling_ratio
        self.num_register_tokens = num_register_tokens
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.input_norm = InputNorm(input_norm)

        # Content-aware channel embedding: what a channel looks like, never which index it has.
        # Strided: the embedding is a global average of local texture responses, so a stride-2 map
        # carries the same statistics at a quarter of the cost of the model's largest activation
        # (B*C*k*H*W at stride 1: about half of a tiny model's forward+backward time).
        self.channel_encoder = nn.Sequential(
            nn.Conv2d(1, channel_encoder_dim, kernel_size=3, stride=channel_encoder_stride, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(channel_encoder_dim, embed_dim),
        )
        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.token_norm = LayerNorm(embed_dim)
        self.mixer = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, layerscale_init=layerscale_init)
            for _ in range(mixer_depth)
        )

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # None rather than a 0-sized parameter: empty parameters trip up some optimizer/ZeRO code paths.
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens > 0 else None
        )
        drop_rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=r, layerscale_init=layerscale_init)
            for r in drop_rates
        )
        self.norm = LayerNorm(embed_dim)
        # iBOT: replaces a pooled token (before the trunk); the token's position embedding is added back.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        for p in (self.pos_embed, self.cls_token, self.cls_pos_embed, self.register_tokens):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights_trunc_normal)

    def num_patch_tokens(self, img_size: int | tuple[int, int]) -> int:
        """N of the output `patch` (and of patch_mask): pooling_ratio * L."""
        h, w = grid_of(img_size, self.patch_size)
        return self.pooling_ratio * h * w

    def forward(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """x: (B, C, H, W) float, any C >= 1, any H, W divisible by patch_size (pos embed interpolated).
        channel_names: accepted for the common interface and checked for shape only; CellRep never looks
        at names (its channel embedding is content-aware).
        patch_mask: optional (B, k*L) bool; True = that pooled token is replaced by mask_token (+ its
        position embedding) before the ViT trunk (iBOT).
        channel_mask: optional (B, C) bool, True = real channel, False = padding (padded channels must have NO effect:
        excluded as attention keys in the mixer and from the channel pooling).
        Returns {"cls": (B, D) final-normed CLS, "patch": (B, k*L, D) final-normed patch tokens,
                 "registers": (B, R, D)}.
        Patch tokens are ordered slot-major: index g*L + i is pooled channel slot g at grid position i (row-major)."""
        h = self.prepare_tokens(x, channel_names, channel_mask, patch_mask)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        R = self.num_register_tokens
        cls = h[:, 0]
        if patch_mask is None and torch.is_grad_enabled():
            cls = cls + zero_touch([self.mask_token])  # keeps DDP (find_unused_parameters=False) happy
        return {"cls": cls, "registers": h[:, 1 : 1 + R], "patch": h[:, 1 + R :]}

    def prepare_tokens(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> Tensor:
        """Everything before the ViT trunk: (B, C, H, W) -> (B, 1 + R + k*L, D) = [CLS, registers, pooled tokens]."""
        if x.ndim != 4:
            raise ValueError(f"CellRep expects (B, C, H, W) input, got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by patch_size={p}")
        if channel_mask is not None:
            if channel_mask.shape != (B, C) or channel_mask.dtype != torch.bool:
                raise ValueError(
                    f"channel_mask must be a bool tensor of shape {(B, C)}, "
                    f"got {channel_mask.dtype} {tuple(channel_mask.shape)}"
                )
            if not bool(channel_mask.any(dim=1).all()):
                raise ValueError("channel_mask has a sample with no real channel")
            # Zero padding before any compute: NaN/inf garbage would leak through 0-weight attention (0 * NaN).
            x = x.masked_fill(~channel_mask[:, :, None, None], 0.0)
        normalize_channel_names(channel_names, B, C, "CellRep")
        x = self.input_norm(x)

        grid = (H // p, W // p)
        L = grid[0] * grid[1]
        D = self.embed_dim
        planes = x.reshape(B * C, 1, H, W)
        content = self.channel_encoder(planes).reshape(B, C, 1, D)
        tokens = self.patch_embed(planes).flatten(2).transpose(1, 2).reshape(B, C, L, D)
        pos = interpolate_pos_embed(self.pos_embed, self.grid_size, grid)  # same for every channel
        tokens = self.token_norm(tokens + content + pos.unsqueeze(1)).reshape(B, C * L, D)

        key_mask = None if channel_mask is None else channel_mask.repeat_interleave(L, dim=1)
        for blk in self.mixer:
            tokens = blk(tokens, key_mask)

        weights = self._pooling_weights(channel_mask, B, C, x.device).to(tokens.dtype)
        pooled = torch.einsum("bgc,bcld->bgld", weights, tokens.reshape(B, C, L, D)).reshape(B, -1, D)
        if patch_mask is not None:
            check_patch_mask(patch_mask, B, pooled.shape[1])
            masked = (self.mask_token + pos).repeat(1, self.pooling_ratio, 1)  # (1, k*L, D)
            pooled = torch.where(patch_mask.unsqueeze(-1), masked.to(pooled.dtype), pooled)

        prefix = [(self.cls_token + self.cls_pos_embed).expand(B, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, pooled], dim=1)

    def _pooling_weights(self, channel_mask: Tensor | None, B: int, C: int, device: torch.device) -> Tensor:
        """(B, k, C) averaging weights: the n real channels of a sample (in order, padding skipped) are split
        into k contiguous near-equal groups; with n < k, slots repeat channels (slot g takes channel g*n//k)
        so every slot holds a real channel. Rows sum to 1; padded channels get weight 0."""
        k = self.pooling_ratio
        valid = torch.ones(B, C, dtype=torch.bool, device=device) if channel_mask is None else channel_mask
        n = valid.sum(dim=1, keepdim=True)  # (B, 1)
        rank = valid.cumsum(dim=1) - 1  # position of each real channel among the real ones
        slot = torch.arange(k, device=device)[None, :, None]  # (1, k, 1)
        n, rank = n[:, None], rank[:, None]  # (B, 1, 1), (B, 1, C)
        member = torch.where(n >= k, rank * k // n == slot, rank == slot * n // k) & valid[:, None]
        member = member.float()
        return member / member.sum(dim=2, keepdim=True)

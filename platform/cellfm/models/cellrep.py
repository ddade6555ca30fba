"""CellRep: a channel-adaptive ViT that embeds every channel with shared weights, lets the
channels talk in a small mixing transformer, then pools channels away before a standard ViT.

Options that trade the mixer's cost (2.07x a ViT-S/16's FLOPs at 5 channels, 224 px, by default) or change what
the pooling keeps: `channel_mixer="axial"` (attention across the channels at each patch position, no MLP),
`channel_pool_after` (pool after the first k mixer layers; the rest run on the pooled tokens) and
`channel_pooling="attention"` (k content-chosen channel slots instead of the plain mean)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.models.input_norm import InputNorm
from cellfm.models.layers import (
    Block,
    ChannelAttentionPool,
    ChannelAxialAttention,
    LayerNorm,
    PatchEmbed,
    ViTTrunk,
    apply_patch_mask,
    check_channel_mask,
    check_image,
    check_patch_mask,
    drop_path_rates,
    grid_of,
    normalize_channel_names,
    zero_padding,
)


class CellRep(ViTTrunk):
    """CellRep: content-aware channel embedding + shared per-channel patch embedding + channel-mixing transformer
    over L*C tokens (or channel-axial attention layers) + mean (or attention) pooling over channels + ViT trunk.

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
        channel_mixer: str = "full",
        channel_pool_after: int | None = None,
        channel_pooling: str = "mean",
        channel_pooling_queries: int = 4,
    ):
        """input_norm: optional in-model per-channel preprocessing, "none" | "percentile" (1-99th percentile
        clip to [0, 1]) | "adaptive_hist" (min-max then CLAHE), see cellfm.models.input_norm.
        channel_mixer: "full" = transformer blocks over all L*C tokens; "axial" = ChannelAxialAttention layers
        (each token attends to the channels at its own patch position; no MLP).
        channel_pool_after: mixer layers run before the channel pooling (None = all of them); the others run
        after it, on the pooled k*L tokens (full blocks: ordinary spatial blocks; axial: across the k slots).
        channel_pooling: "mean" (per slot, the mean of its channels) or "attention" (ChannelAttentionPool with
        `channel_pooling_queries` content-chosen slots; needs pooling_ratio=1)."""
        if pooling_ratio < 1:
            raise ValueError(f"pooling_ratio must be >= 1, got {pooling_ratio}")
        if channel_mixer not in ("full", "axial"):
            raise ValueError(f"channel_mixer must be 'full' or 'axial', got {channel_mixer!r}")
        if channel_pool_after is not None and not 0 <= channel_pool_after <= mixer_depth:
            raise ValueError(f"channel_pool_after must be in [0, mixer_depth={mixer_depth}] or None, "
                             f"got {channel_pool_after}")
        if channel_pooling not in ("mean", "attention"):
            raise ValueError(f"channel_pooling must be 'mean' or 'attention', got {channel_pooling!r}")
        if channel_pooling == "attention" and pooling_ratio != 1:
            raise ValueError(f"channel_pooling='attention' makes one token per position; needs pooling_ratio=1, "
                             f"got {pooling_ratio}")
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                         block_drop_path=drop_path_rates(drop_path_rate, depth), mlp_ratio=mlp_ratio,
                         num_register_tokens=num_register_tokens, layerscale_init=layerscale_init, qkv_bias=qkv_bias)
        self.pooling_ratio = pooling_ratio
        self.channel_mixer = channel_mixer
        self.channel_pool_after = mixer_depth if channel_pool_after is None else channel_pool_after
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
        self.patch_embed = PatchEmbed(1, embed_dim, patch_size)
        self.token_norm = LayerNorm(embed_dim)
        if channel_mixer == "full":
            self.mixer = nn.ModuleList(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, layerscale_init=layerscale_init)
                for _ in range(mixer_depth)
            )
        else:
            self.mixer = nn.ModuleList(
                ChannelAxialAttention(embed_dim, num_heads, qkv_bias=qkv_bias, layerscale_init=layerscale_init)
                for _ in range(mixer_depth)
            )
        # None with mean pooling: the default module tree (and its seeded init) is today's CellRep's.
        self.channel_pool = (ChannelAttentionPool(embed_dim, channel_pooling_queries)
                             if channel_pooling == "attention" else None)
        self.init_weights()

    def token_parameters(self) -> list[nn.Parameter]:
        return [*super().token_parameters(), *([] if self.channel_pool is None else [self.channel_pool.queries])]

    def input_embedding(self) -> list[nn.Module]:
        """Channel encoder, patch embedding, token norm, channel mixer and channel pooling: together they turn
        the L*C tokens into the trunk's input."""
        pool = [] if self.channel_pool is None else self.channel_pool.weight_modules()
        return [self.channel_encoder, self.patch_embed, self.token_norm, self.mixer, *pool]

    def num_patch_tokens(self, img_size: int | tuple[int, int]) -> int:
        """N of the output `patch` (and of patch_mask): pooling_ratio * L."""
        return self.pooling_ratio * super().num_patch_tokens(img_size)

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
        return self.forward_trunk(self.prepare_tokens(x, channel_names, channel_mask, patch_mask))

    def prepare_tokens(
        self,
        x: Tensor,
        channel_names=None,
        channel_mask: Tensor | None = None,
        patch_mask: Tensor | None = None,
    ) -> Tensor:
        """Everything before the ViT trunk: (B, C, H, W) -> (B, k*L, D) pooled tokens, positions included."""
        B, C, H, W = check_image(x, "CellRep")
        grid = grid_of((H, W), self.patch_size)
        check_channel_mask(channel_mask, B, C)
        normalize_channel_names(channel_names, B, C, "CellRep")
        x = self.input_norm(zero_padding(x, channel_mask))

        L = grid[0] * grid[1]
        D = self.embed_dim
        planes = x.reshape(B * C, 1, H, W)
        content = self.channel_encoder(planes).reshape(B, C, 1, D)
        tokens = self.patch_embed(planes).reshape(B, C, L, D)
        pos = self.positions(grid)  # same for every channel
        tokens = self.token_norm(tokens + content + pos.unsqueeze(1))  # (B, C, L, D)

        k = self.channel_pool_after
        for layer in self.mixer[:k]:
            tokens = self._mix(layer, tokens, channel_mask)
        if self.channel_pool is None:
            weights = self._pooling_weights(channel_mask, B, C, x.device).to(tokens.dtype)
            pooled = torch.einsum("bgc,bcld->bgld", weights, tokens)  # (B, k, L, D)
        else:
            pooled = self.channel_pool(tokens, channel_mask).unsqueeze(1)  # (B, 1, L, D)
        for layer in self.mixer[k:]:
            pooled = self._mix(layer, pooled, None)
        pooled = pooled.reshape(B, -1, D)
        check_patch_mask(patch_mask, B, pooled.shape[1])
        # iBOT: a masked pooled token becomes mask_token + its grid position (positions entered before the mixer).
        return apply_patch_mask(pooled, patch_mask, (self.mask_token + pos).repeat(1, self.pooling_ratio, 1))

    def _mix(self, layer: nn.Module, tokens: Tensor, slot_mask: Tensor | None) -> Tensor:
        """One mixer layer on (B, S, L, D) tokens (S channels, or S pooled slots); slot_mask (B, S) bool or None."""
        if self.channel_mixer == "axial":
            return layer(tokens, slot_mask)
        B, S, L, D = tokens.shape
        key_mask = None if slot_mask is None else slot_mask.repeat_interleave(L, dim=1)
        return layer(tokens.reshape(B, S * L, D), key_mask).reshape(B, S, L, D)

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

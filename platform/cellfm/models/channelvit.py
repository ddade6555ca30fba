"""Baseline: ChannelViT (Bao et al., ICLR 2024; reference github insitro/ChannelViT): one shared
single-channel patch embedding, a learned embedding per known channel name, the same positional
embedding for every channel, and a ViT over all L*C patch tokens + CLS. Cost grows super-linearly in
C (attention over L*C tokens). Training uses hierarchical channel sampling (HCS,
`cellfm.ssl.channel_sampling`, applied by the training step as the student's channel mask)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellfm.models.vit import (
    Block,
    LayerNorm,
    check_channel_mask,
    drop_path_rates,
    check_image,
    check_patch_mask,
    grid_of,
    init_weights_trunc_normal,
    interpolate_pos_embed,
    normalize_channel_names,
    zero_touch,
)


class ChannelViT(nn.Module):
    """`channelvit`. Tokens: patch_embed(channel c) + channel_embed[name(c)] + pos, for every channel;
    sequence [CLS, registers, L*C patch tokens] through `depth` blocks; padded / dropped channels
    (channel_mask False) are excluded as attention keys.

    Output `patch` is (B, L, D): for each grid position, the mean over the sample's real channels of the
    final-normed channel tokens (so N = L does not depend on C, as the iBOT masking code needs)."""

    def __init__(
        self,
        channel_vocabulary: list[str],
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
        """channel_vocabulary: the channel names that get a learned embedding (config
        `model.channel_vocabulary`); any other name is an error at forward."""
        super().__init__()
        vocab = [str(v) for v in channel_vocabulary or []]
        if not vocab:
            raise ValueError(
                "ChannelViT needs a non-empty channel_vocabulary (model.channel_vocabulary, e.g. the training "
                "manifest's channel names)"
            )
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"channel_vocabulary has duplicate names: {vocab}")
        self.channel_vocabulary = vocab
        self.channel_index = {name: i for i, name in enumerate(vocab)}
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.grid_size = grid_of(img_size, patch_size)

        self.patch_embed = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)  # shared
        self.channel_embed = nn.Parameter(torch.zeros(len(vocab), embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens > 0 else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        drop_rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=r, layerscale_init=layerscale_init)
            for r in drop_rates
        )
        self.norm = LayerNorm(embed_dim)
        for p in (self.pos_embed, self.cls_token, self.cls_pos_embed, self.register_tokens, self.channel_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights_trunc_normal)

    def num_patch_tokens(self, img_size) -> int:
        """N of the output `patch` (and of patch_mask): L (channel tokens are averaged per position)."""
        h, w = grid_of(img_size, self.patch_size)
        return h * w

    def channel_ids(self, channel_names: list[list[str]], channel_mask: Tensor | None, device) -> Tensor:
        """(B, C) vocabulary indices; masked channels get 0 (their tokens are never attended to)."""
        ids = []
        for b, row in enumerate(channel_names):
            out = []
            for c, name in enumerate(row):
                if channel_mask is not None and not bool(channel_mask[b, c]):
                    out.append(0)
                elif name in self.channel_index:
                    out.append(self.channel_index[name])
                else:
                    raise ValueError(
                        f"ChannelViT: unknown channel {name!r} (sample {b}, channel {c}); it has a learned "
                        f"embedding only for model.channel_vocabulary = {self.channel_vocabulary}"
                    )
            ids.append(out)
        return torch.tensor(ids, dtype=torch.long, device=device)

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        """x: (B, C, H, W); channel_names required (B lists of C names, or one shared list), real
        channels must be in the vocabulary; patch_mask (B, L): the grid position is masked in every
        channel (mask_token + that channel's embedding + position)."""
        B, C, H, W = check_image(x, "ChannelViT")
        check_channel_mask(channel_mask, B, C)
        grid = grid_of((H, W), self.patch_size)
        L = grid[0] * grid[1]
        check_patch_mask(patch_mask, B, L)
        names = normalize_channel_names(channel_names, B, C, "ChannelViT")
        if names is None:
            raise ValueError("ChannelViT needs channel_names (B lists of C names) to pick channel embeddings")
        ids = self.channel_ids(names, channel_mask, x.device)
        if channel_mask is not None:
            x = x.masked_fill(~channel_mask[:, :, None, None], 0.0)

        D = self.embed_dim
        tokens = self.patch_embed(x.reshape(B * C, 1, H, W)).flatten(2).transpose(1, 2).reshape(B, C, L, D)
        if patch_mask is not None:
            tokens = torch.where(patch_mask[:, None, :, None], self.mask_token.to(tokens.dtype), tokens)
        pos = interpolate_pos_embed(self.pos_embed, self.grid_size, grid)
        tokens = tokens + self.channel_embed[ids][:, :, None, :] + pos[:, None]
        prefix = [(self.cls_token + self.cls_pos_embed).expand(B, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        P = 1 + self.num_register_tokens
        h = torch.cat([*prefix, tokens.reshape(B, C * L, D)], dim=1)
        key_mask = None
        if channel_mask is not None:
            key_mask = torch.cat(
                [channel_mask.new_ones(B, P), channel_mask.repeat_interleave(L, dim=1)], dim=1
            )
        for blk in self.blocks:
            h = blk(h, key_mask)
        h = self.norm(h)

        patch = h[:, P:].reshape(B, C, L, D)
        if channel_mask is None:
            patch = patch.mean(dim=1)
        else:
            w = channel_mask.to(patch.dtype)
            patch = torch.einsum("bc,bcld->bld", w, patch) / w.sum(dim=1)[:, None, None]
        cls = h[:, 0]
        if patch_mask is None and torch.is_grad_enabled():
            cls = cls + zero_touch([self.mask_token])
        return {"cls": cls, "registers": h[:, 1:P], "patch": patch}

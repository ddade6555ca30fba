"""Baseline: ChannelViT (Bao et al., ICLR 2024; reference github insitro/ChannelViT): one shared
single-channel patch embedding, a learned embedding per known channel name, the same positional
embedding for every channel, and a ViT over all L*C patch tokens + CLS. Cost grows super-linearly in
C (attention over L*C tokens). Training uses hierarchical channel sampling (HCS,
`cellfm.ssl.channel_sampling`, applied by the training step as the student's channel mask)."""

from __future__ import annotations

import torch
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
    mean_over_channels,
    normalize_channel_names,
    zero_padding,
)


class ChannelViT(ViTTrunk):
    """`channelvit`. Tokens: patch_embed(channel c) + channel_embed[name(c)] + pos, for every channel;
    sequence [CLS, registers, L*C patch tokens] through the trunk's `depth` blocks; padded / dropped channels
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
        vocab = [str(v) for v in channel_vocabulary or []]
        if not vocab:
            raise ValueError(
                "ChannelViT needs a non-empty channel_vocabulary (model.channel_vocabulary, e.g. the training "
                "manifest's channel names)"
            )
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"channel_vocabulary has duplicate names: {vocab}")
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, num_heads=num_heads,
                         block_drop_path=drop_path_rates(drop_path_rate, depth), mlp_ratio=mlp_ratio,
                         num_register_tokens=num_register_tokens, layerscale_init=layerscale_init, qkv_bias=qkv_bias)
        self.channel_vocabulary = vocab
        self.channel_index = {name: i for i, name in enumerate(vocab)}
        self.patch_embed = PatchEmbed(1, embed_dim, patch_size)  # shared by every channel
        self.channel_embed = nn.Parameter(torch.zeros(len(vocab), embed_dim))
        self.init_weights()

    def token_parameters(self) -> list[nn.Parameter]:
        return [*super().token_parameters(), self.channel_embed]

    def input_embedding(self) -> list[nn.Module]:
        """The shared patch embedding (the per-name channel embedding is a token parameter, also at layer 0)."""
        return [self.patch_embed]

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
                        f"{type(self).__name__}: unknown channel {name!r} (sample {b}, channel {c}); it has a learned "
                        f"embedding only for model.channel_vocabulary = {self.channel_vocabulary}"
                    )
            ids.append(out)
        return torch.tensor(ids, dtype=torch.long, device=device)

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        """x: (B, C, H, W); channel_names required (B lists of C names, or one shared list), real
        channels must be in the vocabulary; patch_mask (B, L): the grid position is masked in every
        channel (mask_token + that channel's embedding + position)."""
        return self.encode(x, channel_names, channel_mask, patch_mask)[0]

    def encode(self, x: Tensor, channel_names, channel_mask: Tensor | None,
               patch_mask: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
        """`forward`'s outputs and the (B, C, L, D) patch embeddings of every channel as the shared patch
        embedding made them (before mask token, channel embedding and positions)."""
        B, C, H, W = check_image(x, type(self).__name__)
        check_channel_mask(channel_mask, B, C)
        grid = grid_of((H, W), self.patch_size)
        L = grid[0] * grid[1]
        check_patch_mask(patch_mask, B, L)
        names = normalize_channel_names(channel_names, B, C, type(self).__name__)
        if names is None:
            raise ValueError(f"{type(self).__name__} needs channel_names (B lists of C names) to pick channel "
                             f"embeddings")
        ids = self.channel_ids(names, channel_mask, x.device)

        D = self.embed_dim
        embedded = self.patch_embed(zero_padding(x, channel_mask).reshape(B * C, 1, H, W)).reshape(B, C, L, D)
        tokens = apply_patch_mask(embedded, None if patch_mask is None else patch_mask[:, None], self.mask_token)
        tokens = tokens + self.channel_embed[ids][:, :, None, :] + self.positions(grid)[:, None]
        key_mask = None if channel_mask is None else channel_mask.repeat_interleave(L, dim=1)
        out = self.forward_trunk(tokens.reshape(B, C * L, D), key_mask=key_mask)
        out["patch"] = mean_over_channels(out["patch"].reshape(B, C, L, D), channel_mask)
        return out, embedded

"""Pooling a variable set of channels into one token per position while keeping which stain showed what."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cellfm.models.layers.channel_mean import mean_over_channels
from cellfm.models.layers.norm import LayerNorm


class ChannelAttentionPool(nn.Module):
    """(B, C, N, D) per-channel tokens -> (B, N, D), for any C, invariant to channel order and to padding.

    A channel mean loses which stain carried which pattern. Here k learned queries pick channels by content:
    each channel's descriptor is the mean of its N tokens; query j weights the sample's real channels by
    softmax_c(q_j . key(LN(descriptor_c)) / sqrt(D)), the same weights at every position, giving k slots per
    position (slot j holds the channels whose content matches q_j, wherever they sit in the input). The output
    is the channel mean plus a learned projection of the k concatenated slots: it starts near the plain mean and
    keeps a fixed size whatever C is. No parameter depends on C or on a channel's index.

    Cost per position: k * C * D for the slots and k * D^2 for the projection (multiply-adds)."""

    def __init__(self, dim: int, num_queries: int):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.descriptor_norm = LayerNorm(dim)
        self.key = nn.Linear(dim, dim)
        self.slot_proj = nn.Linear(num_queries * dim, dim)

    def weight_modules(self) -> list[nn.Module]:
        """The modules besides `queries` (a backbone declares `queries` with its tokens, these with its layers)."""
        return [self.descriptor_norm, self.key, self.slot_proj]

    def channel_weights(self, tokens: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """(B, k, C) softmax weights of each query over the sample's real channels (padding gets 0)."""
        keys = self.key(self.descriptor_norm(tokens.mean(dim=2)))  # (B, C, D)
        logits = torch.einsum("kd,bcd->bkc", self.queries.to(keys.dtype), keys) / math.sqrt(keys.shape[-1])
        if channel_mask is not None:
            logits = logits.masked_fill(~channel_mask[:, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, tokens: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """tokens (B, C, N, D); channel_mask optional (B, C) bool, True = real channel (every sample needs one;
        padded tokens must be finite: they get weight 0) -> (B, N, D)."""
        B, C, N, D = tokens.shape
        weights = self.channel_weights(tokens, channel_mask)
        slots = torch.einsum("bkc,bcnd->bnkd", weights, tokens).reshape(B, N, -1)
        return mean_over_channels(tokens, channel_mask) + self.slot_proj(slots)

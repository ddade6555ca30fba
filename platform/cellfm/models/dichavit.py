"""Baseline: DiChaViT (Pham et al., NeurIPS 2024; reference github chaudatascience/diverse_channel_vit), ChannelViT
with three changes for more diverse channel features: the learned channel embeddings start orthogonal, training
samples the student's channels by diverse channel sampling (DCS, `cellfm.ssl.channel_sampling`, applied by the
training step), and a token diversification loss (`cellfm.ssl.token_orthogonality`) pushes the patch embedding's
tokens towards orthogonality. The C3R paper compares against it pre-trained with iBOT, as here. (The reference's
third term, a channel-embedding proxy loss, is not part of this baseline.)"""

from __future__ import annotations

from torch import Tensor, nn

from cellfm.models.channelvit import ChannelViT
from cellfm.models.layers import normalize_channel_names


class DiChaViT(ChannelViT):
    """`dichavit`: ChannelViT's architecture (one shared patch embedding, a learned embedding per name of
    `channel_vocabulary`, attention over all L*C tokens); unknown channel names fail as ChannelViT's do.
    Outputs ChannelViT's plus "channel_tokens" (B, C, L, D): the shared patch embedding's tokens of every
    channel, the input of the token diversification loss."""

    def __init__(self, channel_vocabulary: list[str], **kwargs):
        super().__init__(channel_vocabulary, **kwargs)
        # The reference's `orthogonal_channel_emb_init`: orthonormal rows (when the vocabulary fits in D).
        nn.init.orthogonal_(self.channel_embed)

    def channel_embeddings(self, channel_names, channel_mask: Tensor | None) -> Tensor:
        """(B, C, D): each slot's learned channel embedding (padded slots: an arbitrary row), what DCS compares."""
        B, C = (len(channel_names), len(channel_names[0])) if channel_mask is None else channel_mask.shape
        names = normalize_channel_names(channel_names, B, C, type(self).__name__)
        return self.channel_embed[self.channel_ids(names, channel_mask, self.channel_embed.device)]

    def forward(self, x: Tensor, channel_names=None, channel_mask: Tensor | None = None,
                patch_mask: Tensor | None = None) -> dict[str, Tensor]:
        out, channel_tokens = self.encode(x, channel_names, channel_mask, patch_mask)
        out["channel_tokens"] = channel_tokens
        return out

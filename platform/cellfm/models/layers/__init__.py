"""Shared ViT pieces, one concept per file (as DINOv2's `dinov2/layers/`); every backbone builds on
`ViTTrunk`."""

from cellfm.models.layers.attention import Attention
from cellfm.models.layers.block import Block
from cellfm.models.layers.channel_attention_pool import ChannelAttentionPool
from cellfm.models.layers.channel_axial_attention import ChannelAxialAttention
from cellfm.models.layers.channel_mean import mean_over_channels
from cellfm.models.layers.drop_path import DropPath, drop_path_rates
from cellfm.models.layers.init import init_weights_trunc_normal
from cellfm.models.layers.inputs import (
    check_channel_mask,
    check_image,
    check_patch_mask,
    normalize_channel_names,
    zero_padding,
)
from cellfm.models.layers.keep_in_graph import keep_in_graph
from cellfm.models.layers.layer_scale import LayerScale
from cellfm.models.layers.masking import apply_patch_mask
from cellfm.models.layers.mlp import Mlp
from cellfm.models.layers.norm import LayerNorm
from cellfm.models.layers.patch_embed import PatchEmbed, grid_of
from cellfm.models.layers.pos_embed import interpolate_pos_embed, sincos_pos_embed_2d
from cellfm.models.layers.trunk import ParameterLayout, ViTTrunk

__all__ = [
    "Attention", "Block", "ChannelAttentionPool", "ChannelAxialAttention", "DropPath", "LayerNorm", "LayerScale",
    "Mlp", "ParameterLayout", "PatchEmbed",
    "ViTTrunk", "apply_patch_mask", "check_channel_mask", "check_image", "check_patch_mask", "drop_path_rates",
    "grid_of", "init_weights_trunc_normal", "interpolate_pos_embed", "keep_in_graph", "mean_over_channels",
    "normalize_channel_names", "sincos_pos_embed_2d", "zero_padding",
]

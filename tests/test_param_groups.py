"""parameter_groups per backbone: which parameter gets which lr scale (layer-wise decay by true depth,
the input-embedding multiplier) and whether it is weight-decayed, for a student-like model (backbone + head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cellfm.config import ModelConfig
from cellfm.models.heads import DINOHead
from cellfm.models.layers import PatchEmbed
from cellfm.models.registry import SIZES, build_backbone
from cellfm.models.vit import VisionTransformer
from cellfm.train.param_groups import parameter_groups

NAMES = ["c0", "c1", "c2"]
DECAY, MULT = 0.5, 0.1
DEPTH = SIZES["tiny"].depth  # 4


def student(name: str) -> nn.Module:
    """What the trainer hands parameter_groups: the backbone and a DINO head under `backbone.` / `head.`."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(name=name, size="tiny", img_size=16, patch_size=8, num_register_tokens=2,
                                          channel_groups={"c0": "context", "c1": "context", "c2": "concept"},
                                          channel_vocabulary=NAMES))
    return nn.ModuleDict({"backbone": backbone,
                          "head": DINOHead(backbone.embed_dim, 16, hidden_dim=32, bottleneck_dim=8)})


def assignment(model: nn.Module, **kwargs) -> dict[str, dict]:
    """Parameter name -> the group it landed in (every trainable parameter exactly once)."""
    groups = parameter_groups(model, **kwargs)
    by_id = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in by_id, "a parameter is in two groups"
            by_id[id(p)] = group
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(by_id) == len(named)
    return {n: by_id[id(p)] for n, p in named.items()}


# name -> (layer, weight-decayed). Layers: 0 input embedding + tokens, 1..n blocks in forward order, n + 1 top.
COMMON_TOKENS = ["cls_token", "cls_pos_embed", "pos_embed", "register_tokens", "mask_token"]
EXPECTED = {
    "cellrep": (DEPTH, {
        "patch_embed.weight": (0, True), "patch_embed.bias": (0, False),
        "channel_encoder.0.weight": (0, True), "channel_encoder.4.weight": (0, True),
        "token_norm.weight": (0, False), "mixer.1.attn.qkv.weight": (0, True), "mixer.0.norm1.bias": (0, False),
        "blocks.0.attn.qkv.weight": (1, True), "blocks.0.ls1.gamma": (1, False), "blocks.3.mlp.fc2.weight": (4, True),
        "norm.weight": (5, False),
    }),
    "c3r": (2 + DEPTH - 1, {  # n_pre = 2 branch depths below the joint trunk's 3 blocks
        "stems.context.1.weight": (0, True), "stems.concept.1.bias": (0, False), "absent_token": (0, False),
        "branches.context.0.attn.qkv.weight": (1, True), "branches.concept.0.mlp.fc1.weight": (1, True),
        "branches.context.1.attn.proj.weight": (2, True), "branches.concept.1.norm2.weight": (2, False),
        "combiner_norm.weight": (2, False),
        "blocks.0.attn.qkv.weight": (3, True), "blocks.2.mlp.fc2.weight": (5, True), "norm.bias": (6, False),
    }),
    "channelvit": (DEPTH, {
        "patch_embed.weight": (0, True), "channel_embed": (0, False),
        "blocks.0.attn.qkv.weight": (1, True), "blocks.3.attn.proj.bias": (4, False), "norm.weight": (5, False),
    }),
    "vit_rgb": (DEPTH, {
        "vit.patch_embed.weight": (0, True), "vit.blocks.1.mlp.fc1.weight": (2, True), "vit.norm.weight": (5, False),
    }),
    "single_channel": (DEPTH, {
        "vit.patch_embed.weight": (0, True), "vit.blocks.2.attn.qkv.weight": (3, True), "vit.norm.bias": (5, False),
    }),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_lr_scale_and_weight_decay_per_parameter(name):
    n_layers, expected = EXPECTED[name]
    prefix = "vit." if name in ("vit_rgb", "single_channel") else ""
    expected = dict(expected, **{prefix + t: (0, False) for t in COMMON_TOKENS})
    model = student(name)
    got = assignment(model, layerwise_decay=DECAY, patch_embed_lr_mult=MULT)
    for short, (layer, decayed) in expected.items():
        group = got[f"backbone.{short}"]
        scale = DECAY ** (n_layers + 1 - layer) * (MULT if layer == 0 else 1.0)
        assert group["lr_scale"] == pytest.approx(scale), (short, group["lr_scale"], scale)
        assert group["apply_wd"] is decayed, short
        assert ("weight_decay" in group) is (not decayed) and group.get("weight_decay", 0.0) == 0.0, short
        assert group["last_layer"] is False
    # The head sits on top: full lr, decayed weights, undecayed biases, prototypes in their own group.
    assert got["head.mlp.0.weight"]["lr_scale"] == 1.0 and got["head.mlp.0.weight"]["apply_wd"]
    assert got["head.mlp.0.bias"]["lr_scale"] == 1.0 and not got["head.mlp.0.bias"]["apply_wd"]
    prototypes = got["head.last_layer.parametrizations.weight.original1"]
    assert prototypes["last_layer"] and prototypes["apply_wd"] and prototypes["lr_scale"] == 1.0
    # Every 1-D parameter (bias, norm, layerscale) is undecayed, whatever its layer.
    assert not any(got[n]["apply_wd"] for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1)


def test_c3r_branch_blocks_sit_below_the_joint_trunk():
    """The bug of issue 14: C3R's branch blocks had the head's layer id, so under layer-wise decay the
    earliest blocks learned fastest. Now lr grows monotonically along the forward path."""
    got = assignment(student("c3r"), layerwise_decay=DECAY)
    path = ["stems.context.1.weight", "branches.context.0.attn.qkv.weight", "branches.concept.1.attn.qkv.weight",
            "blocks.0.attn.qkv.weight", "blocks.2.attn.qkv.weight", "norm.weight"]
    scales = [got[f"backbone.{n}"]["lr_scale"] for n in path]
    assert scales == sorted(scales) and len(set(scales)) == len(scales), scales
    assert got["backbone.branches.context.0.mlp.fc1.weight"]["lr_scale"] == got[
        "backbone.branches.concept.0.mlp.fc1.weight"]["lr_scale"]  # both groups' block i share depth i + 1


def test_no_decay_no_multiplier_is_one_scale_and_frozen_parameters_are_left_out():
    model = student("cellrep")
    model["backbone"].mask_token.requires_grad_(False)  # what the trainer does without iBOT
    groups = parameter_groups(model)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert all(p is not model["backbone"].mask_token for g in groups for p in g["params"])
    assert sorted((g["apply_wd"], g["last_layer"]) for g in groups) == [(False, False), (True, False), (True, True)]


def test_a_model_without_a_vit_trunk_gets_scale_one_everywhere():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
    got = assignment(model, layerwise_decay=DECAY, patch_embed_lr_mult=MULT)
    assert {g["lr_scale"] for g in got.values()} == {1.0}
    assert got["0.weight"]["apply_wd"] and not got["0.bias"]["apply_wd"] and not got["1.weight"]["apply_wd"]


class _UndeclaredStem(VisionTransformer):
    """A backbone that adds a module and forgets to place it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra_stem = PatchEmbed(3, self.embed_dim, self.patch_size)


class _TwiceDeclared(VisionTransformer):
    def input_embedding(self) -> list[nn.Module]:
        return [self.patch_embed, self.blocks[0]]


@pytest.mark.parametrize("cls,message", [(_UndeclaredStem, r"does not place \['extra_stem.weight'"),
                                         (_TwiceDeclared, "at layers 0 and 1")])
def test_a_parameter_the_backbone_does_not_place_exactly_once_is_an_error(cls, message):
    model = cls(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=message):
        parameter_groups(model)


def test_two_backbones_in_one_model_is_an_error():
    model = nn.ModuleDict({"a": student("single_channel"), "b": student("vit_rgb")})
    with pytest.raises(ValueError, match="one backbone"):
        parameter_groups(model)

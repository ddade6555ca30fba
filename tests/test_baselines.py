"""Baselines: RGB-composite ViT, ChannelViT, single-channel ViT. (ChannelViT's hierarchical channel sampling:
tests/test_channel_sampling.py.)"""

from __future__ import annotations

import colorsys

import pytest
import torch

from cellfm.config import ModelConfig
from cellfm.models.channelvit import ChannelViT
from cellfm.models.registry import build_backbone
from cellfm.models.single_channel import SingleChannelViT
from cellfm.models.vit_rgb import RGBCompositeViT, hue_colors, rgb_composite

D, PATCH, IMG = 48, 8, 32
TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = ["DNA", "ER", "RNA", "AGP", "Mito"]
VIT = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=3, layerscale_init=None)


# -- RGB composite ---------------------------------------------------------------------------------

def test_hue_colors_are_evenly_spaced():
    assert hue_colors(1) == [(1.0, 1.0, 1.0)]
    assert hue_colors(3) == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    for n in (2, 4, 5, 8, 16):
        hues = [colorsys.rgb_to_hsv(*c)[0] for c in hue_colors(n)]
        assert hues == pytest.approx([i / n for i in range(n)], abs=1e-6)


def test_rgb_composite_blend_range_and_name_based_colours():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 500
    rgb = rgb_composite(x)
    assert rgb.shape == (2, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    # 3 channels -> pure R, G, B: each output plane is its min-max scaled channel.
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    torch.testing.assert_close(rgb, (x - lo) / (hi - lo))
    # With names, a stain keeps its colour whatever its tensor position.
    names = ["Mito", "DNA", "ER"]
    perm = [2, 0, 1]
    a = rgb_composite(x, names, vocabulary=VOCAB)
    b = rgb_composite(x[:, perm], [names[i] for i in perm], vocabulary=VOCAB)
    torch.testing.assert_close(a, b)
    # A single bright channel out of 2 lands in its colour only (hue 0 = red for the first slot).
    one = torch.zeros(1, 2, 4, 4)
    one[0, 0, 0, 0] = 1.0
    out = rgb_composite(one)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 1:, 0, 0].abs().max() == 0


def test_rgb_composite_channel_mask():
    x = torch.rand(1, 4, 8, 8)
    garbage = x.clone()
    garbage[0, 1] = float("nan")
    mask = torch.tensor([[True, False, True, True]])
    torch.testing.assert_close(rgb_composite(garbage, channel_mask=mask), rgb_composite(x[:, [0, 2, 3]]))


def test_vit_rgb_model():
    torch.manual_seed(0)
    model = RGBCompositeViT(channel_vocabulary=VOCAB, **VIT).eval()
    for C in (1, 2, 5, 16):
        out = model(torch.rand(2, C, IMG, IMG))
        assert out["cls"].shape == (2, D) and out["patch"].shape == (2, 16, D)
    assert model.num_patch_tokens(IMG) == 16 and model.embed_dim == D


# -- ChannelViT ------------------------------------------------------------------------------------

def tiny_channelvit(**kwargs) -> ChannelViT:
    torch.manual_seed(0)
    return ChannelViT(channel_vocabulary=VOCAB, **dict(VIT, **kwargs)).eval()


def test_channelvit_shapes_and_token_count():
    model = tiny_channelvit(num_register_tokens=2)
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x, channel_names=["DNA", "ER", "Mito"])
    assert out["cls"].shape == (2, D) and out["patch"].shape == (2, 16, D) and out["registers"].shape == (2, 2, D)
    assert model.num_patch_tokens(IMG) == 16
    assert model.channel_embed.shape == (5, D)


def test_channelvit_unknown_channel_is_a_clear_error():
    model = tiny_channelvit()
    with pytest.raises(ValueError, match=r"unknown channel 'Brightfield'.*DNA"):
        model(torch.randn(1, 2, IMG, IMG), channel_names=["DNA", "Brightfield"])
    with pytest.raises(ValueError, match="needs channel_names"):
        model(torch.randn(1, 2, IMG, IMG))
    with pytest.raises(ValueError, match="channel_vocabulary"):
        ChannelViT(channel_vocabulary=[])


def test_channelvit_uses_channel_identity_but_not_order():
    model = tiny_channelvit()
    x = torch.randn(1, 3, IMG, IMG)
    names = ["DNA", "ER", "Mito"]
    out = model(x, channel_names=names)
    # Reordering planes with their names: same set of tokens (attention is permutation equivariant).
    perm = [2, 0, 1]
    torch.testing.assert_close(model(x[:, perm], channel_names=[names[i] for i in perm])["cls"], out["cls"], **TOL)
    # Same pixels, different stain names: different embedding.
    assert (model(x, channel_names=["RNA", "ER", "Mito"])["cls"] - out["cls"]).abs().max() > 1e-4


def test_channelvit_patch_mask():
    model = tiny_channelvit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, IMG, IMG)
    names = ["DNA", "ER", "Mito"]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 4] = True
    a, b = model(x, channel_names=names), model(x, channel_names=names, patch_mask=mask)
    assert (a["patch"][0] - b["patch"][0]).abs().max() > 1e-4
    torch.testing.assert_close(a["patch"][1], b["patch"][1], **TOL)
    # The masked position's pixels no longer matter (in any channel).
    y = x.clone()
    y[0, :, 8:16, 0:8] = torch.randn(3, 8, 8)  # grid position 4 = row 1, col 0
    torch.testing.assert_close(model(y, channel_names=names, patch_mask=mask)["patch"], b["patch"], **TOL)


@pytest.mark.parametrize("C", [1, 2, 5])
def test_channelvit_any_known_channel_count(C):
    model = tiny_channelvit()
    assert model(torch.randn(1, C, IMG, IMG), channel_names=VOCAB[:C])["cls"].shape == (1, D)


# -- single-channel ----------------------------------------------------------------------------------

def test_single_channel_averages_per_channel_embeddings():
    torch.manual_seed(0)
    model = SingleChannelViT(**VIT).eval()
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    per_channel = [model.vit(x[:, c : c + 1]) for c in range(3)]
    for key in ("cls", "patch"):
        torch.testing.assert_close(out[key], torch.stack([o[key] for o in per_channel]).mean(0), **TOL)
    torch.testing.assert_close(model(x[:, [2, 0, 1]])["cls"], out["cls"], **TOL)  # order invariant
    mask = torch.tensor([[True, False, True], [True, True, True]])
    masked = model(x, channel_mask=mask)
    torch.testing.assert_close(masked["cls"][0], model(x[:1, [0, 2]])["cls"][0], **TOL)
    assert model.num_patch_tokens(IMG) == 16
    pm = torch.zeros(2, 16, dtype=torch.bool)
    pm[:, 0] = True
    # A patch mask masks the same grid position in every channel's pass: the mean of the masked passes.
    masked_passes = [model.vit(x[:, c : c + 1], patch_mask=pm) for c in range(3)]
    with_mask = model(x, patch_mask=pm)
    for key in ("cls", "patch"):
        torch.testing.assert_close(with_mask[key], torch.stack([o[key] for o in masked_passes]).mean(0), **TOL)
    assert (with_mask["patch"][:, 0] - out["patch"][:, 0]).abs().max() > 1e-3


def test_registry_builds_baselines():
    common = dict(size="tiny", img_size=32, patch_size=8, channel_vocabulary=VOCAB)
    for name, cls in (("vit_rgb", RGBCompositeViT), ("channelvit", ChannelViT), ("single_channel", SingleChannelViT)):
        model = build_backbone(ModelConfig(name=name, **common)).eval()
        assert isinstance(model, cls)
        assert model(torch.rand(1, 2, 32, 32), channel_names=["DNA", "Mito"])["cls"].shape == (1, model.embed_dim)

"""Unit tests for the ViT blocks, CellRep and the DINO head (tiny sizes, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from cellfm.models.cellrep import CellRep
from cellfm.models.heads import DINOHead
from cellfm.models.vit import Attention, Block, DropPath, interpolate_pos_embed

D, PATCH, IMG = 48, 8, 32  # 4x4 patch grid
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_cellrep(**kwargs) -> CellRep:
    torch.manual_seed(0)
    cfg = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=3, mixer_depth=2,
               channel_encoder_dim=8, layerscale_init=None)  # no layerscale: channel effects are not damped by 1e-5
    cfg.update(kwargs)
    return CellRep(**cfg).eval()


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8])
def test_cellrep_shapes(C):
    model = tiny_cellrep(num_register_tokens=2)
    out = model(torch.randn(2, C, IMG, IMG))
    assert out["cls"].shape == (2, D)
    assert out["patch"].shape == (2, 16, D)
    assert out["registers"].shape == (2, 2, D)
    assert model.embed_dim == D


def test_cellrep_pooling_ratio_keeps_k_slots():
    model = tiny_cellrep(pooling_ratio=2)
    for C in (1, 2, 5):  # C < k repeats the channel into both slots
        assert model(torch.randn(2, C, IMG, IMG))["patch"].shape == (2, 2 * 16, D)


def test_cellrep_other_image_sizes_interpolate_pos_embed():
    model = tiny_cellrep()
    assert model(torch.randn(1, 3, 48, 64))["patch"].shape == (1, 6 * 8, D)
    assert model(torch.randn(1, 3, 16, 16))["patch"].shape == (1, 4, D)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 30, 32))


def test_interpolate_pos_embed():
    pos = torch.randn(1, 4 * 4, 5)
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    up = interpolate_pos_embed(pos, (4, 4), (8, 6))
    assert up.shape == (1, 48, 5)
    const = torch.ones(1, 16, 5)  # bicubic reproduces a constant field
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4), (7, 9)), torch.ones(1, 63, 5))


def test_cellrep_channel_permutation_invariant_and_content_sensitive():
    model = tiny_cellrep(pooling_ratio=1)
    x = torch.randn(2, 5, IMG, IMG)
    out = model(x)
    perm = model(x[:, torch.tensor([3, 0, 4, 2, 1])])
    torch.testing.assert_close(perm["cls"], out["cls"], **TOL)
    torch.testing.assert_close(perm["patch"], out["patch"], **TOL)

    changed = x.clone()
    changed[:, 2] = torch.randn(2, IMG, IMG)
    assert (model(changed)["cls"] - out["cls"]).abs().max() > 1e-3


def test_cellrep_pooling_ratio_2_depends_on_channel_order():
    model = tiny_cellrep(pooling_ratio=2)
    x = torch.randn(1, 4, IMG, IMG)
    swapped = x[:, torch.tensor([2, 1, 0, 3])]  # moves channels between the two slots
    assert (model(x)["patch"] - model(swapped)["patch"]).abs().max() > 1e-3


@pytest.mark.parametrize("pooling_ratio", [1, 2])
def test_cellrep_channel_mask_padding_has_no_effect(pooling_ratio):
    model = tiny_cellrep(pooling_ratio=pooling_ratio)
    a, b = torch.randn(1, 3, IMG, IMG), torch.randn(1, 5, IMG, IMG)
    # Pad `a` to 5 channels with garbage (including NaN) in the middle and at the end.
    garbage = torch.full((1, 1, IMG, IMG), float("nan"))
    a_padded = torch.cat([a[:, :1], garbage, a[:, 1:], 1e4 * torch.randn(1, 1, IMG, IMG)], dim=1)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    out = model(torch.cat([a_padded, b]), channel_mask=mask)
    ref_a, ref_b = model(a), model(b)
    for key in ("cls", "patch"):
        torch.testing.assert_close(out[key][:1], ref_a[key], **TOL)
        torch.testing.assert_close(out[key][1:], ref_b[key], **TOL)


def test_cellrep_channel_mask_validation():
    model = tiny_cellrep()
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="no real channel"):
        model(x, channel_mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="bool"):
        model(x, channel_mask=torch.ones(2, 3))


def test_cellrep_has_no_channel_identity_parameters():
    model = tiny_cellrep(img_size=16)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in tiny_cellrep(img_size=16).parameters())
    for C in range(1, 17):
        assert model(torch.randn(1, C, 16, 16))["cls"].shape == (1, D)
    # Nothing in the model is sized by a channel count.
    assert all(C not in p.shape for p in model.parameters() for C in (5, 16) if p.ndim)


def test_cellrep_train_backward_with_drop_path():
    model = tiny_cellrep(drop_path_rate=0.2, layerscale_init=1e-5).train()
    out = model(torch.randn(2, 3, IMG, IMG))
    (out["cls"].sum() + out["patch"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_attention_key_mask_ignores_masked_keys():
    torch.manual_seed(0)
    attn = Attention(12, num_heads=2)
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[True, True, True, True, False, False]] * 2)
    y = x.clone()
    y[:, 4:] = torch.randn(2, 2, 12)  # changing masked tokens must not change the real ones
    torch.testing.assert_close(attn(x, mask)[:, :4], attn(y, mask)[:, :4])
    torch.testing.assert_close(attn(x, mask)[:, :4], attn(x[:, :4]))


def test_block_and_drop_path():
    block = Block(12, num_heads=2, drop_path=0.5).eval()
    x = torch.randn(3, 5, 12)
    assert block(x).shape == x.shape
    drop = DropPath(0.5).train()
    out = drop(torch.ones(1000, 4))
    assert set(out.unique().tolist()) <= {0.0, 2.0}  # dropped or rescaled by 1/keep
    assert 0.4 < (out[:, 0] > 0).float().mean() < 0.6
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("nlayers", [1, 3])
def test_dino_head(nlayers):
    head = DINOHead(in_dim=D, out_dim=32, hidden_dim=64, bottleneck_dim=16, nlayers=nlayers)
    logits = head(torch.randn(7, D))
    assert logits.shape == (7, 32)
    assert logits.abs().max() <= 1 + 1e-5  # cosine similarities
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    logits.sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    assert magnitude.grad is None

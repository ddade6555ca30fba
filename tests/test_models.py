"""Unit tests for the ViT blocks, CellRep and the DINO head (tiny sizes, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from cellfm.models.cellrep import CellRep
from cellfm.models.heads import DINOHead
from cellfm.models.layers import Attention, Block, DropPath, interpolate_pos_embed

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


# ---------------------------------------------------------------------------------------------
# Plain ViT backbone, common interface, patch_mask, in-model input normalization, registry.

from cellfm.config import ModelConfig  # noqa: E402
from cellfm.models.input_norm import InputNorm, clahe, percentile_scale  # noqa: E402
from cellfm.models.registry import BACKBONES, SIZES, build_backbone  # noqa: E402
from cellfm.models.vit import VisionTransformer  # noqa: E402


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size,expected", [("small", 21.7e6), ("base", 86e6), ("large", 304e6)])
def test_vit_parameter_counts_match_the_standard_ladder(size, expected):
    s = SIZES[size]
    with torch.device("meta"):  # no memory, no init cost
        model = VisionTransformer(img_size=224, patch_size=16, in_chans=3, embed_dim=s.embed_dim,
                                  depth=s.depth, num_heads=s.num_heads)
    assert abs(n_params(model) / expected - 1) < 0.01, n_params(model)


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=IMG, patch_size=PATCH, in_chans=3, embed_dim=D, depth=2, num_heads=3, layerscale_init=None)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


def test_vit_shapes_registers_and_other_sizes():
    model = tiny_vit(num_register_tokens=4)
    out = model(torch.randn(2, 3, IMG, IMG))
    assert out["cls"].shape == (2, D) and out["patch"].shape == (2, 16, D) and out["registers"].shape == (2, 4, D)
    assert model(torch.randn(1, 3, 48, 64))["patch"].shape == (1, 48, D)
    assert model.num_patch_tokens(IMG) == 16 and model.num_patch_tokens((48, 64)) == 48
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 4, IMG, IMG))


def test_vit_patch_mask_replaces_tokens_by_mask_token():
    model = tiny_vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, IMG, IMG)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, 15] = True
    tokens = model.prepare_tokens(x, mask)  # patch tokens, positions added
    pos = model.pos_embed[0]
    torch.testing.assert_close(tokens[0, 0], model.mask_token[0] + pos[0])
    torch.testing.assert_close(tokens[1, 15], model.mask_token[0] + pos[15])
    torch.testing.assert_close(tokens[0, 1], model.prepare_tokens(x)[0, 1])  # unmasked untouched
    out, masked = model(x), model(x, patch_mask=mask)
    assert (out["cls"] - masked["cls"]).abs().max() > 1e-4
    # The pixels under a masked patch no longer matter at all.
    y = x.clone()
    y[0, :, 0:PATCH, 0:PATCH] = torch.randn(3, PATCH, PATCH)
    torch.testing.assert_close(model(y, patch_mask=mask)["patch"], masked["patch"])
    with pytest.raises(ValueError, match="patch_mask"):
        model(x, patch_mask=torch.zeros(2, 15, dtype=torch.bool))


def test_cellrep_patch_mask_and_num_patch_tokens():
    model = tiny_cellrep(pooling_ratio=2)
    with torch.no_grad():
        model.mask_token.normal_()
    assert model.num_patch_tokens(IMG) == 32
    x = torch.randn(2, 3, IMG, IMG)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, 3] = mask[1, 16 + 7] = True  # slot 1, grid position 7
    tokens = model.prepare_tokens(x, patch_mask=mask)
    torch.testing.assert_close(tokens[0, 3], model.mask_token[0] + model.pos_embed[0, 3])
    torch.testing.assert_close(tokens[1, 23], model.mask_token[0] + model.pos_embed[0, 7])
    torch.testing.assert_close(tokens[0, 4], model.prepare_tokens(x)[0, 4])
    assert (model(x)["patch"] - model(x, patch_mask=mask)["patch"]).abs().max() > 1e-4


def test_cellrep_accepts_channel_names_without_using_them():
    model = tiny_cellrep()
    x = torch.randn(2, 3, IMG, IMG)
    names = [["DNA", "ER", "Mito"], ["Mito", "DNA", "ER"]]
    torch.testing.assert_close(model(x, channel_names=names)["cls"], model(x)["cls"])
    with pytest.raises(ValueError, match="channel_names"):
        model(x, channel_names=[["DNA", "ER"]] * 2)


def test_input_norm_percentile_and_clahe():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 36) * 1000 + 50
    x[0, 1] = 7.0  # constant plane
    p = percentile_scale(x, 1.0, 99.0)
    assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1
    assert torch.equal(p[0, 1], torch.zeros(40, 36))
    assert (p[1, 0] == 1).float().mean() == pytest.approx(0.01, abs=0.005)  # the top 1% is clipped
    # Channel-wise: a plane's result does not depend on its neighbours.
    torch.testing.assert_close(percentile_scale(x[:, 2:3]), p[:, 2:3])

    skewed = 0.4 + 0.2 * torch.rand(1, 1, 64, 64) ** 2  # low contrast, mostly dark
    eq = clahe(skewed, grid=(1, 1), clip_limit=1e9)  # one tile, no clipping: plain histogram equalization
    assert eq.shape == skewed.shape and eq.min() >= 0 and eq.max() <= 1
    assert eq.mean() == pytest.approx(0.5, abs=0.04) and (eq < 0.25).float().mean() == pytest.approx(0.25, abs=0.04)
    local = clahe(skewed, grid=(4, 4), clip_limit=2.0)  # contrast-limited: stretched, but less than full HE
    assert skewed.std() < local.std() < eq.std() + 1e-3
    ramp = torch.linspace(0, 1, 64).repeat(64, 1)[None, None]
    assert (clahe(ramp, grid=(4, 4)).diff(dim=-1) >= -1e-6).all()  # monotone input stays monotone
    both = torch.cat([skewed, skewed.flip(-1)], 1)
    torch.testing.assert_close(clahe(both)[:, 0:1], clahe(skewed))  # per channel
    # adaptive_hist: each plane min-max scaled (the 0/100 percentiles), then CLAHE on the default grid.
    planes = x.reshape(6, 1, 40, 36)
    scaled = (planes - planes.amin(dim=(2, 3), keepdim=True)) / (
        planes.amax(dim=(2, 3), keepdim=True) - planes.amin(dim=(2, 3), keepdim=True)).clamp_min(1e-6)
    torch.testing.assert_close(InputNorm("adaptive_hist")(x), clahe(scaled.reshape(x.shape)))
    torch.testing.assert_close(InputNorm("percentile", low=2.0, high=98.0)(x), percentile_scale(x, 2.0, 98.0))
    assert torch.equal(InputNorm("none")(x), x)
    with pytest.raises(ValueError, match="input_norm"):
        InputNorm("zscore")


@pytest.mark.parametrize("mode", ["percentile", "adaptive_hist"])
def test_cellrep_input_norm_option(mode):
    model = tiny_cellrep(input_norm=mode)
    x = torch.rand(2, 4, IMG, IMG) * 3000
    out = model(x)
    assert torch.isfinite(out["cls"]).all()
    torch.testing.assert_close(model(x[:, torch.tensor([2, 0, 3, 1])])["cls"], out["cls"], **TOL)
    # Intensity scale no longer matters: the normalization absorbs it.
    torch.testing.assert_close(model(x * 10 + 5)["cls"], out["cls"], atol=1e-4, rtol=1e-4)
    default = tiny_cellrep()
    assert (default(x)["cls"] - out["cls"]).abs().max() > 1e-3


def registry_cfg(name: str, **kwargs) -> ModelConfig:
    names = [f"c{i}" for i in range(16)]
    cfg = dict(name=name, size="tiny", img_size=16, patch_size=8, layerscale_init=None,
               channel_groups={n: ("concept" if i % 4 == 3 else "context") for i, n in enumerate(names)},
               channel_vocabulary=names)
    cfg.update(kwargs)
    return ModelConfig(**cfg)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_accepts_1_to_16_channels(name):
    torch.manual_seed(0)
    model = build_backbone(registry_cfg(name)).eval()
    D_ = SIZES["tiny"].embed_dim
    assert model.embed_dim == D_
    N = model.num_patch_tokens(16)
    with torch.no_grad():
        for C in range(1, 17):
            names = [f"c{i}" for i in range(C)]
            out = model(torch.randn(2, C, 16, 16), channel_names=[names, names[::-1]])
            assert out["cls"].shape == (2, D_) and out["patch"].shape == (2, N, D_), (name, C)
            assert torch.isfinite(out["cls"]).all() and torch.isfinite(out["patch"]).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_patch_mask_replaces_the_masked_tokens(name):
    """A masked patch token is replaced by the mask token: masking a third changes the output, and with
    every patch masked no pixel reaches the output any more."""
    torch.manual_seed(0)
    model = build_backbone(registry_cfg(name, img_size=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.shape[-1] == model.embed_dim and p.ndim == 2 and p.shape[0] == 1:  # mask tokens
                p.normal_()
    x = torch.randn(2, 5, 32, 32)
    names = [f"c{i}" for i in range(5)]
    mask = torch.zeros(2, model.num_patch_tokens(32), dtype=torch.bool)
    mask[:, ::3] = True
    everything = torch.ones_like(mask)
    with torch.no_grad():
        a = model(x, channel_names=names)
        b = model(x, channel_names=names, patch_mask=mask)
        blind = model(x, channel_names=names, patch_mask=everything)
        other = model(torch.randn_like(x), channel_names=names, patch_mask=everything)
    assert (a["patch"] - b["patch"]).abs().max() > 1e-3
    torch.testing.assert_close(other["cls"], blind["cls"], **TOL)
    torch.testing.assert_close(other["patch"], blind["patch"], **TOL)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_trains_with_every_parameter_in_the_graph(name):
    """DDP (find_unused_parameters=False) needs a gradient for every parameter on every step, even
    when no patch_mask is given or a C3R group is absent."""
    torch.manual_seed(0)
    model = build_backbone(registry_cfg(name)).train()
    names = ["c0"] if name != "vit_rgb" else ["c0", "c1"]
    out = model(torch.randn(2, len(names), 16, 16), channel_names=names)
    (out["cls"].sum() + out["patch"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_registry_errors():
    with pytest.raises(ValueError, match="not a registered backbone"):
        build_backbone(ModelConfig(name="resnet"))
    with pytest.raises(ValueError, match="channel_vocabulary"):
        build_backbone(ModelConfig(name="channelvit", channel_vocabulary=[]))

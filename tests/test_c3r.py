"""C3R: grouping by channel names, invariances, missing groups, channel masks, patch masks, parameter budget."""

from __future__ import annotations

import pytest
import torch

from cellfm.config import ModelConfig
from cellfm.models.c3r import C3R, c3r_joint_depth
from cellfm.models.registry import SIZES, build_backbone
from cellfm.models.vit import VisionTransformer

D, PATCH, IMG = 48, 8, 32
TOL = dict(atol=1e-5, rtol=1e-5)
GROUPS = {"DNA": "context", "ER": "context", "Tubulin": "context", "Protein": "concept", "Mito": "concept"}
NAMES = ["DNA", "ER", "Tubulin", "Protein", "Mito"]


def tiny_c3r(**kwargs) -> C3R:
    torch.manual_seed(0)
    cfg = dict(channel_groups=GROUPS, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=3, num_heads=4, n_pre=2,
               layerscale_init=None)
    cfg.update(kwargs)
    return C3R(**cfg).eval()


def test_shapes_and_num_patch_tokens():
    model = tiny_c3r(num_register_tokens=2)
    out = model(torch.randn(2, 5, IMG, IMG), channel_names=NAMES)
    assert out["cls"].shape == (2, D) and out["patch"].shape == (2, 16, D) and out["registers"].shape == (2, 2, D)
    assert model.num_patch_tokens(IMG) == 16 and model.num_patch_tokens((48, 64)) == 48
    assert model(torch.randn(1, 5, 48, 64), channel_names=NAMES)["patch"].shape == (1, 48, D)
    assert model.joint_depth == 2 and len(model.branches["context"]) == 2


def test_invariant_to_permutation_within_and_across_positions():
    model = tiny_c3r()
    x = torch.randn(2, 5, IMG, IMG)
    out = model(x, channel_names=NAMES)
    perm = [2, 4, 0, 3, 1]  # any reordering of the tensor, names travelling with their planes
    out_p = model(x[:, perm], channel_names=[NAMES[i] for i in perm])
    for key in ("cls", "patch"):
        torch.testing.assert_close(out_p[key], out[key], **TOL)
    # Per-sample orders in one batch (after random channel permutation in the loader).
    mixed = torch.stack([x[0], x[1, perm]])
    out_m = model(mixed, channel_names=[NAMES, [NAMES[i] for i in perm]])
    torch.testing.assert_close(out_m["cls"], out["cls"], **TOL)


def test_swapping_group_assignment_changes_output():
    model = tiny_c3r()
    x = torch.randn(2, 5, IMG, IMG)
    out = model(x, channel_names=NAMES)
    swapped = dict(GROUPS, DNA="concept", Protein="context")
    model.set_channel_groups(swapped)
    assert (model(x, channel_names=NAMES)["cls"] - out["cls"]).abs().max() > 1e-3
    # Exchanging the content of a context and a concept channel also changes it (groups are not interchangeable).
    model.set_channel_groups(GROUPS)
    y = x[:, [3, 1, 2, 0, 4]]
    assert (model(y, channel_names=NAMES)["cls"] - out["cls"]).abs().max() > 1e-3


def test_unknown_channel_name_is_a_clear_error():
    model = tiny_c3r()
    with pytest.raises(ValueError, match=r"'Actin'.*no context/concept group.*DNA"):
        model(torch.randn(1, 2, IMG, IMG), channel_names=["DNA", "Actin"])
    with pytest.raises(ValueError, match="needs channel_names"):
        model(torch.randn(1, 2, IMG, IMG))
    with pytest.raises(ValueError, match="context"):
        C3R(channel_groups={"DNA": "nucleus"})


@pytest.mark.parametrize("names", [["DNA"], ["Protein"], ["BF"]])
def test_missing_group_single_channel(names):
    """A 1-channel image (brightfield mapped to context, or a lone concept stain) leaves one group empty:
    that half is the learned absent token, and the output is finite."""
    model = tiny_c3r(channel_groups=dict(GROUPS, BF="context"))
    x = torch.randn(2, 1, IMG, IMG)
    out = model(x, channel_names=names)
    assert out["cls"].shape == (2, D) and torch.isfinite(out["cls"]).all() and torch.isfinite(out["patch"]).all()
    tokens = model.prepare_tokens(x, channel_names=names)
    group = GROUPS.get(names[0], "context")
    absent_half = slice(D // 2, D) if group == "context" else slice(0, D // 2)
    # Before the LayerNorm the absent half is one constant vector at every position, so it carries no image.
    other = model.prepare_tokens(torch.randn(2, 1, IMG, IMG), channel_names=names)
    assert (tokens - other).abs().max() > 1e-3
    assert torch.isfinite(tokens[..., absent_half]).all()


def test_mcd_all_context_masked_uses_absent_token():
    model = tiny_c3r()
    x = torch.randn(1, 5, IMG, IMG)
    mask = torch.tensor([[False, False, False, True, True]])  # only concept channels kept
    out = model(x, channel_names=NAMES, channel_mask=mask)
    ref = model(x[:, 3:], channel_names=NAMES[3:])
    torch.testing.assert_close(out["cls"], ref["cls"], **TOL)
    assert torch.isfinite(out["cls"]).all()
    with pytest.raises(ValueError, match="no real channel"):
        model(x, channel_names=NAMES, channel_mask=torch.zeros(1, 5, dtype=torch.bool))


def test_patch_mask_replaces_every_channels_token_with_group_half_of_mask_token():
    model = tiny_c3r()
    with torch.no_grad():
        model.mask_token.normal_()
    planes = torch.randn(3, 1, IMG, IMG)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, 5] = True
    for group in (0, 1):
        tokens = model.embed_channels(planes, group, (4, 4), mask)  # (3, 1 + L, D/2)
        sl = slice(group * D // 2, (group + 1) * D // 2)
        expected = model.mask_token[0, sl] + model.pos_embed[0, 5, sl]
        for i in range(3):
            torch.testing.assert_close(tokens[i, 1 + 5], expected)
    x = torch.randn(2, 5, IMG, IMG)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :8] = True
    a, b = model(x, channel_names=NAMES), model(x, channel_names=NAMES, patch_mask=mask)
    assert (a["patch"][0] - b["patch"][0]).abs().max() > 1e-3
    torch.testing.assert_close(a["patch"][1], b["patch"][1], **TOL)  # sample 1 unmasked


@pytest.mark.parametrize("C", list(range(1, 17)))
def test_any_channel_count(C):
    names = [f"s{i}" for i in range(16)]
    model = tiny_c3r(channel_groups={n: ("concept" if i % 3 == 2 else "context") for i, n in enumerate(names)})
    out = model(torch.randn(1, C, IMG, IMG), channel_names=names[:C])
    assert out["cls"].shape == (1, D) and torch.isfinite(out["cls"]).all()


@pytest.mark.parametrize("size", ["small", "base"])
@pytest.mark.parametrize("n_pre", range(6))
def test_parameter_budget_per_branch_depth(size, n_pre):
    """Joint depth = the whole blocks left after the branches (C3R's rule): 12/11/11/10/10/9 at ViT-S/B for
    n_pre 0..5. Even n_pre stays within 2% of the ViT of the same width; odd n_pre is half a block under it
    (never over: the old rule depth - n_pre // 2 put odd n_pre 3-4% over)."""
    s = SIZES[size]
    with torch.device("meta"):
        vit = VisionTransformer(img_size=224, patch_size=16, in_chans=3, embed_dim=s.embed_dim, depth=s.depth,
                                num_heads=s.num_heads)
        c3r = C3R(channel_groups=GROUPS, img_size=224, patch_size=16, embed_dim=s.embed_dim, depth=s.depth,
                  num_heads=s.num_heads, n_pre=n_pre)
    n_vit = sum(p.numel() for p in vit.parameters())
    n_c3r = sum(p.numel() for p in c3r.parameters())
    n_block = sum(p.numel() for p in vit.blocks[0].parameters())
    assert c3r.joint_depth == c3r_joint_depth(s.depth, n_pre) == {0: 12, 1: 11, 2: 11, 3: 10, 4: 10, 5: 9}[n_pre]
    assert n_c3r < n_vit
    if n_pre % 2 == 0:
        assert abs(n_c3r / n_vit - 1) < 0.02, (n_c3r, n_vit)
    else:
        # Half a block under, plus the few stem/token differences of the even case (< 0.15 block).
        assert 0.5 <= (n_vit - n_c3r) / n_block < 0.65, (n_c3r, n_vit, n_block)


def test_registry_builds_c3r_from_config():
    cfg = ModelConfig(name="c3r", size="tiny", img_size=32, patch_size=8, n_pre=2, channel_groups=GROUPS)
    model = build_backbone(cfg).eval()
    assert isinstance(model, C3R) and model.joint_depth == SIZES["tiny"].depth - 1
    out = model(torch.randn(2, 3, 32, 32), channel_names=["DNA", "Protein", "ER"])
    assert out["cls"].shape == (2, SIZES["tiny"].embed_dim)


def test_train_backward_reaches_every_parameter_with_drop_path():
    model = tiny_c3r(drop_path_rate=0.2).train()
    out = model(torch.randn(2, 3, IMG, IMG), channel_names=["DNA", "Protein", "ER"])
    (out["cls"].sum() + out["patch"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_evaluation_can_assign_an_unseen_stain_to_a_group(tmp_path):
    """A C3R checkpoint trained without 'Tubulin' embeds it once the evaluation config maps it."""
    import pytest
    import torch

    from cellfm.config import load_config
    from cellfm.features.embed import EncoderSpec, field_embedding
    from cellfm.models.registry import build_backbone
    from cellfm.train.checkpoint import save_inference_checkpoint

    groups = "{DNA: context, ER: context, Mito: concept}"
    cfg = load_config(None, ["model.name=c3r", "model.size=tiny", "model.img_size=32", "ssl.objective=ibot",
                             "ssl.head_out_dim=16", "ssl.head_hidden_dim=16", "ssl.head_bottleneck_dim=8",
                             f"model.channel_groups={groups}", "ssl.global_crop_size=32", "ssl.local_crop_size=16"])
    save_inference_checkpoint(tmp_path, cfg=cfg, backbone=build_backbone(cfg.model))
    images, names = torch.rand(2, 3, 32, 32), [["DNA", "Tubulin", "Mito"]] * 2
    with pytest.raises(ValueError, match="Tubulin"):
        field_embedding(EncoderSpec("t", checkpoint_dir=str(tmp_path)).build(), images, 0, names)
    backbone = EncoderSpec("t", checkpoint_dir=str(tmp_path), channel_groups={"Tubulin": "context"}).build()
    assert field_embedding(backbone, images, 0, names).shape == (2, 2 * backbone.embed_dim)

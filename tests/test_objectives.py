"""Unit tests for the iBOT-side objectives: iBOT patch loss, block masking, KoLeo, SupCon, MCD, and the
`ibot` / `dino` objectives of the trainer on a small stand-in backbone with the common interface.
Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cellfm.config import ConfigError, load_config
from cellfm.models.heads import DINOHead
from cellfm.ssl.ibot_loss import IBOTPatchLoss
from cellfm.ssl.koleo import KoLeoLoss
from cellfm.ssl.masking import BlockMaskGenerator
from cellfm.ssl.mcd import MCDSampler, context_channel_mask
from cellfm.ssl.supcon import SupConLoss, label_ids
from cellfm.train.self_distillation import (
    DinoObjective,
    EncoderWithHead,
    IbotObjective,
    StepLosses,
    StepViews,
    build_objective,
    build_student_teacher,
)
from cellfm.train.meta_arch import check_training_config

LN2 = math.log(2)
REPO = Path(__file__).resolve().parent.parent


def logits_for(probs: list[list[float]], temp: float) -> torch.Tensor:
    """Logits whose softmax at `temp` is exactly `probs`."""
    return temp * torch.tensor(probs).log()


# ---------------------------------------------------------------- iBOT patch loss


def test_ibot_loss_weights_each_image_equally_hand_computed():
    loss_fn = IBOTPatchLoss(out_dim=2, student_temp=0.1)
    # 3 images x 3 patches: image 0 masks 1 patch, image 1 masks 2, image 2 none.
    mask = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows in mask.nonzero() order
    student = logits_for([[0.5, 0.5], [0.25, 0.75], [0.25, 0.75]], 0.1)
    # CE per patch: ln2, ln4 = 2 ln2, -ln(3/4) = ln(4/3)
    # per image: [ln2, (2 ln2 + ln(4/3)) / 2, 0], mean over the 3 images.
    expected = (LN2 + (2 * LN2 + math.log(4 / 3)) / 2) / 3
    assert loss_fn(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    # A per-patch average would weight image 1 twice as much: make sure that is not what we compute.
    assert expected != pytest.approx((LN2 + 2 * LN2 + math.log(4 / 3)) / 3, rel=1e-3)


def test_ibot_loss_shape_checks_and_empty_mask_is_connected_zero():
    loss_fn = IBOTPatchLoss(out_dim=4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    student = torch.zeros(0, 4, requires_grad=True)
    loss = loss_fn(student, torch.zeros(0, 4), mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="masked patches"):
        loss_fn(torch.zeros(3, 4), torch.zeros(3, 4), mask)


def test_ibot_center_update_hand_computed_and_skipped_without_patches():
    loss_fn = IBOTPatchLoss(out_dim=3, center_momentum=0.9)
    loss_fn.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))  # mean [2, 2, 2]
    torch.testing.assert_close(loss_fn.center, torch.full((1, 3), 0.2))
    loss_fn.update_center(torch.zeros(0, 3))  # no masked patch anywhere: unchanged, no NaN
    torch.testing.assert_close(loss_fn.center, torch.full((1, 3), 0.2))
    loss_fn.center.copy_(torch.tensor([[0.0, LN2, 0.0]]))
    probs = loss_fn.softmax_center_teacher(torch.tensor([[0.0, 2 * LN2, 0.0]]), teacher_temp=1.0)
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.5, 0.25]]))


def test_ibot_sinkhorn_rows_sum_to_one_and_empty_input_is_fine():
    torch.manual_seed(0)
    loss_fn = IBOTPatchLoss(out_dim=4)
    q = loss_fn.sinkhorn_knopp_teacher(torch.randn(16, 4) + torch.tensor([3.0, 0, 0, 0]), teacher_temp=0.5)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16), atol=1e-5, rtol=0)
    assert q.sum(dim=0).max() / q.sum(dim=0).min() < 1.5  # prototype 0 no longer dominates
    assert loss_fn.sinkhorn_knopp_teacher(torch.zeros(0, 4), 0.1).shape == (0, 4)


# ---------------------------------------------------------------- block masking


def test_block_masking_ratio_within_bounds_and_exact_counts():
    gen = torch.Generator().manual_seed(0)
    masking = BlockMaskGenerator(14, (0.1, 0.5), mask_sample_probability=1.0)
    masks = masking(512, generator=gen)
    assert masks.shape == (512, 196) and masks.dtype == torch.bool
    ratio = masks.float().mean(dim=1)
    assert bool(((ratio >= 0.1) & (ratio <= 0.5)).all())
    assert ratio.std() > 0.05  # ratios really are drawn, not a constant
    # Blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour.
    grid = masks.view(-1, 14, 14)
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (grid & nb).sum() / grid.sum() > 0.9


def test_block_masking_no_mask_probability_and_seeding():
    masking = BlockMaskGenerator((4, 4), (0.25, 0.5), mask_sample_probability=0.3)
    masks = masking(4000, generator=torch.Generator().manual_seed(1))
    masked = masks.any(dim=1)
    assert masked.float().mean().item() == pytest.approx(0.3, abs=0.03)
    counts = masks[masked].sum(dim=1)
    assert bool(((counts >= 4) & (counts <= 8)).all())  # 0.25 * 16 .. 0.5 * 16
    again = masking(4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)
    assert not BlockMaskGenerator(4, mask_sample_probability=0.0)(64).any()
    with pytest.raises(ValueError):
        BlockMaskGenerator(4, (0.6, 0.2))


# ---------------------------------------------------------------- KoLeo


def test_koleo_hand_computed_and_scale_invariant():
    koleo = KoLeoLoss()
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    # nearest neighbours: a<->b at sqrt(0.8); c -> b at sqrt(3.2) (c -> a is 2)
    expected = -(2 * 0.5 * math.log(0.8) + 0.5 * math.log(3.2)) / 3
    assert koleo(x).item() == pytest.approx(expected, rel=1e-5)
    assert koleo(x * torch.tensor([[3.0], [0.5], [7.0]])).item() == pytest.approx(expected, rel=1e-5)
    x.requires_grad_(True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        koleo(torch.ones(1, 4))


# ---------------------------------------------------------------- SupCon


def test_supcon_hand_computed_and_no_positive_anchor_skipped():
    supcon = SupConLoss(temperature=1.0)
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # z1 = z2 = e1, z3 = e2
    labels = torch.tensor([0, 0, 1])
    # anchors 1 and 2: positive sim 1, denominator e^1 + e^0 -> -(1 - ln(1 + e)); anchor 3 has no positive.
    assert supcon(feats, labels).item() == pytest.approx(math.log(1 + math.e) - 1, rel=1e-6)
    # Temperature 0.5: -(2 - ln(e^2 + 1)) = ln(1 + e^-2)
    assert SupConLoss(0.5)(feats, labels).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    lonely = torch.randn(3, 4, requires_grad=True)
    loss = SupConLoss()(lonely, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()


def test_supcon_matches_brute_force_and_label_ids():
    torch.manual_seed(0)
    feats, labels = torch.randn(6, 5), label_ids(["a", "b", "a", "c", "b", "a"])
    assert labels.tolist() == [0, 1, 0, 2, 1, 0]
    z, t = F.normalize(feats, dim=-1), 0.1
    per_anchor = []
    for i in range(6):
        pos = [p for p in range(6) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(6) if a != i)
        per_anchor.append(-sum(float(z[i] @ z[p]) / t - math.log(denom) for p in pos) / len(pos))
    assert SupConLoss(0.1)(feats, labels).item() == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-5)


# ---------------------------------------------------------------- MCD

GROUPS = {"DNA": "context", "ER": "context", "RNA": "context", "AGP": "concept", "Mito": "concept"}
CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]


def test_mcd_default_keep_counts_uniform_over_1_to_c1_and_concept_never_dropped():
    n = 6000
    is_ctx = context_channel_mask([CP5] * n, GROUPS)
    assert is_ctx[0].tolist() == [True, True, True, False, False]
    keep = MCDSampler()(is_ctx, torch.ones(n, 5, dtype=torch.bool), generator=torch.Generator().manual_seed(0))
    assert bool(keep[:, 3:].all())  # concept channels always kept
    k = keep[:, :3].sum(dim=1)
    freq = torch.bincount(k, minlength=4).float() / n
    assert freq[0] == 0
    for kk in (1, 2, 3):
        assert freq[kk].item() == pytest.approx(1 / 3, abs=0.03)
    # Which context channels survive is uniform too: each kept with prob (1/3)(1 + 2 + 3)/3 = 2/3.
    for c in range(3):
        assert keep[:, c].float().mean().item() == pytest.approx(2 / 3, abs=0.03)


def test_mcd_configured_set_clipped_to_c1_and_per_sample():
    n = 6000
    # Channel order differs per sample (channel permutation): groups follow the names, not the index.
    names = [CP5 if i % 2 else list(reversed(CP5)) for i in range(n)]
    is_ctx = context_channel_mask(names, GROUPS)
    keep = MCDSampler([1, 5])(is_ctx, torch.ones(n, 5, dtype=torch.bool), generator=torch.Generator().manual_seed(1))
    assert bool(keep[~is_ctx].all())
    k = (keep & is_ctx).sum(dim=1)
    assert set(k.unique().tolist()) == {1, 3}  # 5 clipped to C1 = 3
    assert (k == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # A sample without any context channel keeps everything.
    only_concept = context_channel_mask([["AGP", "Mito"]], GROUPS)
    assert MCDSampler()(only_concept, torch.ones(1, 2, dtype=torch.bool)).all()
    with pytest.raises(ValueError, match="keep counts"):
        MCDSampler([0, 1])


def test_mcd_padding_is_never_kept_and_changes_no_draw():
    """A padded batch (names "" where the mask is False) keeps exactly the channels of the unpadded batch
    under the same generator state; padded slots are never looked up in the groups nor kept."""
    n = 500
    names = [CP5 if i % 2 else list(reversed(CP5)) for i in range(n)]
    plain = MCDSampler()(context_channel_mask(names, GROUPS), torch.ones(n, 5, dtype=torch.bool),
                         generator=torch.Generator().manual_seed(3))
    padded_names = [row + ["", ""] for row in names]
    valid = torch.tensor([[True] * 5 + [False] * 2] * n)
    is_ctx = context_channel_mask(padded_names, GROUPS, valid)
    assert not is_ctx[:, 5:].any()
    padded = MCDSampler()(is_ctx, valid, generator=torch.Generator().manual_seed(3))
    assert torch.equal(padded[:, :5], plain) and not padded[:, 5:].any()


def test_context_channel_mask_names_missing_channel():
    with pytest.raises(ValueError, match="'Actin'"):
        context_channel_mask([["DNA", "Actin"]], GROUPS)
    with pytest.raises(ValueError, match="context"):
        context_channel_mask([["DNA"]], {"DNA": "structural"})


# ---------------------------------------------------------------- objectives on a stand-in backbone


class StandInBackbone(nn.Module):
    """Smallest backbone with the common interface: per-channel conv patch embedding averaged over the
    seen channels, learned mask token, one residual MLP, CLS = projected mean token. Records its calls."""

    def __init__(self, patch_size: int = 8, dim: int = 16):
        super().__init__()
        self.embed_dim, self.patch_size = dim, patch_size
        self.proj = nn.Conv2d(1, dim, patch_size, patch_size)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.mix = nn.Linear(dim, dim)
        self.cls_proj = nn.Linear(dim, dim)
        self.calls: list[dict] = []

    def num_patch_tokens(self, img_size: int) -> int:
        return (img_size // self.patch_size) ** 2

    def forward(self, x, channel_names=None, channel_mask=None, patch_mask=None):
        self.calls.append({"shape": tuple(x.shape), "channel_names": channel_names,
                           "channel_mask": channel_mask, "patch_mask": patch_mask})
        B, C, H, W = x.shape
        t = self.proj(x.reshape(B * C, 1, H, W)).flatten(2).transpose(1, 2).reshape(B, C, -1, self.embed_dim)
        w = torch.ones(B, C) if channel_mask is None else channel_mask.float()
        t = (t * w[:, :, None, None]).sum(1) / w.sum(1)[:, None, None]
        if patch_mask is not None:
            t = torch.where(patch_mask[..., None], self.mask_token.expand_as(t), t)
        t = t + torch.tanh(self.mix(t))
        return {"cls": self.cls_proj(t.mean(1)), "patch": t, "registers": t[:, :0]}


def small_cfg(*overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [
        "model.patch_size=8", "ssl.global_crop_size=16", "ssl.local_crop_size=8",
        "ssl.head_out_dim=32", "ssl.head_hidden_dim=16", "ssl.head_bottleneck_dim=8", *overrides])


def stand_in_pair(cfg, separate_ibot_head: bool = True):
    def make():
        torch.manual_seed(0)
        head = DINOHead(16, cfg.ssl.head_out_dim, hidden_dim=16, bottleneck_dim=8)
        ibot = DINOHead(16, cfg.ssl.head_out_dim, hidden_dim=16, bottleneck_dim=8) if separate_ibot_head else None
        return EncoderWithHead(StandInBackbone(), head, ibot)
    student, teacher = make(), make()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def views(batch: int = 4, channels: int = 5, seed: int = 0, local: bool = True, patches: bool = True,
          teacher_channels=None, student_channels=None, labels=None, names=None) -> StepViews:
    """A micro-batch's views as the step's owner hands them over: 2 global crops of 16 px (4 patches of 8),
    3 local crops of 8 px, patch masks of 1 masked patch in every global crop when `patches`."""
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.rand(2, batch, channels, 16, 16, generator=g)
    local_crops = torch.rand(3, batch, channels, 8, 8, generator=g) if local else None
    patch_mask = None
    if patches:
        patch_mask = torch.zeros(2, batch, 4, dtype=torch.bool)
        patch_mask[..., 1] = True
    return StepViews(global_crops=global_crops, local_crops=local_crops,
                     channel_names=names if names is not None else [CP5[:channels]] * batch,
                     teacher_channels=teacher_channels, student_channels=student_channels, patch_mask=patch_mask,
                     labels=labels)


def count_calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_ibot_objective_terms_backward_and_one_student_call():
    cfg = small_cfg("ssl.objective=ibot", "ssl.koleo_weight=0.1")
    objective = build_objective(cfg)
    assert isinstance(objective, IbotObjective)
    student, teacher = stand_in_pair(cfg)
    calls = count_calls(student)
    losses = objective(student, teacher, views(), teacher_temp=0.04)
    assert isinstance(losses, StepLosses) and len(calls) == 1
    assert {"dino_global", "dino_local", "ibot", "kl_uniform", "koleo", "mask_ratio"} <= set(losses.terms)
    assert "supcon" not in losses.terms
    assert losses.terms["mask_ratio"].item() == 0.25
    assert torch.isfinite(losses.total) and losses.terms["ibot"].item() > 0
    s = cfg.ssl
    expected = ((losses.terms["dino_global"] * 2 + losses.terms["dino_local"] * 6) / 8
                + s.ibot_loss_weight * losses.terms["ibot"] + s.kl_uniform_weight * losses.terms["kl_uniform"]
                + s.koleo_weight * losses.terms["koleo"])
    torch.testing.assert_close(losses.total, expected)
    losses.total.backward()
    for name in ("backbone.proj.weight", "backbone.mask_token", "head.mlp.0.weight", "ibot_head.mlp.0.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Student saw masked global crops (the backbone got the mask), teacher unmasked ones.
    st_global, st_local = student.backbone.calls
    assert st_global["patch_mask"] is not None and st_global["patch_mask"].shape == (8, 4)
    assert st_local["patch_mask"] is None
    assert teacher.backbone.calls[0]["patch_mask"] is None
    assert st_global["channel_names"] == [CP5] * 8  # per image, view-major
    with pytest.raises(ValueError, match="patch masks"):
        objective(student, teacher, views(patches=False), teacher_temp=0.04)


def test_ibot_objective_shared_head_and_centers_checkpointed():
    cfg = small_cfg("ssl.objective=ibot")
    objective = build_objective(cfg)
    student, teacher = stand_in_pair(cfg, separate_ibot_head=False)
    objective(student, teacher, views(local=False), teacher_temp=0.04).total.backward()
    assert student.head.mlp[0].weight.grad is not None
    assert set(objective.dino_loss.state_dict()) == {"dino.center", "ibot.center"}


@pytest.mark.parametrize("objective_name", ["dino", "ibot"])
def test_objectives_give_the_teacher_the_padding_mask_and_the_student_its_own(objective_name):
    """The teacher's backbone gets the real channels (padding mask), the student's the channels it may see
    (here a subset of the real ones), in every crop of a sample, for both objectives."""
    cfg = small_cfg(f"ssl.objective={objective_name}")
    objective = build_objective(cfg)
    student, teacher = stand_in_pair(cfg)
    padding = torch.tensor([[True] * 5 + [False], [True] * 4 + [False] * 2, [True] + [False] * 5])
    seen = padding & torch.tensor([[True, False, True, True, True, False]] * 3)
    names = [CP5 + [""], CP5[:4] + ["", ""], CP5[:1] + [""] * 5]
    step_views = views(batch=3, channels=6, names=names, teacher_channels=padding, student_channels=seen,
                       patches=objective_name == "ibot")
    objective(student, teacher, step_views, 0.04).total.backward()
    st_global, st_local = student.backbone.calls
    assert torch.equal(st_global["channel_mask"], seen.repeat(2, 1))
    assert torch.equal(st_local["channel_mask"], seen.repeat(3, 1))
    [t_global] = teacher.backbone.calls
    assert torch.equal(t_global["channel_mask"], padding.repeat(2, 1))
    assert t_global["channel_names"] == names * 2


def test_ibot_objective_supcon_only_with_labels():
    cfg = small_cfg("ssl.objective=ibot", "ssl.supcon_weight=0.5", "ssl.supcon_label=antibody")
    objective = build_objective(cfg)
    student, teacher = stand_in_pair(cfg)
    outputs = []
    student.register_forward_hook(lambda module, args, out: outputs.append(out))
    labels = ["a", "b", "a", "c"]
    with_labels = objective(student, teacher, views(labels=labels), 0.04)
    # SupCon on the student's CLS of both global crops (view-major), each image's label repeated per crop.
    expected = SupConLoss(cfg.ssl.supcon_temperature)(outputs[0]["global_cls"], label_ids(labels).repeat(2))
    torch.testing.assert_close(with_labels.terms["supcon"], expected)
    # ... entering the loss with its weight; the same labels under other names give the same term.
    without_supcon = {k: v for k, v in with_labels.terms.items() if k not in ("supcon", "mask_ratio")}
    s = cfg.ssl
    rest = ((without_supcon["dino_global"] * 2 + without_supcon["dino_local"] * 6) / 8
            + s.ibot_loss_weight * without_supcon["ibot"] + s.kl_uniform_weight * without_supcon["kl_uniform"])
    torch.testing.assert_close(with_labels.total, rest + 0.5 * expected)
    renamed = objective(student, teacher, views(labels=["x", "y", "x", "z"]), 0.04)
    torch.testing.assert_close(renamed.terms["supcon"], expected)
    with_labels.total.backward()
    assert "supcon" not in objective(student, teacher, views(labels=None), 0.04).terms


def test_dino_objective_keeps_its_terms_and_one_student_call():
    cfg = small_cfg()
    objective = build_objective(cfg)
    assert isinstance(objective, DinoObjective)
    student, teacher = stand_in_pair(cfg, separate_ibot_head=False)
    calls = count_calls(student)
    losses = objective(student, teacher, views(patches=False, labels=["x"] * 4), 0.04)
    assert set(losses.terms) == {"dino_global", "dino_local", "kl_uniform"} and len(calls) == 1
    assert all(c["patch_mask"] is None for c in student.backbone.calls)
    losses.total.backward()
    with pytest.raises(ValueError, match="masked-patch"):
        objective(student, teacher, views(), 0.04)


def test_build_student_teacher_heads_per_objective():
    cfg = small_cfg("model.img_size=16")
    student, teacher = build_student_teacher(cfg)
    assert student.ibot_head is None
    student, teacher = build_student_teacher(small_cfg("model.img_size=16", "ssl.objective=ibot"))
    assert isinstance(student.ibot_head, DINOHead) and isinstance(teacher.ibot_head, DINOHead)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_head_use_bn_makes_teacher_targets_differ_between_nearly_identical_images():
    """Inputs sharing a large common component (a random-init backbone's CLS tokens look like this)
    give nearly the same logits without BN; with ssl.head_use_bn the batch statistics remove the
    shared part, so the logits differ between images."""
    torch.manual_seed(0)
    features = 10.0 + 0.01 * torch.randn(16, 32)
    spreads = {}
    for use_bn in (False, True):
        cfg = small_cfg("model.img_size=16", f"ssl.head_use_bn={use_bn}")
        student, teacher = build_student_teacher(cfg)
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in teacher.head.modules()) == use_bn
        torch.manual_seed(1)
        head = type(teacher.head)(32, 64, hidden_dim=64, bottleneck_dim=8, use_bn=cfg.ssl.head_use_bn)
        logits = head(features)
        spreads[use_bn] = (logits - logits.mean(0)).std().item()
    assert spreads[False] < 0.01 and spreads[True] > 0.1


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    build_objective(cfg)
    check_training_config(cfg)  # objective settings are consistent (e.g. MCD has channel groups)


def test_mcd_without_channel_groups_is_refused_before_training():
    with pytest.raises(ConfigError, match="model.channel_groups"):
        check_training_config(small_cfg("ssl.objective=ibot", "ssl.mcd=true"))

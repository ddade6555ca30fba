"""Unit tests for the SSL pieces: DINO loss/centering/Sinkhorn, KL-to-uniform, multi-crop, EMA, schedules.
Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cellfm.ssl.dino_loss import DINOLoss
from cellfm.ssl.ema import update_ema
from cellfm.ssl.kl_uniform import KLUniformLoss
from cellfm.ssl.multicrop import MultiCrop
from cellfm.ssl.schedules import cosine_schedule

LN2, LN3 = math.log(2), math.log(3)


def student_logits_for(probs: list[list[float]], temp: float) -> torch.Tensor:
    """Logits whose softmax at `temp` is exactly `probs`."""
    return temp * torch.tensor(probs).log()


# ---------------------------------------------------------------- DINO loss


def test_dino_loss_single_pair_hand_computed():
    loss_fn = DINOLoss(out_dim=3, student_temp=0.1)
    # b0: student p = [1/4, 1/2, 1/4], teacher [1/2, 1/2, 0] -> -(.5 ln .25 + .5 ln .5) = 1.5 ln2
    # b1: student uniform, teacher [1/2, 1/2, 0]              -> ln3
    student = student_logits_for([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]], 0.1)[None]  # (S=1, B=2, K=3)
    teacher = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])  # (T=1, B=2, K=3)
    loss = loss_fn(student, teacher, skip_same_view=False)
    assert loss.item() == pytest.approx((1.5 * LN2 + LN3) / 2, rel=1e-6)


def test_dino_loss_pairs_and_skip_same_view():
    loss_fn = DINOLoss(out_dim=3, student_temp=0.1)
    student = student_logits_for([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]], 0.1)[:, None]
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])[:, None]  # (T=2, B=1, K=3)
    # Cross-entropy -ln p_s[argmax t]:  (s0,t0)=2ln2 (s0,t1)=ln2 (s1,*)=ln3 (s2,t0)=ln2 (s2,t1)=2ln2
    all_pairs = (2 * LN2 + LN2 + LN3 + LN3 + LN2 + 2 * LN2) / 6
    assert loss_fn(student, teacher, skip_same_view=False).item() == pytest.approx(all_pairs, rel=1e-6)
    # Without (s0,t0) and (s1,t1): (ln2 + ln3 + ln2 + 2ln2) / 4
    skipped = (LN2 + LN3 + LN2 + 2 * LN2) / 4
    assert loss_fn(student, teacher, skip_same_view=True).item() == pytest.approx(skipped, rel=1e-6)


def test_dino_loss_gradient_reaches_student_only():
    loss_fn = DINOLoss(out_dim=5)
    student = torch.randn(4, 3, 5, requires_grad=True)
    teacher_logits = torch.randn(6, 5, requires_grad=True)
    teacher = loss_fn.softmax_center_teacher(teacher_logits, teacher_temp=0.04).reshape(2, 3, 5)
    loss_fn(student, teacher, skip_same_view=True).backward()
    # The teacher's targets are constants: no gradient flows back into its logits.
    assert teacher_logits.grad is None and not teacher.requires_grad
    # The student's: d/dz of -sum_k q_k log softmax(z / tau)_k is (softmax(z / tau) - q) / tau for each
    # (student crop s, teacher crop t != s) pair, averaged over the 6 pairs and the batch of 3.
    tau = loss_fn.student_temp
    probs = torch.softmax(student.detach() / tau, dim=-1)
    expected = torch.stack([sum((probs[s] - teacher[t]) / tau for t in range(2) if t != s) for s in range(4)]) / (6 * 3)
    torch.testing.assert_close(student.grad, expected)


def test_softmax_center_teacher_and_center_update_hand_computed():
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.9)
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))
    loss_fn.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))  # batch mean [2, 2, 2]
    torch.testing.assert_close(loss_fn.center, torch.full((1, 3), 0.2))  # 0.9 * 0 + 0.1 * 2
    loss_fn.update_center(torch.tensor([[0.0, 0.0, 10.0]]))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.18, 0.18, 1.18]]))  # 0.9 * .2 + 0.1 * [0, 0, 10]

    loss_fn.center.copy_(torch.tensor([[0.0, LN2, 0.0]]))
    # (t - c) / 1 = [0, ln2, 0] -> softmax = [1, 2, 1] / 4
    probs = loss_fn.softmax_center_teacher(torch.tensor([[0.0, 2 * LN2, 0.0]]), teacher_temp=1.0)
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.5, 0.25]]))


def test_sinkhorn_knopp_rows_normalised_columns_balanced():
    torch.manual_seed(0)
    loss_fn = DINOLoss(out_dim=4)
    logits = torch.randn(8, 4) + torch.tensor([2.0, 0.0, 0.0, -1.0])  # prototype 0 over-used
    softmax_cols = F.softmax(logits / 0.5, dim=-1).sum(0)
    q3 = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.5)
    torch.testing.assert_close(q3.sum(1), torch.ones(8))
    target = torch.full((4,), 8 / 4)
    assert (q3.sum(0) - target).abs().max() < (softmax_cols - target).abs().max()
    q50 = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.5, n_iterations=50)
    torch.testing.assert_close(q50.sum(1), torch.ones(8))
    torch.testing.assert_close(q50.sum(0), target, atol=1e-3, rtol=0)


def test_sinkhorn_knopp_turns_collapsed_teacher_into_uniform_targets():
    # Every sample prefers prototype 0: equipartition is only possible with uniform rows.
    q = DINOLoss(out_dim=3).sinkhorn_knopp_teacher(torch.tensor([[5.0, 0.0, 0.0]] * 3), teacher_temp=0.1)
    torch.testing.assert_close(q, torch.full((3, 3), 1 / 3))


# ---------------------------------------------------------------- KL to uniform


def test_kl_uniform_values():
    kl = KLUniformLoss()
    assert kl(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert kl(torch.full((5, 7), 1 / 7)).item() == pytest.approx(0.0, abs=1e-6)
    # m = [.75, .25] -> .75 ln(.75 * 2) + .25 ln(.25 * 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).item() == pytest.approx(expected, rel=1e-6)


def test_kl_uniform_collapsed_is_log_k_with_finite_gradient():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 3, requires_grad=True)
    loss = KLUniformLoss()(probs)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)
    loss.backward()
    assert torch.isfinite(probs.grad).all()


# ---------------------------------------------------------------- multi-crop


def test_multicrop_shapes():
    crop = MultiCrop(global_size=24, local_size=12, n_local=3)
    g, loc = crop(torch.rand(2, 4, 40, 48))
    assert g.shape == (2, 2, 4, 24, 24)
    assert loc.shape == (3, 2, 4, 12, 12)
    g, loc = MultiCrop(global_size=16, local_size=8, n_local=0)(torch.rand(2, 1, 32, 32))
    assert g.shape == (2, 2, 1, 16, 16) and loc is None


def test_multicrop_same_box_for_every_channel():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, 32, 32).expand(3, 5, 32, 32)
    g, loc = MultiCrop(16, 8, n_local=4, intensity_jitter=0.0)(images, gen)
    for views in (g, loc):
        assert torch.equal(views, views[:, :, :1].expand_as(views))
    # With jitter each channel is a positive affine map of the same crop: standardised channels agree.
    g, _ = MultiCrop(16, 8, n_local=0, intensity_jitter=0.3)(images, gen)
    flat = g.flatten(-2)
    z = (flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True)
    torch.testing.assert_close(z, z[:, :, :1].expand_as(z), atol=1e-4, rtol=0)
    assert (flat[:, :, 0] - flat[:, :, 1]).abs().max() > 1e-3  # but intensities differ per channel


def test_multicrop_full_box_reproduces_resized_input():
    images = torch.rand(2, 3, 32, 32)
    kwargs = dict(global_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, rot90=False, intensity_jitter=0.0)
    same, _ = MultiCrop(32, 8, n_local=0, **kwargs)(images)
    torch.testing.assert_close(same, images.expand(2, -1, -1, -1, -1))
    small, _ = MultiCrop(16, 8, n_local=0, **kwargs)(images)
    resized = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small, resized.expand(2, -1, -1, -1, -1))


def test_multicrop_flips_and_rotations_are_dihedral_transforms():
    images = torch.rand(4, 2, 16, 16)
    crop = MultiCrop(16, 8, n_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), intensity_jitter=0.0)
    g, _ = crop(images, torch.Generator().manual_seed(0))
    dihedral = [torch.rot90(f, k, dims=(-2, -1)) for f in (images, images.flip(-1)) for k in range(4)]
    for view in g:
        for b in range(4):
            assert any(torch.allclose(view[b], d[b], atol=1e-5) for d in dihedral)
    assert not torch.allclose(g, images.expand_as(g), atol=1e-5)  # the views are not all the identity


def test_multicrop_local_views_are_smaller_regions():
    # A horizontal ramp: a crop's value range tells the box width (in input pixels).
    ramp = torch.linspace(0, 1, 64).expand(8, 1, 64, 64).contiguous()
    crop = MultiCrop(32, 16, n_local=6, flip=False, rot90=False, intensity_jitter=0.0)
    g, loc = crop(ramp, torch.Generator().manual_seed(3))
    width = lambda v: v.amax(dim=(-3, -2, -1)) - v.amin(dim=(-3, -2, -1))  # noqa: E731
    assert width(g).min() > math.sqrt(0.32 * 3 / 4) - 0.05
    assert width(loc).max() < math.sqrt(0.32 * 4 / 3) + 0.02


def test_multicrop_deterministic_with_seeded_generator():
    images = torch.rand(2, 3, 32, 32)
    crop = MultiCrop(16, 8, n_local=2)
    a = crop(images, torch.Generator().manual_seed(7))
    b = crop(images, torch.Generator().manual_seed(7))
    c = crop(images, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- EMA and schedules


def test_update_ema():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    update_ema(teacher, student, momentum=1.0)
    assert all(torch.equal(teacher.state_dict()[k], t0[k]) for k in t0)
    update_ema(teacher, student, momentum=0.5)
    for k in t0:
        torch.testing.assert_close(teacher.state_dict()[k], (t0[k] + s0[k]) / 2)
    update_ema(teacher, student, momentum=0.0)
    assert all(torch.equal(teacher.state_dict()[k], s0[k]) for k in s0)
    with pytest.raises(KeyError, match="no student counterpart"):
        update_ema(nn.Sequential(teacher), student, momentum=0.5)


def test_update_ema_from_a_bf16_student_keeps_the_teacher_fp32():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2).to(torch.bfloat16), nn.Linear(3, 2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_ema(teacher, student, momentum=0.5)
    for k, v in teacher.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, (t0[k] + student.state_dict()[k].float()) / 2)


def test_cosine_schedule():
    s = cosine_schedule(1.0, 0.1, total_steps=100, warmup_steps=10, start_warmup_value=0.0, freeze_steps=5)
    assert len(s) == 100
    assert np.all(s[:5] == 0)
    np.testing.assert_allclose(s[5:15], np.arange(10) / 10)  # linear warmup from 0 towards base
    assert s[15] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[15:]) <= 0)
    np.testing.assert_allclose(s[15 + 42], 0.55, atol=0.02)  # half-way down the cosine (85 steps)

    plain = cosine_schedule(0.992, 1.0, total_steps=50)
    assert len(plain) == 50 and plain[0] == pytest.approx(0.992) and plain[-1] == pytest.approx(1.0)
    assert len(cosine_schedule(1.0, 0.0, total_steps=0)) == 0
    with pytest.raises(ValueError, match="exceed"):
        cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=8, freeze_steps=3)

"""The one training step (cellfm.train.meta_arch.SSLMetaArch) on one process, with the real tiny backbones:
padding changes nothing for any self-distilled model (student and teacher outputs, loss, gradients; CA-MAE's
step: tests/test_ca_mae.py), ChannelViT trains with
hierarchical channel sampling, every draw comes from the step's position, the heads' last layers stay frozen
for the configured steps, and gradients are clipped."""

from __future__ import annotations

import pytest
import torch

from cellfm.config import load_config
from cellfm.data.batch import FieldBatch
from cellfm.train.meta_arch import SSLMetaArch
from tests.conftest import SMOKE_CONFIG

CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]
C3R_GROUPS = "{DNA: context, ER: context, RNA: context, AGP: context, Mito: concept}"
IBOT = ["ssl.objective=ibot"]
# Each model with the objective (and channel sampling) it trains with; as tests/test_all_models_train.py.
MODELS = {
    "cellrep": ["ssl.objective=dino"],
    "c3r": [*IBOT, "ssl.mcd=true", f"model.channel_groups={C3R_GROUPS}", "ssl.koleo_weight=0.1"],
    "vit_rgb": IBOT,
    "channelvit": [*IBOT, f"model.channel_vocabulary=[{', '.join(CP5)}]"],
    "single_channel": IBOT,
    # DCS draws from the student's channel embeddings, the token loss sees the student's channels only.
    "dichavit": [*IBOT, f"model.channel_vocabulary=[{', '.join(CP5)}]", "ssl.token_orthogonality_weight=0.1"],
}


def step_cfg(model: str, *overrides: str):
    """Tiny backbone, 16-px global / 8-px local crops of 32-px fields."""
    return load_config(SMOKE_CONFIG, [f"model.name={model}", *MODELS[model], "ssl.global_crop_size=16",
                                      "ssl.local_crop_size=8", "ssl.n_local_crops=2", "ssl.mask_sample_probability=1.0",
                                      *overrides])


def meta_arch(cfg, steps_per_epoch: int = 4) -> SSLMetaArch:
    return SSLMetaArch(cfg, steps_per_epoch=steps_per_epoch, rank=0, world_size=1, device=torch.device("cpu"),
                       prepare_model=lambda model: model)


def fields(batch: int = 3, seed: int = 0) -> FieldBatch:
    """batch fields of 4 real channels (each sample its own channel order), 32 x 32."""
    g = torch.Generator().manual_seed(seed)
    names = [[CP5[i] for i in torch.randperm(5, generator=g)[:4].tolist()] for _ in range(batch)]
    return FieldBatch(torch.rand(batch, 4, 32, 32, generator=g), names)


def padded(batch: FieldBatch, extra: int = 2) -> FieldBatch:
    """The same fields with `extra` padded channels at the end, filled with garbage (a model must mask them)."""
    B, C, H, W = batch.images.shape
    garbage = torch.rand(B, extra, H, W, generator=torch.Generator().manual_seed(99)) * 5
    mask = torch.cat([torch.ones(B, C, dtype=torch.bool), torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    return FieldBatch(torch.cat([batch.images, garbage], dim=1), [names + [""] * extra for names in batch.channel_names],
                      channel_mask=mask)


def record_outputs(module: torch.nn.Module) -> list[dict]:
    outputs: list[dict] = []
    module.register_forward_hook(lambda _m, _a, out: outputs.append({k: v.detach().clone() for k, v in out.items()}))
    return outputs


def record_backbone_masks(meta: SSLMetaArch) -> dict[str, list]:
    """The channel_mask each backbone call of the student and the teacher received."""
    seen: dict[str, list] = {"student": [], "teacher": []}
    for role, backbone in (("student", meta.student.backbone), ("teacher", meta.teacher.backbone)):
        backbone.register_forward_pre_hook(
            lambda _m, _a, kwargs, role=role: seen[role].append(kwargs["channel_mask"]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("model", list(MODELS))
def test_padding_changes_nothing_in_a_training_step(model):
    """For each model, with its objective and channel sampling: a batch padded with extra masked (garbage)
    channels gives the student and teacher outputs, the loss terms and the student's gradients of the
    unpadded batch, at the same step position. Both backbones got the padding mask."""
    cfg = step_cfg(model)
    plain_arch, padded_arch = meta_arch(cfg), meta_arch(cfg)  # same seed: same initial weights
    outputs = {}
    for name, arch in (("plain", plain_arch), ("padded", padded_arch)):
        student, teacher = record_outputs(arch.student), record_outputs(arch.teacher)
        masks = record_backbone_masks(arch)
        batch = fields() if name == "plain" else padded(fields())
        losses = arch.forward_backward(batch, epoch=1, step=2, micro=0)
        outputs[name] = (student, teacher, losses, {n: p.grad.clone() for n, p in arch.student.named_parameters()
                                                    if p.grad is not None}, masks)
    (s_plain, t_plain, l_plain, g_plain, _), (s_pad, t_pad, l_pad, g_pad, masks) = outputs["plain"], outputs["padded"]
    tol = dict(rtol=1e-4, atol=1e-5)
    for plain, pad in ((s_plain, s_pad), (t_plain, t_pad)):
        assert len(plain) == len(pad) == 1 and set(plain[0]) == set(pad[0])
        for key in plain[0]:
            torch.testing.assert_close(pad[0][key], plain[0][key], **tol, msg=f"{model} output {key}")
    assert set(l_plain.terms) == set(l_pad.terms)
    torch.testing.assert_close(l_pad.total, l_plain.total, **tol)
    for key in l_plain.terms:
        torch.testing.assert_close(l_pad.terms[key], l_plain.terms[key], **tol, msg=f"{model} term {key}")
    assert set(g_plain) == set(g_pad) and len(g_plain) > 0
    for key in g_plain:
        torch.testing.assert_close(g_pad[key], g_plain[key], rtol=1e-3, atol=1e-5, msg=f"{model} grad {key}")
    # Every backbone call of the padded batch carried a mask hiding the padding, in every crop.
    for role in ("student", "teacher"):
        assert masks[role] and all(m is not None and not m[:, 4:].any() for m in masks[role]), role


def test_channelvit_trains_with_hierarchical_channel_sampling_and_the_teacher_sees_every_channel():
    batch = FieldBatch(torch.rand(64, 5, 32, 32), [CP5] * 64)
    arch = meta_arch(step_cfg("channelvit"))
    assert arch.channel_sampling == "hcs"  # ssl.channel_sampling=auto on ChannelViT
    masks = record_backbone_masks(arch)
    losses = arch.forward_backward(batch, epoch=0, step=0, micro=0)
    student_global, student_local = masks["student"]
    assert student_global.shape == (2 * 64, 5)
    kept = student_global[:64].sum(dim=1)
    assert set(kept.tolist()) == {1, 2, 3, 4, 5}  # m ~ U{1..5} per sample
    assert torch.equal(student_global, student_global[:64].repeat(2, 1))  # same channels in every crop
    assert torch.equal(student_local, student_global[:64].repeat(2, 1))
    assert masks["teacher"] == [None]  # nothing padded: the teacher sees all channels
    assert losses.terms["student_channels_seen"].item() == pytest.approx(kept.float().mean().item())

    # With padding the student's channels are a subset of the real ones; the teacher gets the padding mask.
    arch = meta_arch(step_cfg("channelvit"))
    masks = record_backbone_masks(arch)
    with_padding = padded(FieldBatch(torch.rand(64, 5, 32, 32), [CP5] * 64), extra=1)
    arch.forward_backward(with_padding, epoch=0, step=0, micro=0)
    assert not masks["student"][0][:, 5].any() and masks["student"][0].any(dim=1).all()
    assert torch.equal(masks["teacher"][0], with_padding.channel_mask.repeat(2, 1))

    # Switched off (and never for other models by default): the student sees every real channel.
    for cfg in (step_cfg("channelvit", "ssl.channel_sampling=none"), step_cfg("cellrep")):
        arch = meta_arch(cfg)
        masks = record_backbone_masks(arch)
        arch.forward_backward(batch, epoch=0, step=0, micro=0)
        assert all(m is None for m in masks["student"] + masks["teacher"])


def test_every_draw_is_a_function_of_the_step_position():
    arch = meta_arch(step_cfg("c3r"))
    batch = fields(batch=4)
    a = arch.views(batch, epoch=0, step=3, micro=1)
    b = arch.views(batch, epoch=0, step=3, micro=1)
    for key in ("global_crops", "local_crops", "student_channels", "patch_mask"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    for position in (dict(epoch=0, step=3, micro=0), dict(epoch=0, step=4, micro=1), dict(epoch=1, step=3, micro=1)):
        other = arch.views(batch, **position)
        assert not torch.equal(other.global_crops, a.global_crops), position
        assert not torch.equal(other.patch_mask, a.patch_mask), position


def _last_layer(arch: SSLMetaArch) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in arch.student.named_parameters() if ".last_layer." in n}


def test_last_layer_frozen_for_the_configured_steps_only():
    """ssl.freeze_last_layer_epochs=1 with 2 steps per epoch: steps 0 and 1 leave the heads' prototypes
    bit-unchanged while the rest of the student moves; step 2 moves them too."""
    arch = meta_arch(step_cfg("vit_rgb", "ssl.freeze_last_layer_epochs=1", "optim.epochs=2"), steps_per_epoch=2)
    assert arch.schedules.last_layer_frozen_steps == 2
    before = _last_layer(arch)
    assert {n.split(".")[0] for n in before} == {"head", "ibot_head"}
    for step in range(3):
        arch.forward_backward(fields(batch=4, seed=step), epoch=step // 2, step=step, micro=0)
        rest = {n: p.detach().clone() for n, p in arch.student.named_parameters()
                if ".last_layer." not in n and p.grad is not None and p.grad.abs().sum() > 0}
        assert len(rest) > 10
        arch.optimizer_step(step)
        after = _last_layer(arch)
        unchanged = all(torch.equal(after[n], before[n]) for n in before)
        assert unchanged == (step < 2), step
        moved = dict(arch.student.named_parameters())
        assert all(not torch.equal(moved[n], value) for n, value in rest.items()), step
        before = after


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_gradients_are_clipped_to_optim_clip_grad(clip):
    """The norm AdamW steps with is min(norm, clip): with a tiny clip the gradient (norm > clip) is scaled
    down to it, with a huge one it is left as is. engine.step returns the norm before clipping."""
    arch = meta_arch(step_cfg("cellrep", f"optim.clip_grad={clip}", "ssl.freeze_last_layer_epochs=0"))
    at_step: list[float] = []

    def grad_norm(_optimizer, _args, _kwargs):
        grads = [p.grad for p in arch.student.parameters() if p.grad is not None]
        at_step.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    arch.engine.optimizer.register_step_pre_hook(grad_norm)
    arch.forward_backward(fields(batch=4), epoch=0, step=0, micro=0)
    before_clip = arch.optimizer_step(0)
    [applied] = at_step
    if clip < 1:
        assert before_clip > 10 * clip  # the case that needs clipping
        assert applied == pytest.approx(clip, rel=1e-4)
    else:
        assert applied == pytest.approx(before_clip, rel=1e-6) and applied < clip

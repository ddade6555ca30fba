"""Padding has no effect, for every backbone: a field padded with extra masked channels (zeros or garbage,
at the end, in the middle, at the front) embeds exactly as the unpadded field, in every mode a backbone
runs in (student: train mode with gradients; teacher: train mode without; evaluation: eval mode), with
and without an iBOT patch mask, in a batch that mixes 4-, 3- and 1-channel fields."""

from __future__ import annotations

import pytest
import torch

from cellfm.config import ModelConfig
from cellfm.models.registry import build_backbone

NAMES = ["c0", "c1", "c2", "c3", "c4"]
# c2 and c3 are C3R concept stains: the 1-channel field below has no context channel (absent group).
GROUPS = {"c0": "context", "c1": "context", "c2": "concept", "c3": "concept", "c4": "context"}
IMG = 16
TOL = dict(atol=2e-5, rtol=1e-5)

MODELS = {
    "cellrep": dict(name="cellrep"),
    "cellrep_pooling2": dict(name="cellrep", pooling_ratio=2),
    "cellrep_percentile": dict(name="cellrep", input_norm="percentile"),
    "c3r": dict(name="c3r"),
    "channelvit": dict(name="channelvit"),
    "vit_rgb": dict(name="vit_rgb"),
    "single_channel": dict(name="single_channel"),
    "dichavit": dict(name="dichavit"),
    "ca_mae": dict(name="ca_mae"),
}

# Each padded row: real channels by name, "" for padding, and what the padded planes hold.
NAN, BIG = float("nan"), 1e6
FIELDS = [
    (["c0", "c1", "c2", "c3", "", ""], [0.0, 0.0]),  # 4 real channels, zero padding at the end
    (["", "c2", "", "c0", "c4", ""], [NAN, BIG, -BIG]),  # 3 real, garbage in front, middle and end
    (["", "", "c3", "", "", ""], [NAN, float("inf"), 0.0, -BIG, NAN]),  # 1 real (C3R: context group absent)
]


def build(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # No layerscale and no stochastic depth: channel effects are not damped, and train mode is deterministic.
    cfg = ModelConfig(size="tiny", img_size=IMG, patch_size=4, num_register_tokens=2, layerscale_init=None,
                      drop_path_rate=0.0, channel_groups=GROUPS, channel_vocabulary=NAMES, **MODELS[model])
    return build_backbone(cfg)


def padded_batch(generator: torch.Generator):
    """(padded images (3, 6, H, W), names, channel_mask) and each field unpadded ((1, C_i, H, W), names)."""
    images, names, masks, unpadded = [], [], [], []
    for row, fill in FIELDS:
        real = [i for i, n in enumerate(row) if n]
        field = torch.randn(len(real), IMG, IMG, generator=generator)
        planes = torch.empty(len(row), IMG, IMG)
        planes[real] = field
        padding = [i for i, n in enumerate(row) if not n]
        for i, value in zip(padding, fill):
            planes[i] = value
        images.append(planes)
        names.append(row)
        masks.append([bool(n) for n in row])
        unpadded.append((field[None], [row[i] for i in real]))
    return torch.stack(images), names, torch.tensor(masks), unpadded


MODES = {
    "student": (True, True),  # (train mode, gradients)
    "teacher": (True, False),
    "eval": (False, False),
}


@pytest.mark.parametrize("with_patch_mask", [False, True], ids=["no_patch_mask", "patch_mask"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_padded_field_embeds_as_the_unpadded_field(model_name, mode, with_patch_mask):
    model = build(model_name)
    train, grad = MODES[mode]
    model.train(train)
    g = torch.Generator().manual_seed(1)
    x, names, channel_mask, unpadded = padded_batch(g)
    N = model.num_patch_tokens(IMG)
    patch_mask = torch.rand(len(FIELDS), N, generator=g) < 0.4 if with_patch_mask else None
    with torch.set_grad_enabled(grad):
        out = model(x, channel_names=names, channel_mask=channel_mask, patch_mask=patch_mask)
        for b, (field, field_names) in enumerate(unpadded):
            ref = model(field, channel_names=field_names, patch_mask=None if patch_mask is None else patch_mask[b:b + 1])
            for key in ("cls", "patch", "registers"):
                assert torch.isfinite(out[key][b]).all(), (key, b)
                torch.testing.assert_close(out[key][b:b + 1], ref[key], **TOL, msg=lambda m: f"{key}, field {b}: {m}")
    if grad:  # padding garbage must not reach the gradients either
        (out["cls"].sum() + out["patch"].mean()).backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, bad


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_unpadded_reference_is_sensitive_to_the_real_channels(model_name):
    """The equality above is not vacuous: changing one real channel of a field changes its embedding."""
    model = build(model_name).eval()
    g = torch.Generator().manual_seed(1)
    x, names, channel_mask, _ = padded_batch(g)
    changed = x.clone()
    changed[1, 3] = torch.randn(IMG, IMG, generator=g)  # field 1's real channel c0
    with torch.no_grad():
        a = model(x, channel_names=names, channel_mask=channel_mask)
        b = model(changed, channel_names=names, channel_mask=channel_mask)
    assert (a["cls"][1] - b["cls"][1]).abs().max() > 1e-3
    torch.testing.assert_close(a["cls"][[0, 2]], b["cls"][[0, 2]], **TOL)  # the other fields are untouched

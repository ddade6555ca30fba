"""CellRep's cheaper channel mixing (model.channel_mixer=axial, model.channel_pool_after) and the stain-keeping
attention pooling of CellRep and C3R (model.channel_pooling=attention): exact invariance to all 120 orders of 5
channels and to padded channels, one output size for 1..6 channels, gradients in every new parameter, the
defaults unchanged, config rules, and a short in-memory training that lowers the loss with each option."""

from __future__ import annotations

import itertools

import pytest
import torch

from cellfm.config import ModelConfig, config_problems, load_config
from cellfm.models.c3r import C3R
from cellfm.models.cellrep import CellRep
from cellfm.models.layers import Block, ChannelAttentionPool, ChannelAxialAttention
from cellfm.models.registry import build_backbone
from cellfm.train.in_memory import train_in_memory
from tests.conftest import SMOKE_CONFIG

IMG, PATCH, D = 16, 8, 24
NAMES = ["DNA", "ER", "RNA", "AGP", "Mito", "Golgi"]
GROUPS = {"DNA": "context", "ER": "context", "RNA": "concept", "AGP": "context", "Mito": "concept",
          "Golgi": "context", "PAD": "context"}
TOL = dict(atol=1e-10, rtol=0)

CELLREP_OPTIONS = {
    "axial": dict(channel_mixer="axial"),
    "pool_after_1": dict(channel_pool_after=1),
    "axial_pool_after_0": dict(channel_mixer="axial", channel_pool_after=0),
    "attention_pool": dict(channel_pooling="attention"),
    "axial_pool_after_1_attention_pool": dict(channel_mixer="axial", channel_pool_after=1, channel_pooling="attention"),
}


def cellrep(**options) -> CellRep:
    torch.manual_seed(0)
    return CellRep(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=2, mixer_depth=2,
                   channel_encoder_dim=8, layerscale_init=0.1, **options).double().eval()


def c3r(**options) -> C3R:
    torch.manual_seed(0)
    return C3R(channel_groups=GROUPS, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=2, n_pre=1,
               layerscale_init=0.1, **options).double().eval()


def variants() -> list[tuple[str, callable]]:
    """(id, a function building the model) for every new option: CellRep's and C3R's."""
    out = [(f"cellrep-{name}", lambda o=o: cellrep(**o)) for name, o in CELLREP_OPTIONS.items()]
    return out + [("c3r-attention_pool", lambda: c3r(channel_pooling="attention"))]


VARIANTS = variants()


def images(C: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, C, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("build", [b for _, b in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_exactly_invariant_to_all_120_channel_orders(build):
    model = build()
    x = images(5)
    perms = list(itertools.permutations(range(5)))
    # All 120 orders of both images in one batch (per-sample channel orders and names).
    permuted = torch.cat([x[:, list(perm)] for perm in perms])
    names = [[NAMES[i] for i in perm] for perm in perms for _ in range(2)]
    with torch.no_grad():
        ref = model(x, channel_names=NAMES[:5])
        out = model(permuted, channel_names=names)
    assert len(perms) == 120
    torch.testing.assert_close(out["cls"], ref["cls"].repeat(120, 1), **TOL)
    torch.testing.assert_close(out["patch"], ref["patch"].repeat(120, 1, 1), **TOL)
    # ... and not a constant: another image, or one channel's content changed, changes the embedding.
    with torch.no_grad():
        changed = x.clone()
        changed[:, 2] = changed[:, 2].flip(-1)
        assert (model(changed, channel_names=NAMES[:5])["cls"] - ref["cls"]).abs().max() > 1e-4


@pytest.mark.parametrize("build", [b for _, b in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_padded_channels_have_no_effect(build):
    model = build()
    x = images(4)
    with torch.no_grad():
        ref = model(x, channel_names=NAMES[:4])
        # Two padded planes of garbage, one between real channels and one at the end.
        garbage = 1e3 * images(2, seed=7)
        padded = torch.cat([x[:, :2], garbage[:, :1], x[:, 2:], garbage[:, 1:]], dim=1)
        names = NAMES[:2] + ["PAD"] + NAMES[2:4] + ["PAD"]
        mask = torch.tensor([True, True, False, True, True, False]).expand(2, 6)
        out = model(padded, channel_names=names, channel_mask=mask)
    torch.testing.assert_close(out["cls"], ref["cls"], **TOL)
    torch.testing.assert_close(out["patch"], ref["patch"], **TOL)


@pytest.mark.parametrize("build", [b for _, b in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_one_output_size_for_1_to_6_channels(build):
    model = build()
    with torch.no_grad():
        shapes = {C: tuple(model(images(C), channel_names=NAMES[:C])["patch"].shape) for C in range(1, 7)}
        cls = {C: tuple(model(images(C), channel_names=NAMES[:C])["cls"].shape) for C in range(1, 7)}
    assert set(shapes.values()) == {(2, (IMG // PATCH) ** 2, D)} and set(cls.values()) == {(2, D)}


@pytest.mark.parametrize("build", [b for _, b in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_gradient_reaches_every_parameter(build):
    model = build().train()
    out = model(images(5), channel_names=NAMES[:5])
    (out["cls"].square().sum() + out["patch"].square().mean()).backward()
    # The mask token only takes part with a patch_mask, C3R's absent token only when a group has no channel (both
    # kept in the graph with a 0 gradient).
    no_grad = [n for n, p in model.named_parameters()
               if n not in ("mask_token", "absent_token") and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert no_grad == []
    model.parameter_layout()  # every new parameter is placed at a depth (layer-wise lr decay)


def test_defaults_are_todays_cellrep_and_c3r():
    """Reference values computed with the CellRep of commit e56a1cf (before these options existed)."""
    model = cellrep()
    assert model.channel_pool is None and all(isinstance(m, Block) for m in model.mixer)
    assert not any(isinstance(m, (ChannelAttentionPool, ChannelAxialAttention)) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 31208
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    with torch.no_grad():
        out = model(images(5), channel_mask=mask)
    w = torch.linspace(-1, 1, D, dtype=torch.float64)
    torch.testing.assert_close(out["cls"][0, :3], torch.tensor(
        [-1.3752147124226743, -0.8283113810073535, -2.4425982881564967], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(out["patch"][1, 2, :3], torch.tensor(
        [-0.21057626850300828, -1.0538891176383496, 1.4358234674518513], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(out["cls"] @ w, torch.tensor([0.9041653335996078, 0.9168481850966415],
                                                            dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close((out["patch"] @ w).sum(dim=1), torch.tensor([14.80802189541743, 11.754680594392457],
                                                                           dtype=torch.float64), atol=1e-9, rtol=0)
    assert c3r().channel_pools is None
    assert not any(isinstance(m, ChannelAttentionPool) for m in c3r().modules())


def test_attention_pooling_keeps_which_stain_showed_what():
    """Channel 1 shows (p, q) at two positions and channel 2 (r, s); swap what the stains show at the second
    position: the channel mean at every position is the same, attention pooling is not (it chooses slots by each
    channel's whole content)."""
    torch.manual_seed(0)
    pool = ChannelAttentionPool(8, num_queries=3).double()
    p, q, r, s = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = torch.stack([torch.stack([p, q]), torch.stack([r, s])])[None]  # (1, C=2, N=2, D)
    after = torch.stack([torch.stack([p, s]), torch.stack([r, q])])[None]
    torch.testing.assert_close(before.mean(dim=1), after.mean(dim=1))
    assert (pool(before) - pool(after)).abs().max() > 1e-3
    # The weights: a softmax over the real channels per query (padding gets exactly 0).
    w = pool.channel_weights(torch.cat([before, before[:, :1]], dim=1), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(1, 3, dtype=torch.float64))
    assert bool((w[..., 2] == 0).all())


def test_registry_builds_the_options_and_rejects_bad_values():
    cfg = ModelConfig(name="cellrep", size="tiny", channel_mixer="axial", channel_pool_after=1,
                      channel_pooling="attention", channel_pooling_queries=3)
    model = build_backbone(cfg)
    assert all(isinstance(m, ChannelAxialAttention) for m in model.mixer) and model.channel_pool_after == 1
    assert model.channel_pool.queries.shape == (3, 96)
    c3r_model = build_backbone(ModelConfig(name="c3r", size="tiny", channel_pooling="attention"))
    assert set(c3r_model.channel_pools) == {"context", "concept"}
    with pytest.raises(ValueError, match="channel_pool_after"):
        cellrep(channel_pool_after=3)
    with pytest.raises(ValueError, match="pooling_ratio=1"):
        cellrep(channel_pooling="attention", pooling_ratio=2)


@pytest.mark.parametrize("overrides, problem", [
    (["model.channel_mixer=axial", "model.name=c3r"], "model.channel_mixer=axial is a CellRep setting"),
    (["model.channel_mixer=diagonal"], "model.channel_mixer"),
    (["model.channel_pool_after=3"], "model.channel_pool_after must be in [0, model.mixer_depth=2]"),
    (["model.channel_pool_after=1", "model.name=vit_rgb"], "model.channel_pool_after is a CellRep setting"),
    (["model.channel_pooling=attention", "model.pooling_ratio=2"], "needs model.pooling_ratio=1"),
    (["model.channel_pooling=attention", "model.name=channelvit"], "model.channel_pooling=attention is for"),
    (["model.channel_pooling=max"], "model.channel_pooling"),
    (["model.channel_pooling_queries=0"], "model.channel_pooling_queries"),
])
def test_config_rules_name_the_key(overrides, problem):
    cfg = load_config(SMOKE_CONFIG, overrides, check_rules=False)
    assert any(problem in line for line in config_problems(cfg)), config_problems(cfg)
    fine = load_config(SMOKE_CONFIG, ["model.channel_mixer=axial", "model.channel_pool_after=2",
                                      "model.channel_pooling=attention"], check_rules=False)
    assert config_problems(fine) == []


CP5 = NAMES[:5]
# Stationary targets (as tests/test_all_models_train.py): fixed teacher temperature, teacher frozen at its initial
# weights, center = the batch mean, so the student minimises a fixed objective.
STATIONARY = ["ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=1.0",
              "ssl.ema_momentum_end=1.0", "ssl.center_momentum=0.0", "ssl.freeze_last_layer_epochs=0",
              "optim.base_lr=2.0e-2", "optim.batch_size_per_worker=4", "optim.epochs=3"]
C3R_ATTENTION = ["model.name=c3r", "ssl.objective=ibot", "ssl.kl_uniform_weight=0.0", "model.channel_pooling=attention",
                 "model.channel_groups={DNA: context, ER: context, RNA: context, AGP: context, Mito: concept}"]


@pytest.mark.parametrize("options", [
    ["model.channel_mixer=axial"], ["model.channel_pool_after=1"], ["model.channel_pooling=attention"], C3R_ATTENTION,
], ids=["cellrep-axial", "cellrep-pool_after_1", "cellrep-attention_pool", "c3r-attention_pool"])
def test_in_memory_training_lowers_the_loss(options):
    cfg = load_config(SMOKE_CONFIG, STATIONARY + options)
    fields = torch.rand(16, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    losses: dict[int, list[float]] = {}
    train_in_memory(cfg, fields, CP5, on_step=lambda epoch, step, l: losses.setdefault(epoch, []).append(
        float(l.total.detach())))
    first, last = (sum(v) / len(v) for v in (losses[0], losses[cfg.optim.epochs - 1]))
    assert last < first, losses

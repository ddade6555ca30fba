"""The channel-agnostic MAE baseline (model `ca_mae`, `ssl.objective: mae`): the reconstruction loss on hand-computed
cases, the token masking's exact counts, the encoder's invariance to channel order, the visible-token encoder
against full attention with the hidden tokens masked out, padding in the training step, and a few in-memory
training steps that lower the loss and give embeddings the evaluation takes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cellfm.config import ConfigError, ModelConfig, load_config
from cellfm.data.batch import FieldBatch
from cellfm.features.embed import field_embedding
from cellfm.models.ca_mae import ChannelAgnosticMAE, self_standardize
from cellfm.models.layers import sincos_pos_embed_2d
from cellfm.models.registry import build_backbone
from cellfm.ssl.mae_loss import MAELoss, patchify, unpatchify
from cellfm.ssl.token_masking import random_token_mask, visible_token_counts
from cellfm.train.in_memory import train_in_memory
from cellfm.train.meta_arch import SSLMetaArch
from tests.conftest import SMOKE_CONFIG

CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]
MAE = ["model.name=ca_mae", "ssl.objective=mae", "ssl.n_local_crops=0"]


def tiny_encoder() -> ChannelAgnosticMAE:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(name="ca_mae", size="tiny", img_size=16, patch_size=4, layerscale_init=None))


def test_patchify_orders_tokens_like_the_patch_grid_and_unpatchify_inverts_it():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(x, 2)  # grid 2 x 3
    assert patches.shape == (2, 3, 6, 4)
    # token l = row * 3 + col holds the 2 x 2 block at (2 row, 2 col), its pixels row-major
    assert patches[1, 2, 4].tolist() == x[1, 2, 2:4, 2:4].flatten().tolist()
    assert patches[0, 0, 2].tolist() == x[0, 0, 0:2, 4:6].flatten().tolist()
    assert torch.equal(unpatchify(patches, (2, 3), 2), x)


def test_mae_loss_mse_over_masked_patches_only_and_the_fourier_term_by_hand():
    """1 sample, 2 channels of 4 x 4 px, patch 2 (L = 4 tokens of 4 px), target 0. Channel 0 predicts 1 on
    token 0, 2 on token 1, 100 on tokens 2 and 3; channel 1 predicts 3 on token 2, 100 elsewhere. Masked:
    (0, 0), (0, 1), (1, 2): mse = (1 + 4 + 9) / 3, whatever the unmasked tokens predict."""
    target = torch.zeros(1, 2, 4, 4)
    prediction = torch.full((1, 2, 4, 4), 100.0)
    prediction[0, 0, 0], prediction[0, 0, 1], prediction[0, 1, 2] = 1.0, 2.0, 3.0
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True
    loss = MAELoss(patch_size=2, fourier_weight=0.0)
    total, mse, _ = loss(prediction, target, mask, None, (2, 2))
    assert mse.item() == pytest.approx(14 / 3) and total.item() == pytest.approx(14 / 3)
    # A padded channel's tokens are never scored, even when marked masked.
    _, mse, _ = loss(prediction, target, mask, torch.tensor([[True, False]]), (2, 2))
    assert mse.item() == pytest.approx(5 / 2)

    # Fourier term by hand: a constant a on a 2 x 2 image has |FFT| = 4a at DC and 0 elsewhere, so against
    # a zero target the mean over the 4 frequencies is a. Channels a = 3 and a = 1: mean 2; channel 1 padded: 3.
    constant = torch.tensor([3.0, 1.0])[None, :, None, None].expand(1, 2, 1, 4)
    every = torch.ones(1, 2, 1, dtype=torch.bool)
    total, mse, fourier = MAELoss(patch_size=2, fourier_weight=0.5)(constant, torch.zeros(1, 2, 1, 4), every, None,
                                                                     (1, 1))
    assert fourier.item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(mse.item() + 0.5 * 2.0)
    _, _, fourier = MAELoss(patch_size=2)(constant, torch.zeros(1, 2, 1, 4), every, torch.tensor([[True, False]]),
                                          (1, 1))
    assert fourier.item() == pytest.approx(3.0)


def test_fourier_term_against_torch_fft():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    mask = torch.rand(2, 3, 9, generator=g) < 0.5
    _, _, fourier = MAELoss(patch_size=2)(prediction, target, mask, None, (3, 3))
    pred_img, target_img = unpatchify(prediction, (3, 3), 2), unpatchify(target, (3, 3), 2)
    expected = (torch.fft.fft2(pred_img).abs() - torch.fft.fft2(target_img).abs()).abs().mean()
    assert fourier.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9])
def test_masking_keeps_exactly_the_configured_number_of_tokens_per_sample(ratio):
    valid = torch.tensor([[True] * 5, [True, True, False, True, False], [False, False, True, False, False]] * 50)
    L = 16
    mask = random_token_mask(valid, L, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (150, 5, L) and mask[~valid].all()  # a padded channel is never visible
    visible = (~mask).sum(dim=(1, 2))
    # floor((1 - ratio) * n) of the n = 16 * real channels, exactly (0.1 * 80 is 8, not float's 7.999...)
    expected = [max(1, math.floor(round((1 - ratio) * L * n, 9))) for n in valid.sum(dim=1).tolist()]
    assert visible.tolist() == expected
    assert expected[:3] == {0.75: [20, 12, 4], 0.5: [40, 24, 8], 0.9: [8, 4, 1]}[ratio]
    assert visible_token_counts(valid[:1], L, 0.75).item() == 20  # Phenom's default: a quarter of 80 tokens
    # Every real token is hidden about `ratio` of the time (uniform choice), not always the same ones.
    hidden = mask[0::3].float().mean(dim=0)
    assert hidden.min() > ratio - 0.2 and hidden.max() < ratio + 0.2


def test_masking_draws_do_not_depend_on_padding():
    plain = random_token_mask(torch.ones(40, 3, dtype=torch.bool), 9, 0.75, torch.Generator().manual_seed(3))
    valid = torch.tensor([[False, True, True, False, True, False]] * 40)
    padded = random_token_mask(valid, 9, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(padded[:, [1, 2, 4]], plain)


def test_sincos_positions_match_the_formula_and_replace_the_learned_ones():
    pos = sincos_pos_embed_2d((2, 3), 8)
    assert pos.shape == (1, 6, 8)
    freqs = torch.tensor([1.0, 1.0 / 100.0])  # 10000 ** (-k / 2), k = 0, 1
    row, col = 1, 2  # token 5
    expected = torch.cat([torch.sin(row * freqs), torch.cos(row * freqs), torch.sin(col * freqs), torch.cos(col * freqs)])
    torch.testing.assert_close(pos[0, 5], expected)
    model = tiny_encoder()
    assert model.pos_embed is None and "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.positions((4, 4)), sincos_pos_embed_2d((4, 4), model.embed_dim))


def test_self_standardize_per_image_and_channel():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 5.0, 0.5])[None, :, None, None] + 7
    z = self_standardize(x)
    torch.testing.assert_close(z.mean(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.var(dim=(-2, -1), unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_ca_mae_is_invariant_to_channel_order_and_sensitive_to_content():
    model = tiny_encoder().eval()
    x = torch.rand(2, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        permuted = model(x[:, torch.tensor([3, 0, 4, 2, 1])])
        for key in ("cls", "patch"):
            torch.testing.assert_close(permuted[key], out[key], atol=1e-5, rtol=1e-5)
        changed = x.clone()
        changed[:, 2] = torch.rand(2, 16, 16)
        assert (model(changed)["cls"] - out["cls"]).abs().max() > 1e-3
        # Any channel count and unseen names: no parameter belongs to a channel.
        assert model(x[:, :2], channel_names=["Brightfield", "Golgi"])["patch"].shape == (2, 16, model.embed_dim)


def test_encoder_on_visible_tokens_equals_full_attention_with_hidden_tokens_masked():
    """encode_visible gathers the visible tokens; the same trunk over all C*L tokens with the hidden ones
    excluded as attention keys gives the same CLS and the same visible tokens."""
    model = tiny_encoder().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 16, 16, generator=g)
    channel_mask = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, True, False]])
    token_mask = random_token_mask(channel_mask, 16, 0.75, g)
    with torch.no_grad():
        enc = model.encode_visible(x, channel_mask, token_mask)
        tokens, _ = model.channel_tokens(x, channel_mask)
        full = model.forward_trunk(tokens.reshape(3, 64, -1), key_mask=~token_mask.reshape(3, 64))
    torch.testing.assert_close(enc["cls"], full["cls"], atol=1e-5, rtol=1e-5)
    for b in range(3):
        index = enc["visible_index"][b][enc["visible_mask"][b]]
        assert torch.equal(index, (~token_mask[b].reshape(-1)).nonzero().squeeze(1))
        torch.testing.assert_close(enc["visible"][b][enc["visible_mask"][b]], full["patch"][b, index],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padded channel visible"):
        model.encode_visible(x, channel_mask, torch.zeros(3, 4, 16, dtype=torch.bool))


def step_cfg(*overrides: str):
    return load_config(SMOKE_CONFIG, [*MAE, "ssl.global_crop_size=16", *overrides])


def test_config_pairs_mae_with_ca_mae():
    with pytest.raises(ConfigError, match="ssl.objective=mae and model.name=ca_mae go together"):
        load_config(SMOKE_CONFIG, ["model.name=ca_mae", "ssl.n_local_crops=0"])
    with pytest.raises(ConfigError, match="set ssl.n_local_crops=0"):
        load_config(SMOKE_CONFIG, ["model.name=ca_mae", "ssl.objective=mae"])
    with pytest.raises(ConfigError, match=r"ssl.mae_mask_ratio must be in \(0, 1\)"):
        step_cfg("ssl.mae_mask_ratio=1.0")


def test_padding_changes_nothing_in_an_mae_training_step():
    """The same fields with 2 garbage-filled padded channels: same token masks on the real channels, same
    loss terms and gradients at the same step position."""
    cfg = step_cfg()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 4, 32, 32, generator=g)
    names = [CP5[:4]] * 3
    plain = FieldBatch(images, names)
    garbage = torch.rand(3, 2, 32, 32, generator=g) * 50
    mask = torch.tensor([[True] * 4 + [False] * 2] * 3)
    padded = FieldBatch(torch.cat([images, garbage], dim=1), [n + ["", ""] for n in names], channel_mask=mask)
    results = []
    for batch in (plain, padded):
        arch = SSLMetaArch(cfg, steps_per_epoch=2, rank=0, world_size=1, device=torch.device("cpu"),
                           prepare_model=lambda m: m)
        views = arch.views(batch, epoch=0, step=1, micro=0)
        losses = arch.forward_backward(batch, epoch=0, step=1, micro=0)
        grads = {n: p.grad.clone() for n, p in arch.student.named_parameters() if p.grad is not None}
        # DDP (find_unused_parameters=False) needs a gradient for every trainable parameter on every step.
        assert {n for n, p in arch.student.named_parameters() if p.requires_grad} == set(grads)
        results.append((views.token_mask, losses, grads))
    (mask_plain, l_plain, g_plain), (mask_pad, l_pad, g_pad) = results
    assert torch.equal(mask_pad[:, :, :4], mask_plain) and mask_pad[:, :, 4:].all()
    assert set(l_plain.terms) == {"mse", "fourier", "mask_ratio"} and l_plain.terms["mask_ratio"].item() == 0.75
    for key in l_plain.terms:
        torch.testing.assert_close(l_pad.terms[key], l_plain.terms[key], rtol=1e-4, atol=1e-5)
    assert set(g_plain) == set(g_pad) and any(n.startswith("decoder.") for n in g_plain)
    for key in g_plain:
        torch.testing.assert_close(g_pad[key], g_plain[key], rtol=1e-3, atol=1e-5, msg=key)


def smooth_fields(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 5, 32, 32) in [0, 1] with structure at 8 px (what a masked patch can be inferred from)."""
    coarse = torch.rand(n, 5, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_ca_mae_lowers_its_loss_in_memory_and_embeds_for_evaluation():
    cfg = step_cfg("optim.batch_size_per_worker=4", "optim.epochs=4", "optim.base_lr=0.1", "ssl.flip=false",
                   "ssl.rot90=false")
    losses: list[float] = []
    arch = train_in_memory(cfg, smooth_fields(16), CP5, on_step=lambda e, s, step: losses.append(step.total.item()))
    assert len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses
    # The teacher copies the student (no EMA for MAE): the checkpoint's inference backbone is the encoder.
    student, teacher = arch.student.backbone.state_dict(), arch.teacher.backbone.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    features = field_embedding(arch.teacher.backbone.eval(), smooth_fields(3, seed=1)[:, :3], 32,
                               [["Brightfield", "Golgi", "DNA"]] * 3)
    assert features.shape == (3, 2 * 96) and torch.isfinite(features).all()

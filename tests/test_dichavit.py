"""The DiChaViT baseline (model `dichavit`): diverse channel sampling's exact distribution on a fixed embedding
table, its draws independent of padding, the token diversification loss by hand and against the pairwise
definition, orthogonal channel embeddings, unknown names, and a few in-memory iBOT steps that lower the loss."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from cellfm.config import ConfigError, ModelConfig, load_config
from cellfm.features.embed import field_embedding
from cellfm.models.registry import build_backbone
from cellfm.ssl.channel_sampling import diverse_channel_mask, hierarchical_channel_mask
from cellfm.ssl.token_orthogonality import TokenOrthogonalityLoss
from cellfm.train.in_memory import train_in_memory
from tests.conftest import SMOKE_CONFIG

CP5 = ["DNA", "ER", "RNA", "AGP", "Mito"]
# Channel 1 is close to 0, channel 2 orthogonal to both, channel 3 nearly opposite to 0.
TABLE = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.2, 0.0]])


def dcs_expected(table: torch.Tensor, temperature: float) -> dict[frozenset, float]:
    """P(kept set) by enumeration of the reference's rule: m ~ U{1..n}, anchor a ~ U{0..n-1}, then m channels
    drawn one by one without replacement, each with probability w_c / (sum of w over the channels not drawn
    yet), w_c = exp((1 - cos(e_a, e_c)) / T); if a was not drawn it replaces the m-th."""
    n = len(table)
    unit = F.normalize(table, dim=-1)
    probs: Counter = Counter()
    for a in range(n):
        w = torch.exp((1 - unit @ unit[a]) / temperature).tolist()
        for m in range(1, n + 1):
            for seq in itertools.permutations(range(n), m):
                p, left = 1.0, set(range(n))
                for c in seq:
                    p *= w[c] / sum(w[r] for r in left)
                    left.remove(c)
                kept = frozenset(seq) if a in seq else frozenset(seq[:-1]) | {a}
                probs[kept] += p / n / n
    return dict(probs)


def kept_sets(keep: torch.Tensor, slots: list[int]) -> Counter:
    return Counter(frozenset(i for i, c in enumerate(slots) if row[c]) for row in keep.tolist())


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_dcs_draws_every_subset_with_the_formula_probability(temperature):
    """Chi-square of the kept sets over 40000 samples against the enumerated law; the same statistic rejects
    hierarchical channel sampling (same support, uniform choice), so the test can tell the samplers apart."""
    n_samples = 40_000
    valid = torch.ones(n_samples, 4, dtype=torch.bool)
    embeddings = TABLE.expand(n_samples, 4, 3)
    keep = diverse_channel_mask(valid, embeddings, temperature, torch.Generator().manual_seed(0))
    expected = dcs_expected(TABLE, temperature)
    assert sum(expected.values()) == pytest.approx(1.0)
    counts = kept_sets(keep, [0, 1, 2, 3])
    assert set(counts) <= set(expected)
    # Sets expected fewer than 5 times are pooled (chi-square needs expected counts of about 5).
    big = sorted((s for s in expected if n_samples * expected[s] >= 5), key=sorted)
    small = [s for s in expected if s not in big]

    def statistic(observed: Counter, total: int) -> float:
        obs = [observed.get(s, 0) for s in big] + [sum(observed.get(s, 0) for s in small)]
        exp = [total * expected[s] for s in big] + [total * sum(expected[s] for s in small)]
        if not small:
            obs, exp = obs[:-1], exp[:-1]
        return chisquare(obs, exp).pvalue

    assert statistic(counts, n_samples) > 1e-3
    hcs = hierarchical_channel_mask(valid, torch.Generator().manual_seed(1))
    assert statistic(kept_sets(hcs, [0, 1, 2, 3]), n_samples) < 1e-6
    # m ~ U{1..4}: each count of kept channels about a quarter of the samples.
    sizes = keep.sum(dim=1).bincount(minlength=5)[1:].float() / n_samples
    assert torch.allclose(sizes, torch.full((4,), 0.25), atol=0.01)


def test_dcs_draws_do_not_depend_on_padding_and_never_keep_padding():
    B = 500
    embeddings = TABLE.expand(B, 4, 3)
    plain = diverse_channel_mask(torch.ones(B, 4, dtype=torch.bool), embeddings, 0.1, torch.Generator().manual_seed(5))
    slots = [0, 2, 3, 5]
    valid = torch.zeros(B, 7, dtype=torch.bool)
    valid[:, slots] = True
    padded_embeddings = torch.randn(B, 7, 3)  # garbage in the padded slots
    padded_embeddings[:, slots] = embeddings
    padded = diverse_channel_mask(valid, padded_embeddings, 0.1, torch.Generator().manual_seed(5))
    assert torch.equal(padded[:, slots], plain) and not padded[:, [1, 4, 6]].any()
    with pytest.raises(ValueError, match="no real channel"):
        diverse_channel_mask(torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2, 3), 0.1)


def test_token_orthogonality_loss_by_hand():
    """Channel 0: tokens (1, 0), (1, 0); channel 1: (0, 1), (3, 4) -> (0.6, 0.8) normalized.
    Same-channel ordered pairs: 2 x 1 + 2 x 0.8 over 4 = 0.9; cross-channel: 2 x (0 + 0.6 + 0 + 0.6) over 8 = 0.3.
    Loss = 1 x 0.9 + 4 x 0.3 = 2.1 (weights 0.5, 2: 1.05). A padded third channel changes nothing."""
    tokens = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [3.0, 4.0]]]])
    assert TokenOrthogonalityLoss()(tokens, None).item() == pytest.approx(2.1, abs=1e-5)
    assert TokenOrthogonalityLoss(0.5, 2.0)(tokens, None).item() == pytest.approx(1.05, abs=1e-5)
    padded = torch.cat([tokens, torch.full((1, 1, 2, 2), 1e3)], dim=1)
    assert TokenOrthogonalityLoss()(padded, torch.tensor([[True, True, False]])).item() == pytest.approx(2.1, abs=1e-5)


def test_token_orthogonality_loss_against_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, 5, 8, generator=g)
    channel_mask = torch.tensor([[True] * 4, [True, False, True, False], [False, False, True, False]])
    expected = []
    for b in range(3):
        real = channel_mask[b].nonzero().squeeze(1)
        f = F.normalize(tokens[b, real].reshape(-1, 8), dim=-1)
        label = torch.arange(len(real)).repeat_interleave(5)
        dots = f @ f.T
        same = (label[:, None] == label[None, :]) & ~torch.eye(len(label), dtype=torch.bool)
        cross = label[:, None] != label[None, :]
        pos = (dots * same).sum() / (same.sum() + 1e-6)
        neg = (dots * cross).sum() / (cross.sum() + 1e-6)
        expected.append(1.0 * pos + 4.0 * neg)
    assert TokenOrthogonalityLoss()(tokens, channel_mask).item() == pytest.approx(torch.stack(expected).mean().item(),
                                                                                  abs=1e-5)


def tiny_dichavit():
    torch.manual_seed(0)
    return build_backbone(ModelConfig(name="dichavit", size="tiny", img_size=16, patch_size=4,
                                      channel_vocabulary=CP5)).eval()


def test_channel_embeddings_start_orthonormal_and_unknown_names_fail():
    model = tiny_dichavit()
    gram = model.channel_embed @ model.channel_embed.T
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, channel_names=["DNA", "Mito", "ER"])
    assert out["channel_tokens"].shape == (2, 3, 16, 96) and out["patch"].shape == (2, 16, 96)
    with pytest.raises(ValueError, match=r"DiChaViT: unknown channel 'Brightfield'.*DNA"):
        model(x, channel_names=["DNA", "Brightfield", "ER"])
    with pytest.raises(ConfigError, match="ssl.channel_sampling=dcs compares learned channel embeddings"):
        load_config(SMOKE_CONFIG, ["model.name=channelvit", "ssl.channel_sampling=dcs"])


def test_dichavit_lowers_its_loss_in_memory_and_embeds_for_evaluation():
    """iBOT with DCS and the token loss (weight 0.1 so it counts), targets made stationary as in
    tests/test_all_models_train.py (fixed teacher temperature, teacher held at init, batch-mean center)."""
    cfg = load_config(SMOKE_CONFIG, [
        "model.name=dichavit", "ssl.objective=ibot", f"model.channel_vocabulary=[{', '.join(CP5)}]",
        "ssl.token_orthogonality_weight=0.1", "ssl.global_crop_size=16", "ssl.local_crop_size=8",
        "ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.04", "ssl.ema_momentum_start=1.0",
        "ssl.ema_momentum_end=1.0", "ssl.center_momentum=0.0", "ssl.freeze_last_layer_epochs=0",
        "optim.base_lr=0.1", "optim.batch_size_per_worker=4", "optim.epochs=4"])
    fields = torch.rand(16, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    losses: list[dict[str, float]] = []
    arch = train_in_memory(cfg, fields, CP5, on_step=lambda e, s, step: losses.append(
        {"total": step.total.item(), **{k: v.item() for k, v in step.terms.items()}}))
    assert arch.channel_sampling == "dcs"
    assert all("token_orthogonality" in step and 1 <= step["student_channels_seen"] <= 5 for step in losses)
    assert any(step["student_channels_seen"] < 5 for step in losses)
    first, last = (sum(step["total"] for step in part) / 4 for part in (losses[:4], losses[-4:]))
    assert last < first, [round(step["total"], 3) for step in losses]
    features = field_embedding(arch.teacher.backbone.eval(), fields[:3, :2], 32, [["Mito", "DNA"]] * 3)
    assert features.shape == (3, 2 * 96) and torch.isfinite(features).all()
    assert not math.isnan(losses[-1]["token_orthogonality"])

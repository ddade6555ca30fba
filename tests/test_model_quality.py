"""The rules of benchmarks/model_quality.py's table: which model/configuration cells are n/a (and that the
model really cannot take them), mean ± sd over seeds, the direction stated for each seed-paper claim."""

from __future__ import annotations

import pytest
import torch

from benchmarks.model_quality import EVALUATIONS, compare, markdown, mean_sd, summarize, unsupported_reason
from cellfm.config import ModelConfig
from cellfm.data.synthetic import FAMILY_CONFIGS
from cellfm.models.registry import build_backbone

CP5 = list(FAMILY_CONFIGS["cp5"].channels)


def tiny(name: str) -> ModelConfig:
    return ModelConfig(name=name, size="tiny", patch_size=8, img_size=16, channel_vocabulary=sorted(CP5),
                       channel_groups={c: "context" for c in CP5})


@pytest.mark.parametrize("config", ["cp5", "novel4", "brightfield1", "hpa4"])
@pytest.mark.parametrize("model", ["cellrep", "c3r", "vit_rgb", "channelvit", "single_channel"])
def test_a_cell_is_na_exactly_when_the_model_cannot_embed_the_configuration(model, config):
    family = FAMILY_CONFIGS[config]
    channels = list(family.channels)
    cfg = tiny(model)
    reason = unsupported_reason(cfg, channels)
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    if hasattr(backbone, "set_channel_groups"):
        backbone.set_channel_groups({**cfg.channel_groups, **dict(zip(channels, family.groups))})
    x = torch.rand(2, len(channels), 16, 16)
    if reason is None:
        with torch.no_grad():
            assert backbone(x, channel_names=[channels] * 2)["cls"].shape == (2, backbone.embed_dim)
    else:
        unseen = [c for c in channels if c not in CP5]
        assert model == "channelvit" and all(c in reason for c in unseen)
        with pytest.raises(ValueError, match="unknown channel"):
            backbone(x, channel_names=[channels] * 2)
    assert (reason is None) == (model != "channelvit" or config == "cp5")


def test_mean_and_sample_sd_over_seeds():
    stats = mean_sd([0.4, 0.5, 0.6])
    assert stats["mean"] == pytest.approx(0.5) and stats["sd"] == pytest.approx(0.1) and stats["n"] == 3
    assert mean_sd([0.7])["sd"] == 0.0


def test_direction_needs_two_standard_errors():
    clear = compare([0.5, 0.6, 0.7], [0.3, 0.3, 0.3])  # se = 0.1 / sqrt(3) = 0.0577
    assert clear["difference"] == pytest.approx(0.3) and clear["standard_error"] == pytest.approx(0.1 / 3 ** 0.5)
    assert clear["direction"] == "higher"
    assert compare([0.3, 0.3, 0.3], [0.5, 0.6, 0.7])["direction"] == "lower"
    assert compare([0.5, 0.6, 0.7], [0.45, 0.55, 0.65])["direction"] == "within seed noise"  # 0.05 < 2 * 0.0816


def test_table_shows_mean_sd_and_na_with_its_reason():
    def scores(top1: float, channelvit: bool = False) -> dict:
        return {e.config: ({"unsupported": "ChannelViT has no channel embedding for Golgi"}
                           if channelvit and e.config != "cp5" else {"top1": top1}) for e in EVALUATIONS}

    runs = [{"model": m, "seed": s, "trained": scores(t, m == "channelvit"), "random_init": scores(0.2, m == "channelvit")}
            for m, values in (("cellrep", (0.4, 0.5, 0.6)), ("vit_rgb", (0.3, 0.3, 0.3)),
                              ("channelvit", (0.5, 0.5, 0.5)), ("c3r", (0.6, 0.6, 0.6)))
            for s, t in enumerate(values)]
    results = {"runs": runs, "intensity_stats": scores(0.25), "date": "today", "machine": "cpu", "threads": 2,
               "runtime_s": 60.0, "seeds": [0, 1, 2], "split_seeds": [0, 1], "budget": "b",
               "chance": {e.config: 0.2 for e in EVALUATIONS}}
    results["summary"] = summarize(results)
    text = markdown(results)
    assert "| cellrep (trained) | 0.500 ± 0.100 | 0.500 ± 0.100 |" in text
    assert "| channelvit (trained) | 0.500 ± 0.000 | n/a [1] | n/a [1] | n/a [1] |" in text
    assert "[1] n/a: ChannelViT has no channel embedding for Golgi." in text
    assert "| intensity statistics | 0.250 |" in text
    assert "novel4: cellrep 0.500 vs vit_rgb 0.300, difference +0.200 (standard error 0.058): cellrep higher" in text
    assert "novel4: channelvit n/a (ChannelViT has no channel embedding for Golgi)" in text

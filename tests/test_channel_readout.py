"""The channel readout (eval.channel_readout / features.channel_readout): per channel is each channel embedded
alone and concatenated in channel order, exactly; every encoder of a run (the random-init baseline too) is read
out alike; padded or mixed batches fail in one line; the readout is part of the feature key; preflight and
config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfm.config import ConfigError, ModelConfig, load_config
from cellfm.data.synthetic.catalog import FAMILY_CONFIGS
from cellfm.features.embed import EncoderSpec, FieldEmbedder, IntensityStatistics, embed_fields, field_embedding
from cellfm.features.identity import embedding_recipe, feature_key
from cellfm.models.registry import build_backbone

CP5 = list(FAMILY_CONFIGS["cp5"].channels)
MODELS = ["cellrep", "c3r", "vit_rgb", "channelvit", "single_channel"]


def tiny(name: str) -> ModelConfig:
    return ModelConfig(name=name, size="tiny", patch_size=8, img_size=16, channel_vocabulary=sorted(CP5),
                       channel_groups=dict(zip(CP5, FAMILY_CONFIGS["cp5"].groups)))


@pytest.mark.parametrize("model", MODELS)
def test_per_channel_readout_is_each_channel_alone_concatenated_in_channel_order(model):
    torch.manual_seed(0)
    backbone = build_backbone(tiny(model)).eval()
    images = torch.rand(3, len(CP5), 24, 24)
    with torch.inference_mode():
        per_channel = field_embedding(backbone, images, 16, [CP5] * 3, readout="per_channel")
        resized = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True,
                                                  align_corners=False)
        alone = []
        for c, name in enumerate(CP5):
            out = backbone(resized[:, c:c + 1], channel_names=[[name]] * 3, channel_mask=None)
            alone.append(torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1))
        pooled = field_embedding(backbone, images, 16, [CP5] * 3)
    assert torch.equal(per_channel, torch.cat(alone, dim=-1))
    assert per_channel.shape == (3, len(CP5) * 2 * backbone.embed_dim) and pooled.shape == (3, 2 * backbone.embed_dim)
    # The order is the configuration's: the second block is the second channel's embedding.
    d = 2 * backbone.embed_dim
    assert torch.equal(per_channel[:, d:2 * d], alone[1]) and not torch.equal(alone[0], alone[1])


def test_intensity_statistics_ignore_the_readout():
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(field_embedding(IntensityStatistics(), images, readout="per_channel"),
                       field_embedding(IntensityStatistics(), images))


def test_padded_or_mixed_batches_fail_in_one_line():
    torch.manual_seed(0)
    backbone = build_backbone(tiny("cellrep")).eval()
    images = torch.rand(2, 3, 16, 16)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="^channel readout per_channel cannot read out padded fields") as padded:
        field_embedding(backbone, images, 0, [["DNA", "ER", "RNA"], ["DNA", "ER", ""]], mask, readout="per_channel")
    assert "\n" not in str(padded.value)
    with pytest.raises(ValueError, match=r"needs one channel list per batch; got \['DNA', 'ER', 'RNA'\] and "
                                         r"\['DNA', 'RNA', 'ER'\]"):
        field_embedding(backbone, images, 0, [["DNA", "ER", "RNA"], ["DNA", "RNA", "ER"]], readout="per_channel")
    with pytest.raises(ValueError, match="unknown channel readout 'stacked'"):
        field_embedding(backbone, images, 0, [["DNA", "ER", "RNA"]] * 2, readout="stacked")
    # Without padding a mask of all True is no padding.
    assert field_embedding(backbone, images, 0, [["DNA", "ER", "RNA"]] * 2, torch.ones(2, 3, dtype=torch.bool),
                           readout="per_channel").shape[1] == 3 * 2 * backbone.embed_dim


def test_every_encoder_of_a_run_is_read_out_alike():
    """The random-init baseline gets the model's readout; embed_fields (the benchmarks' path) agrees."""
    model = tiny("cellrep")
    specs = [EncoderSpec("random_init", model=model.__dict__, seed=3), EncoderSpec("intensity_stats", intensity=True)]
    images = np.random.default_rng(0).random((4, len(CP5), 16, 16)).astype(np.float32)
    batch = {"image": images.copy(), "channel_names": np.array([",".join(CP5)] * 4, dtype=object)}
    out = FieldEmbedder(specs, channel_readout="per_channel")(batch)
    torch.manual_seed(3)
    random_init = build_backbone(model).eval()
    expected = embed_fields(random_init, torch.from_numpy(images), CP5, readout="per_channel")
    np.testing.assert_array_equal(out["embedding_random_init"], expected)
    assert out["embedding_intensity_stats"].shape == (4, len(CP5) * 9)


def test_the_readout_is_part_of_the_feature_key():
    pooled, per_channel = load_config(None), load_config(None, ["features.channel_readout=per_channel"])
    assert embedding_recipe(pooled)["feature"] == "cls+mean_patch"  # the keys stores had before the option
    assert feature_key("cellrep", "abc", embedding_recipe(pooled)) != feature_key("cellrep", "abc",
                                                                                  embedding_recipe(per_channel))
    # eval.channel_readout alone does not change what the store holds.
    assert embedding_recipe(load_config(None, ["eval.channel_readout=per_channel"])) == embedding_recipe(pooled)


def test_config_rules():
    with pytest.raises(ConfigError, match=r"eval.channel_readout='stacked' is not one of \['pooled', 'per_channel'\]"):
        load_config(None, ["eval.channel_readout=stacked"])
    with pytest.raises(ConfigError, match="features.channel_readout='x' is not one of"):
        load_config(None, ["features.channel_readout=x"])
    with pytest.raises(ConfigError, match="eval.from_store reads features stored with features.channel_readout=pooled, "
                                          "but eval.channel_readout=per_channel; set both alike"):
        load_config(None, ["eval.from_store=true", "eval.channel_readout=per_channel"])


def test_preflight_per_channel_needs_one_unpadded_channel_list_per_manifest(tiny_screen):
    import pandas as pd

    from cellfm.data.manifest import read_manifest
    from cellfm.preflight import evaluation_manifest_problems

    heldout, unseen = read_manifest(tiny_screen["heldout"]), read_manifest(tiny_screen["unseen"])
    cfg = load_config(None, ["eval.channel_readout=per_channel"])

    def readout_lines(c, manifest):
        return [p for p in evaluation_manifest_problems(c, manifest, "eval.manifests.seen=s.parquet")
                if "channel_readout" in p]

    assert readout_lines(cfg, heldout) == []
    mixed = pd.concat([heldout, unseen], ignore_index=True)
    lines = readout_lines(cfg, mixed)
    assert len(lines) == 1 and lines[0].startswith(
        "eval.channel_readout=per_channel needs one channel list per manifest; eval.manifests.seen=s.parquet has 2")
    n = len(heldout["channel_names"].iloc[0])
    padded = load_config(None, ["eval.channel_readout=per_channel", f"data.pad_channels_to={n + 1}"])
    assert readout_lines(padded, heldout) == [
        f"eval.channel_readout=per_channel cannot read out padded fields: data.pad_channels_to={n + 1} pads the {n} "
        "channels of eval.manifests.seen=s.parquet (set it to 0)"]
    assert readout_lines(load_config(None), mixed) == []  # pooled reads out padded fields

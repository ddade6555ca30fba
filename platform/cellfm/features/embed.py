"""Field embeddings by Ray Data batch inference: fields stream through the same read+normalize
step as training (no channel permutation) into an actor pool holding the encoders. Used by the
feature store (cellfm.features.refresh) and by evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cellfm.config import CHANNEL_READOUTS, DataConfig, ModelConfig
from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR

# Manifest columns carried from each field to its embedding row.
METADATA_COLUMNS = ["plate", "well", "field", "perturbation_id", "moa", "is_control"]


INTENSITY_PERCENTILES = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)


class IntensityStatistics(torch.nn.Module):
    """The model-free baseline: per channel, mean, std and percentiles of the field's intensities.
    An encoder that does not beat it has learned nothing beyond intensity."""

    def forward(self, images: torch.Tensor, **_) -> torch.Tensor:
        flat = images.flatten(2)  # (N, C, H*W)
        q = torch.quantile(flat, torch.tensor(INTENSITY_PERCENTILES, dtype=flat.dtype) / 100.0, dim=-1)  # (P, N, C)
        return torch.cat([flat.mean(-1), flat.std(-1), *q], dim=-1)


@dataclass(frozen=True)
class EncoderSpec:
    """Where an encoder comes from: a checkpoint directory, a seeded random init of `model` (the
    baseline every trained encoder must beat), or `intensity=True` for IntensityStatistics."""

    name: str
    checkpoint_dir: str | None = None
    model: dict | None = None
    seed: int = 0
    intensity: bool = False
    # Stain -> group entries added to a checkpoint's mapping (C3R at inference on unseen stains).
    channel_groups: dict | None = None
    # s3fs-style options for a checkpoint on s3:// (as data.storage_options).
    storage_options: dict | None = None

    def build(self) -> torch.nn.Module:
        from cellfm.models.registry import build_backbone
        from cellfm.train.checkpoint import load_inference_backbone

        if self.intensity:
            return IntensityStatistics()
        if self.checkpoint_dir is not None:
            backbone, cfg = load_inference_backbone(self.checkpoint_dir, self.storage_options)
            if self.channel_groups and hasattr(backbone, "set_channel_groups"):
                backbone.set_channel_groups({**cfg.model.channel_groups, **self.channel_groups})
            return backbone
        torch.manual_seed(self.seed)
        return build_backbone(ModelConfig(**self.model)).eval()


def field_embedding(backbone: torch.nn.Module, images: torch.Tensor, image_size: int = 0,
                    channel_names: list[list[str]] | None = None, channel_mask: torch.Tensor | None = None,
                    readout: str = "pooled") -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> the field's feature: CLS token concatenated with the mean patch token (the
    DINOv2 linear-probe feature) of the whole field, resized to image_size x image_size unless 0.

    readout (eval.channel_readout / features.channel_readout): `pooled` gives (N, 2D), the backbone's one
    embedding of all channels; `per_channel` gives (N, C * 2D), each channel embedded alone (the backbone
    given a 1-channel input with that channel's name) and the embeddings concatenated in channel order
    (the bag-of-channels readout of MorphEm / CHAMMI), so a feature still says which stain it came from.
    Intensity statistics are per channel already and ignore the readout."""
    if isinstance(backbone, IntensityStatistics):
        return backbone(images)
    if readout not in CHANNEL_READOUTS:
        raise ValueError(f"unknown channel readout {readout!r}; choose from {list(CHANNEL_READOUTS)}")
    if image_size and (images.shape[-1] != image_size or images.shape[-2] != image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    # Padded channels (mixed channel counts) are masked out; without padding the mask is all True.
    if channel_mask is not None and bool(channel_mask.all()):
        channel_mask = None
    if readout == "per_channel":
        names = _one_channel_list(images, channel_names, channel_mask)
        return torch.cat([_cls_and_mean_patch(backbone, images[:, c:c + 1], [[name]] * len(images), None)
                          for c, name in enumerate(names)], dim=-1)
    return _cls_and_mean_patch(backbone, images, channel_names, channel_mask)


def _cls_and_mean_patch(backbone: torch.nn.Module, images: torch.Tensor, channel_names: list[list[str]] | None,
                        channel_mask: torch.Tensor | None) -> torch.Tensor:
    out = backbone(images, channel_names=channel_names, channel_mask=channel_mask)
    return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)


def _one_channel_list(images: torch.Tensor, channel_names: list[list[str]] | None,
                      channel_mask: torch.Tensor | None) -> list[str]:
    """The batch's one channel list, or ValueError: a per-channel feature's layout (which block of features
    is which stain) must be the same for every field it is compared with."""
    if channel_mask is not None:
        raise ValueError("channel readout per_channel cannot read out padded fields (fields of several channel counts "
                         "in one batch); embed each channel configuration on its own (no data.pad_channels_to)")
    if not channel_names or len(channel_names[0]) != images.shape[1]:
        raise ValueError(f"channel readout per_channel needs the names of the batch's {images.shape[1]} channels")
    first = list(channel_names[0])
    other = next((list(n) for n in channel_names if list(n) != first), None)
    if other is not None:
        raise ValueError(f"channel readout per_channel needs one channel list per batch; got {first} and {other} "
                         "(embed each channel configuration on its own)")
    return first


def embed_fields(backbone: torch.nn.Module, images: torch.Tensor, channel_names: list[str], image_size: int = 0,
                 batch_size: int = 64, readout: str = "pooled") -> np.ndarray:
    """`field_embedding`s of fields held in memory ((N, C, H, W), every field with `channel_names`), in
    batches, in one process (benchmarks; `embed_manifest` streams a manifest through Ray Data)."""
    with torch.inference_mode():
        return torch.cat([field_embedding(backbone, images[i:i + batch_size], image_size,
                                          [list(channel_names)] * len(images[i:i + batch_size]), readout=readout)
                          for i in range(0, len(images), batch_size)]).numpy()


class FieldEmbedder:
    """Actor-pool UDF: loads every encoder once per actor (on `device`), adds an `embedding_<name>`
    column (float32) per encoder to each batch and drops the images. Every encoder is read out the same
    way (`channel_readout`), so a baseline is compared with a model on like features."""

    def __init__(self, encoders: list[EncoderSpec], image_size: int = 0, torch_threads: int = 1,
                 device: str = "cpu", channel_readout: str = "pooled"):
        torch.set_num_threads(torch_threads)
        self.image_size = image_size
        self.channel_readout = channel_readout
        self.device = torch.device(device)
        self.encoders = {spec.name: spec.build().to(self.device) for spec in encoders}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # A float32 copy: the batch's arrays are read-only views of Ray's object store.
        images = torch.from_numpy(np.array(batch.pop("image"), dtype=np.float32)).to(self.device)
        # Channel names drive C3R's grouping and ChannelViT's channel embeddings.
        names = [n.split(CHANNEL_SEPARATOR) for n in batch.pop("channel_names")]
        mask = torch.from_numpy(batch.pop("channel_mask")).to(self.device) if "channel_mask" in batch else None
        with torch.inference_mode():
            for name, backbone in self.encoders.items():
                embedding = field_embedding(backbone, images, self.image_size, names, mask, self.channel_readout)
                batch[f"embedding_{name}"] = embedding.float().cpu().numpy()
        return batch


def embedding_dataset(manifest: pd.DataFrame, data_cfg: DataConfig, encoders: list[EncoderSpec], *,
                      keep_columns: list[str], batch_size: int = 32, actors: int = 1, image_size: int = 0,
                      cpus_per_actor: float = 1.0, torch_threads: int = 1, gpus_per_actor: float = 0.0,
                      one_batch_per_block: bool = False, channel_readout: str = "pooled"):
    """A streaming Ray Dataset of `keep_columns` + one `embedding_<name>` column per encoder, one row
    per field of `manifest`, computed by `actors` FieldEmbedder actors (each on a GPU when
    gpus_per_actor > 0), read out as `channel_readout` says (`field_embedding`).

    one_batch_per_block: each read block (at most data.read_batch_size fields of one plate) is embedded
    as one batch, so a field's embedding does not depend on what else the run reads; otherwise the
    embedder's batches hold `batch_size` fields, possibly of several plates."""
    import ray.data

    from cellfm.data.pipeline.dataset import build_field_dataset

    ds = build_field_dataset(manifest, data_cfg, training=False, keep_columns=keep_columns)
    return ds.map_batches(
        FieldEmbedder,
        fn_constructor_kwargs={"encoders": encoders, "image_size": image_size, "torch_threads": torch_threads,
                               "device": "cuda" if gpus_per_actor > 0 else "cpu", "channel_readout": channel_readout},
        batch_size=None if one_batch_per_block else batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_format="numpy",
    )


def embed_manifest(manifest: pd.DataFrame, data_cfg: DataConfig, encoders: list[EncoderSpec],
                   batch_size: int = 32, actors: int = 1, image_size: int = 0,
                   label_columns: list[str] = (), channel_readout: str = "pooled") -> pd.DataFrame:
    """One row per field: METADATA_COLUMNS and `label_columns` + an `embedding_<name>` array column per encoder."""
    keep = list(dict.fromkeys([*METADATA_COLUMNS, *label_columns]))
    return embedding_dataset(manifest, data_cfg, encoders, keep_columns=keep, batch_size=batch_size, actors=actors,
                             image_size=image_size, channel_readout=channel_readout).to_pandas()

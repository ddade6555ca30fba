"""Ray Data pipeline: manifest rows -> field reads -> per-channel normalization -> (training) random
channel permutation -> batches of equal-shape fields with their channel names.

Read and normalize are fused in one task so only the normalized float16 field crosses Ray's
object store (the raw uint16 read never does), and nothing is materialized: the dataset streams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cellfm.config import DataConfig
from cellfm.data.manifest import check_manifest_against_plates, read_manifest
from cellfm.data.normalize import percentile_clip
from cellfm.data.plate import read_field

# Manifest columns a read task needs; the rest travel as metadata only when asked for.
_READ_COLUMNS = ["plate", "well", "row", "col", "field", "store_uri", "channel_names"]
CHANNEL_SEPARATOR = ","


def load_manifests(paths: Sequence[str], check_plates: bool = True, storage_options: dict | None = None) -> pd.DataFrame:
    """Read and concatenate manifests; optionally verify every named channel exists in its plate.

    Checking at the edge (the driver) turns a mislabelled plate into one clear error before any
    worker starts, instead of a failure deep inside a streaming read.
    """
    frames = []
    for path in paths:
        df = read_manifest(path)
        # Relative local store URIs are relative to the manifest's folder, so a screen can be moved.
        base = Path(path).resolve().parent
        df["store_uri"] = [u if "://" in u or Path(u).is_absolute() else str(base / u) for u in df["store_uri"]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if check_plates:
        check_manifest_against_plates(df, storage_options=storage_options)
    return df


class FieldLoader:
    """Ray Data batch UDF: reads each field of a batch of manifest rows and normalizes it.

    Output batch: `image` (N, C, H, W) float16 in [0, 1], `channel_names` (N,) comma-joined strings
    in the order of the image's channels (after permutation, when enabled), plus `keep_columns`.
    """

    def __init__(self, cfg: DataConfig, permute_channels: bool, keep_columns: Sequence[str] = ()):
        self.cfg = cfg
        self.permute_channels = permute_channels
        self.keep_columns = list(keep_columns)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Fresh entropy per call: the loader is pickled into every task, so a generator created in
        # __init__ would replay the same permutations in every task and every epoch.
        rng = np.random.default_rng()
        images, names = [], []
        for i in range(len(batch["plate"])):
            channels = list(batch["channel_names"][i])
            image, channels = read_field(
                str(batch["store_uri"][i]), str(batch["row"][i]), str(batch["col"][i]), int(batch["field"][i]),
                channels=channels, storage_options=self.cfg.storage_options or None,
            )
            image = percentile_clip(image, self.cfg.clip_low, self.cfg.clip_high)
            if self.permute_channels:
                order = rng.permutation(len(channels))
                image = image[order]
                channels = [channels[j] for j in order]
            images.append(image.astype(np.float16))
            names.append(CHANNEL_SEPARATOR.join(channels))
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(
                f"fields of different shapes in one batch ({sorted(shapes)}), e.g. plate {batch['plate'][0]} "
                f"well {batch['well'][0]}: use one channel configuration and field size per training manifest"
            )
        out = {"image": np.stack(images), "channel_names": np.asarray(names, dtype=object)}
        for col in self.keep_columns:
            out[col] = batch[col]
        return out


def build_field_dataset(
    manifest: pd.DataFrame,
    cfg: DataConfig,
    *,
    training: bool,
    keep_columns: Sequence[str] = (),
    seed: int | None = None,
):
    """A streaming Ray Dataset of normalized fields for the rows of `manifest`.

    training=True shuffles block order (seeded) and permutes channels per sample (if enabled in
    config); evaluation keeps channel order and carries `keep_columns` along.
    """
    import ray.data

    columns = list(dict.fromkeys(_READ_COLUMNS + list(keep_columns)))
    table = manifest[columns].reset_index(drop=True)
    # One block per few fields so reads spread over tasks and memory stays bounded.
    # (Split here: Ray 2.60's own `override_num_blocks` split breaks on pandas 3 frames.)
    step = max(1, cfg.read_batch_size)
    ds = ray.data.from_pandas([table.iloc[i : i + step] for i in range(0, len(table), step)])
    if training:
        ds = ds.randomize_block_order(seed=seed)
    loader = FieldLoader(cfg, permute_channels=training and cfg.channel_permutation, keep_columns=keep_columns)
    return ds.map_batches(loader, batch_size=cfg.read_batch_size, num_cpus=cfg.read_cpus, batch_format="numpy")

"""The Ray Data pipeline on the tiny screen: fields arrive normalized, channel names travel with
(and are permuted with) the channels, and a manifest naming a channel the plate lacks is refused."""

import numpy as np
import pandas as pd
import pytest

from cellfm.config import DataConfig
from cellfm.data.normalize import percentile_clip
from cellfm.data.pipeline import CHANNEL_SEPARATOR, build_field_dataset, load_manifests
from cellfm.data.plate import PlateError, read_field


def _rows(ds) -> list[dict]:
    return list(ds.iter_rows())


def test_evaluation_stream_is_normalized_and_keeps_metadata(ray_session, tiny_screen):
    manifest = load_manifests([tiny_screen["heldout"]])
    rows = _rows(build_field_dataset(manifest, DataConfig(), training=False, keep_columns=["plate", "well", "field"]))
    assert len(rows) == len(manifest)
    first = manifest.iloc[0]
    row = next(r for r in rows if (r["plate"], r["well"], r["field"]) == (first["plate"], first["well"], first["field"]))
    raw, names = read_field(first["store_uri"], first["row"], first["col"], int(first["field"]),
                            channels=list(first["channel_names"]))
    assert row["image"].dtype == np.float16
    assert row["channel_names"].split(CHANNEL_SEPARATOR) == names
    np.testing.assert_allclose(row["image"].astype(np.float32), percentile_clip(raw, 1.0, 99.0), atol=1e-3)
    assert 0.0 <= row["image"].min() and row["image"].max() <= 1.0


def test_training_permutation_moves_names_with_channels(ray_session, tiny_screen):
    manifest = load_manifests([tiny_screen["train"]])
    rows = _rows(build_field_dataset(manifest, DataConfig(), training=True, keep_columns=["plate", "well", "field"]))
    assert len(rows) == len(manifest)
    by_key = {(r.plate, r.well, r.field): r for r in manifest.itertuples()}
    permuted = 0
    for row in rows:
        m = by_key[(row["plate"], row["well"], row["field"])]
        names = row["channel_names"].split(CHANNEL_SEPARATOR)
        assert sorted(names) == sorted(m.channel_names)
        permuted += names != list(m.channel_names)
        raw, _ = read_field(m.store_uri, m.row, m.col, int(m.field), channels=names)
        np.testing.assert_allclose(row["image"].astype(np.float32), percentile_clip(raw, 1.0, 99.0), atol=1e-3)
    assert permuted > len(rows) // 2  # 5! orders: almost every field is shuffled


def test_manifest_channel_missing_from_plate_is_named(tiny_screen, tmp_path):
    manifest = pd.read_parquet(tiny_screen["train"])
    manifest.at[3, "channel_names"] = ["DNA", "ER", "RNA", "AGP", "Phalloidin"]
    bad = tmp_path / "bad.parquet"
    base = tiny_screen["train"].parent
    manifest["store_uri"] = [str(base / u) if not u.startswith("/") else u for u in manifest["store_uri"]]
    manifest.to_parquet(bad)
    with pytest.raises(PlateError, match="Phalloidin") as info:
        load_manifests([bad])
    assert manifest.at[3, "well"] in str(info.value)

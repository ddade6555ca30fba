"""The Ray Data pipeline on the tiny screen: fields arrive normalized, channel names travel with
(and are permuted with) the channels, and a manifest naming a channel the plate lacks is refused."""

import numpy as np
import pandas as pd
import pytest

from cellfm.config import DataConfig
from cellfm.data.normalize import normalize_field, percentile_clip
from cellfm.data.pipeline.dataset import build_field_dataset, load_manifests
from cellfm.data.pipeline.layout import CHANNEL_SEPARATOR
from cellfm.data.plate import PlateError, read_field


def _rows(ds) -> list[dict]:
    return list(ds.iter_rows())


@pytest.mark.integration
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


@pytest.mark.integration
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


# ---------------------------------------------------------------- mixed channel counts, field sizes, bad fields

import dataclasses  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402

from cellfm.data.manifest import write_manifest  # noqa: E402
from cellfm.data.batch import FieldBatch  # noqa: E402
from cellfm.data.pipeline.batches import iter_training_batches  # noqa: E402
from cellfm.data.pipeline.dataset import build_field_pipeline, training_epoch_blocks  # noqa: E402
from cellfm.data.pipeline.monitor import BadFieldError  # noqa: E402
from cellfm.data.plate_writer import create_plate, write_field  # noqa: E402

_FAST = dict(progress_interval_s=0.0, read_batch_size=4, shuffle_buffer=8)


def _one_channel_manifest(tiny_screen, tmp_path, size=80) -> str:
    """A 1-channel brightfield-like plate of 80 x 80 fields (the tiny screen's are 64 x 64)."""
    uri = str(tmp_path / "BF-01.zarr")
    wells = [("A", "01"), ("A", "02")]
    create_plate(uri, "BF-01", wells, 2, ["Brightfield"], (size, size))
    rng = np.random.default_rng(0)
    template = pd.read_parquet(tiny_screen["unseen"]).iloc[:1]
    rows = []
    for row, col in wells:
        for field in range(2):
            write_field(uri, row, col, field, rng.integers(100, 4000, (1, size, size)).astype(np.uint16))
            rows.append(template.assign(plate="BF-01", well=f"{row}{col}", row=row, col=col, field=field,
                                        store_uri=uri, channel_names=[["Brightfield"]], channel_groups=[["context"]],
                                        height=size, width=size, source="BF"))
    path = tmp_path / "bf.parquet"
    write_manifest(pd.concat(rows, ignore_index=True), path)
    return str(path)


@pytest.mark.integration
def test_mixed_channel_counts_reach_the_trainer_padded_with_mask(ray_session, tiny_screen, tmp_path):
    bf = _one_channel_manifest(tiny_screen, tmp_path)
    manifest = load_manifests([tiny_screen["train"], tiny_screen["unseen"], bf])
    manifest = manifest.groupby("plate", sort=False).head(8).reset_index(drop=True)
    with pytest.raises(ValueError, match="data.field_size"):  # 64 x 64 and 80 x 80 fields, no size given
        build_field_pipeline(manifest, DataConfig(**_FAST), training=True)
    cfg = DataConfig(field_size=64, **_FAST)
    pipeline = build_field_pipeline(manifest, cfg, training=True, seed=0)
    assert pipeline.channels == 5 and pipeline.field_shape == (64, 64)
    channel_sets = {frozenset(names) for names in manifest["channel_names"]}
    counts = []
    blocks = training_epoch_blocks(manifest, cfg, seed=0, epoch=0)
    for batch in iter_training_batches(blocks, cfg, batch_size=4, device="cpu"):
        assert isinstance(batch, FieldBatch)
        assert batch.images.shape == (4, 5, 64, 64) and batch.images.dtype == torch.float32
        masks = batch.channel_mask  # None when no sample of the batch is padded
        if masks is None:
            masks = torch.ones(4, 5, dtype=torch.bool)
        assert masks.dtype == torch.bool and masks.shape == (4, 5)
        for image, names, mask in zip(batch.images, batch.channel_names, masks):
            assert len(names) == 5
            assert [n != "" for n in names] == mask.tolist()  # padding: name "" exactly where mask is False
            assert frozenset(n for n in names if n) in channel_sets
            assert torch.all(image[~mask] == 0) and image[mask].amax(dim=(-2, -1)).gt(0).all()
            assert mask[: int(mask.sum())].all()  # real channels first, padding last
            counts.append(int(mask.sum()))
    assert sorted(set(counts)) == [1, 4, 5]
    assert len(counts) == len(manifest)


@pytest.fixture(scope="module")
def family_manifest(family_screen):
    """cp5-, hpa4- and brightfield1-like plates (5, 4 and 1 channels) of the synthetic family in one
    manifest: 10, 7 and 5 fields, so no count fills a whole number of 4-field batches."""
    parts = [load_manifests([family_screen(name)["train"]]).iloc[:n]
             for name, n in (("cp5", 10), ("hpa4", 7), ("brightfield1", 5))]
    return pd.concat(parts, ignore_index=True)


def _expected_field(manifest: pd.DataFrame, names: list[str]) -> list[np.ndarray]:
    """Every field of the manifest with exactly these channels, read in this order and normalized."""
    return [percentile_clip(read_field(m.store_uri, m.row, m.col, int(m.field), channels=names)[0])
            for m in manifest.itertuples() if sorted(m.channel_names) == sorted(names)]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["pad", "group"])
def test_family_plates_reach_the_trainer_with_names_in_both_modes(ray_session, family_manifest, mode):
    manifest = family_manifest
    cfg = DataConfig(mixed_channels=mode, **_FAST)
    pipeline = build_field_pipeline(manifest, cfg, training=True, seed=0)
    assert pipeline.channels == 5
    batches = list(iter_training_batches(training_epoch_blocks(manifest, cfg, seed=0, epoch=0), cfg, batch_size=4,
                                         device="cpu"))
    assert len(batches) == len(manifest) // 4  # both modes: as many steps as samples allow
    counts = []
    for batch in batches:
        n_channels = batch.images.shape[1]
        if mode == "group":
            assert batch.channel_mask is None  # one channel count per batch: nothing padded
            assert {len(names) for names in batch.channel_names} == {n_channels}
        else:
            assert n_channels == 5
        mask = batch.channel_mask if batch.channel_mask is not None else torch.ones(4, n_channels, dtype=torch.bool)
        for image, names, real in zip(batch.images, batch.channel_names, mask):
            assert [n != "" for n in names] == real.tolist()
            real_names = [n for n in names if n]
            assert torch.all(image[~real] == 0)
            # The channels are the named stains in the named order: the image equals one field of
            # that stain set, read in that order and normalized.
            candidates = _expected_field(manifest, real_names)
            assert candidates
            assert any(np.abs(image[real].numpy() - want).max() < 2e-3 for want in candidates)
            counts.append(len(real_names))
    assert sorted(set(counts)) == [1, 4, 5]
    if mode == "group":  # 10 + 7 + 5 fields: 2 + 1 + 1 full batches, then hpa4's 3 left over (the most) + 1 repeat
        assert sorted(b.images.shape[1] for b in batches) == [1, 4, 4, 5, 5]
    else:
        assert len(counts) == 20


def test_group_mode_refuses_a_pad_size(family_manifest):
    with pytest.raises(ValueError, match="data.pad_channels_to"):
        build_field_pipeline(family_manifest, DataConfig(mixed_channels="group", pad_channels_to=6), training=True)
    with pytest.raises(ValueError, match="data.mixed_channels"):
        build_field_pipeline(family_manifest, DataConfig(mixed_channels="stack"), training=True)


@pytest.mark.integration
def test_field_size_crop_reads_the_centre(ray_session, tiny_screen):
    manifest = load_manifests([tiny_screen["heldout"]]).iloc[:4]
    cfg = DataConfig(field_size=32, **_FAST)
    rows = _rows(build_field_dataset(manifest, cfg, training=False, keep_columns=["plate", "well", "field"]))
    for r in rows:
        m = manifest[(manifest.well == r["well"]) & (manifest.field == r["field"])].iloc[0]
        raw, _ = read_field(m.store_uri, m.row, m.col, int(m.field), channels=list(m.channel_names), region=(16, 48, 16, 48))
        assert r["image"].shape == (5, 32, 32) and r["channel_mask"].all()
        np.testing.assert_allclose(r["image"].astype(np.float32), percentile_clip(raw), atol=1e-3)


@pytest.mark.integration
@pytest.mark.parametrize("normalization", ["clahe", "standardize", "none"])
def test_each_normalization_streams(ray_session, tiny_screen, normalization):
    """Every field arrives as `normalize_field` makes it from the plate's pixels (in float16), or with
    `none` as the plate's own uint16 pixels."""
    manifest = load_manifests([tiny_screen["heldout"]]).iloc[:4]
    cfg = DataConfig(normalization=normalization, **_FAST)
    rows = _rows(build_field_dataset(manifest, cfg, training=False, keep_columns=["well", "field"]))
    assert sorted((r["well"], r["field"]) for r in rows) == sorted(zip(manifest["well"], manifest["field"]))
    for row in rows:
        m = manifest[(manifest.well == row["well"]) & (manifest.field == row["field"])].iloc[0]
        raw, _ = read_field(m.store_uri, m.row, m.col, int(m.field), channels=list(m.channel_names))
        if normalization == "none":
            assert row["image"].dtype == np.uint16
            np.testing.assert_array_equal(row["image"], raw)
        else:
            expected = normalize_field(raw, normalization, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                       clahe_clip_limit=cfg.clahe_clip_limit, clahe_tiles=cfg.clahe_tiles,
                                       dtype=np.float16)
            assert row["image"].dtype == np.float16
            np.testing.assert_array_equal(row["image"], expected)


@pytest.fixture
def corrupt_manifest(tiny_screen, tmp_path):
    """Eight fields of a copy of the held-out plate, one of whose shards has overwritten bytes."""
    manifest = load_manifests([tiny_screen["heldout"]]).iloc[:8].copy()
    source = manifest["store_uri"].iloc[0]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(source, copy)
    manifest["store_uri"] = str(copy)
    bad = manifest.iloc[5]
    shard = copy / bad["row"] / bad["col"] / str(bad["field"]) / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[:64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    return manifest, bad


@pytest.mark.integration
def test_corrupt_chunk_is_skipped_and_counted_in_skip_mode(ray_session, corrupt_manifest):
    manifest, bad = corrupt_manifest
    cfg = DataConfig(bad_field_policy="skip", max_bad_fraction=0.2, **_FAST)
    pipeline = build_field_pipeline(manifest, cfg, training=False, keep_columns=["plate", "well", "field"])
    rows = _rows(pipeline.dataset)
    assert len(rows) == len(manifest) - 1
    assert (bad["well"], bad["field"]) not in {(r["well"], r["field"]) for r in rows}
    summary = pipeline.monitor.check()  # within max_bad_fraction: no error
    assert summary["fields"] == len(manifest) - 1
    [record] = summary["bad_fields"]
    assert (record["plate"], record["well"], record["field"]) == (bad["plate"], bad["well"], int(bad["field"]))
    assert f"well {bad['row']}{bad['col']}, field {bad['field']}" in record["error"]
    # The same bad field over a 2nd pass (epoch) is counted once.
    _rows(pipeline.dataset)
    assert len(pipeline.monitor.summary()["bad_fields"]) == 1
    # More bad fields than allowed: the stream itself fails, naming the field.
    strict = dataclasses.replace(cfg, max_bad_fraction=0.0)
    with pytest.raises(Exception, match="max_bad_fraction") as info:
        _rows(build_field_dataset(manifest, strict, training=True))
    assert f"field {bad['field']}" in str(info.value)


@pytest.mark.integration
def test_corrupt_chunk_is_named_in_fail_mode(ray_session, corrupt_manifest):
    manifest, bad = corrupt_manifest
    with pytest.raises(Exception, match="corrupt or unreadable chunk") as info:
        _rows(build_field_dataset(manifest, DataConfig(bad_field_policy="fail", **_FAST), training=False))
    text = str(info.value)
    assert bad["plate"] in text or "copy.zarr" in text
    assert f"well {bad['row']}{bad['col']}, field {bad['field']}" in text
    assert "BadFieldError" in text and "bad_field_policy" in text


@pytest.mark.integration
def test_uint8_transfer_halves_bytes_and_decodes_to_unit_range(ray_session, tiny_screen):
    manifest = load_manifests([tiny_screen["train"]]).iloc[:8]
    cfg = DataConfig(transfer_dtype="uint8", channel_permutation=False, **_FAST)
    batches = list(iter_training_batches(training_epoch_blocks(manifest, cfg, seed=0, epoch=0), cfg, batch_size=4,
                                         device="cpu"))
    assert len(batches) == 2 and batches[0].channel_mask is None  # nothing padded: no mask
    images = torch.cat([b.images for b in batches])
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert torch.allclose(images * 255, (images * 255).round(), atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        build_field_dataset(manifest, dataclasses.replace(cfg, normalization="standardize"), training=True)


@pytest.mark.integration
@pytest.mark.parametrize("use_zarrs", [False, True])
def test_reader_actors_deliver_the_same_fields_and_count_bad_ones(ray_session, corrupt_manifest, use_zarrs):
    # data.read_actors: the loader runs in long-lived actors; the same normalized fields arrive, and
    # the bad-field monitor (handed to the actors' constructor) still counts the corrupt one, with
    # either codec pipeline (zarrs + reader actors is the benchmark's fastest configuration).
    manifest, bad = corrupt_manifest
    cfg = DataConfig(bad_field_policy="skip", max_bad_fraction=0.2, read_actors=1, use_zarrs=use_zarrs, **_FAST)
    pipeline = build_field_pipeline(manifest, cfg, training=False, keep_columns=["plate", "well", "field"])
    rows = _rows(pipeline.dataset)
    assert len(rows) == len(manifest) - 1
    by_key = {(r.well, r.field): r for r in manifest.itertuples()}
    for row in rows:
        m = by_key[(row["well"], row["field"])]
        raw, _ = read_field(m.store_uri, m.row, m.col, int(m.field), channels=list(m.channel_names))
        np.testing.assert_allclose(row["image"].astype(np.float32), percentile_clip(raw, 1.0, 99.0), atol=1e-3)
    [record] = pipeline.monitor.check()["bad_fields"]
    assert (record["well"], record["field"]) == (bad["well"], int(bad["field"]))
    # the checksum failure was raised by the codec pipeline asked for, inside the actors
    assert ("the checksum is invalid" if use_zarrs else "Stored and computed checksum do not match") in record["error"]


def test_reader_actors_and_task_concurrency_are_exclusive(tiny_screen):
    manifest = load_manifests([tiny_screen["heldout"]])
    with pytest.raises(ValueError, match="read_actors=2 and data.read_concurrency=1"):
        build_field_dataset(manifest, DataConfig(read_actors=2, read_concurrency=1), training=False)

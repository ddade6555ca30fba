"""OME-Zarr 0.5 HCS plates: round trips, metadata, sharding, independent validation, clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image

from cellfm.data.plate import PlateError, open_store, plate_channel_names, read_field
from cellfm.data.plate_writer import create_plate, write_field

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
WELLS = [("B", "03"), ("C", "11"), ("B", "11")]
SHAPE = (24, 40)  # non-square: catches swapped y/x


def _image(seed: int, n_channels: int = len(CHANNELS)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, (n_channels, *SHAPE)).astype(np.uint16)


@pytest.fixture
def plate(tmp_path: Path) -> tuple[str, dict]:
    """A written plate and the images in it, keyed by (row, col, field)."""
    uri = str(tmp_path / "P1.zarr")
    create_plate(uri, "P1", WELLS, n_fields=2, channel_names=CHANNELS, field_shape=SHAPE, pixel_size_um=0.5)
    images = {}
    for i, (row, col) in enumerate(WELLS):
        for field in range(2):
            images[row, col, field] = _image(10 * i + field)
            write_field(uri, row, col, field, images[row, col, field])
    return uri, images


def _attrs(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def test_round_trip_is_exact(plate):
    uri, images = plate
    for (row, col, field), expected in images.items():
        image, names = read_field(uri, row, col, field)
        assert names == CHANNELS
        assert image.dtype == np.uint16 and image.shape == (5, *SHAPE)
        np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("channels", [["Mito", "DNA"], ["RNA"], ["AGP", "ER", "RNA", "DNA"], CHANNELS[::-1]])
def test_channel_subset_and_reorder_by_name(plate, channels):
    uri, images = plate
    image, names = read_field(uri, "C", "11", 1, channels=channels)
    assert names == channels
    np.testing.assert_array_equal(image, images["C", "11", 1][[CHANNELS.index(c) for c in channels]])
    assert image.flags.c_contiguous


def test_ome_metadata_is_well_formed(plate):
    uri, _ = plate
    root = Path(uri)
    ome = _attrs(root)["ome"]
    assert ome["version"] == "0.5"
    assert ome["plate"]["name"] == "P1"
    assert ome["plate"]["field_count"] == 2
    assert [r["name"] for r in ome["plate"]["rows"]] == ["B", "C"]
    assert [c["name"] for c in ome["plate"]["columns"]] == ["03", "11"]
    assert ome["plate"]["wells"] == [
        {"path": "B/03", "rowIndex": 0, "columnIndex": 0},
        {"path": "C/11", "rowIndex": 1, "columnIndex": 1},
        {"path": "B/11", "rowIndex": 0, "columnIndex": 1},
    ]
    well = _attrs(root / "C" / "11")["ome"]
    assert well["well"]["images"] == [{"path": "0"}, {"path": "1"}]

    image = _attrs(root / "C" / "11" / "1")["ome"]
    multiscale = image["multiscales"][0]
    assert [(a["name"], a["type"]) for a in multiscale["axes"]] == [("c", "channel"), ("y", "space"), ("x", "space")]
    assert all(a.get("unit") == "micrometer" for a in multiscale["axes"][1:])
    assert multiscale["datasets"] == [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]}
    ]
    channels = image["omero"]["channels"]
    assert [c["label"] for c in channels] == CHANNELS
    assert all(len(c["color"]) == 6 and c["active"] for c in channels)
    assert channels[0]["window"] == {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0}
    assert plate_channel_names(uri) == CHANNELS


def test_one_shard_per_field_with_channel_plane_chunks(plate):
    uri, _ = plate
    array = zarr.open_array(str(Path(uri) / "B" / "03" / "0" / "0"), mode="r")
    assert array.shards == (5, *SHAPE)
    assert array.chunks == (1, *SHAPE)
    assert array.metadata.dimension_names == ("c", "y", "x")
    codecs = array.metadata.to_dict()["codecs"]
    inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
    assert codecs[0]["name"] == "sharding_indexed" and "blosc" in inner
    blosc = next(c for c in codecs[0]["configuration"]["codecs"] if c["name"] == "blosc")
    assert blosc["configuration"]["cname"] == "zstd"
    stored = [p for p in (Path(uri) / "B" / "03" / "0" / "0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(stored) == 1  # the whole field is one object


def test_plate_validates_with_ome_zarr_models(plate):
    uri, _ = plate
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a validation warning
        hcs = HCS.from_zarr(zarr.open_group(uri, mode="r"))
        assert hcs.n_wells == 3
        wells = list(hcs.well_groups)
        assert len(wells) == 3
        assert [im.path for im in wells[0].ome_attributes.well.images] == ["0", "1"]
        field = open_ome_zarr(zarr.open_group(str(Path(uri) / "B" / "11" / "1"), mode="r"), version="0.5")
    assert isinstance(field, Image)
    assert field.datasets[0][0].path == "0"


def test_rewritten_plate_is_read_fresh(tmp_path):
    """Nothing is cached across calls: recreating a plate with other channels is seen at once."""
    uri = str(tmp_path / "P.zarr")
    create_plate(uri, "P", [("A", "01")], 1, ["DNA", "ER"], SHAPE)
    write_field(uri, "A", "01", 0, _image(1, 2))
    assert read_field(uri, "A", "01", 0)[1] == ["DNA", "ER"]
    create_plate(uri, "P", [("A", "01")], 1, ["Mito", "AGP", "RNA"], SHAPE)
    write_field(uri, "A", "01", 0, _image(2, 3))
    image, names = read_field(uri, "A", "01", 0)
    assert names == ["Mito", "AGP", "RNA"]
    np.testing.assert_array_equal(image, _image(2, 3))


def test_all_zero_field_is_data_not_missing(tmp_path):
    uri = str(tmp_path / "P.zarr")
    create_plate(uri, "P", [("A", "01")], 1, ["DNA"], SHAPE)
    write_field(uri, "A", "01", 0, np.zeros((1, *SHAPE), np.uint16))
    image, _ = read_field(uri, "A", "01", 0)
    assert not image.any()


def test_unknown_channel_names_plate_well_field_and_channel(plate):
    uri, _ = plate
    with pytest.raises(PlateError) as err:
        read_field(uri, "B", "03", 1, channels=["DNA", "Tubulin"])
    message = str(err.value)
    for part in (uri, "B03", "field 1", "Tubulin", "available channels", "Mito"):
        assert part in message


@pytest.mark.parametrize("image, expected", [
    (np.zeros((4, *SHAPE), np.uint16), "shape (4, 24, 40)"),
    (np.zeros((5, *SHAPE), np.float32), "dtype float32"),
    (np.zeros((5, 40, 24), np.uint16), "shape (5, 40, 24)"),
])
def test_write_of_wrong_shape_or_dtype_names_field_and_expectation(plate, image, expected):
    uri, _ = plate
    with pytest.raises(PlateError) as err:
        write_field(uri, "C", "11", 0, image)
    message = str(err.value)
    for part in (uri, "C11", "field 0", expected, "(5, 24, 40)", "uint16"):
        assert part in message


def _shard(uri: str, row: str, col: str, field: int) -> Path:
    return Path(uri) / row / col / str(field) / "0" / "c" / "0" / "0" / "0"


def test_deleted_shard_is_an_error_not_zeros(plate):
    uri, _ = plate
    _shard(uri, "B", "11", 1).unlink()
    with pytest.raises(PlateError, match=r"well B11, field 1.*missing shard"):
        read_field(uri, "B", "11", 1)


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate"])
def test_corrupted_shard_names_plate_well_field(plate, damage):
    uri, _ = plate
    shard = _shard(uri, "C", "11", 0)
    data = bytearray(shard.read_bytes())
    if damage == "flip_bytes":
        data[40:80] = bytes(b ^ 0xFF for b in data[40:80])  # inside the first channel's compressed chunk
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    with pytest.raises(PlateError) as err:
        read_field(uri, "C", "11", 0)
    assert uri in str(err.value) and "well C11, field 0" in str(err.value)
    assert err.value.__cause__ is not None  # the underlying zarr/codec error is kept


@pytest.mark.parametrize("row, col, field", [("H", "12", 0), ("B", "03", 7)])
def test_missing_well_or_field_names_them(plate, row, col, field):
    uri, _ = plate
    with pytest.raises(PlateError, match=rf"well {row}{col}, field {field}"):
        read_field(uri, row, col, field)


def test_missing_plate_is_a_plate_error(tmp_path):
    with pytest.raises(PlateError, match="nowhere.zarr"):
        plate_channel_names(str(tmp_path / "nowhere.zarr"))


@pytest.mark.parametrize("kwargs, expected", [
    ({"wells": [("B", "03"), ("B", "03")]}, "duplicate wells"),
    ({"wells": [("B-1", "03")]}, "letters/digits"),
    ({"channel_names": ["DNA", "DNA"]}, "unique"),
    ({"n_fields": 0}, "n_fields"),
    ({"dtype": "int64"}, "not supported"),
])
def test_create_rejects_bad_layouts(tmp_path, kwargs, expected):
    args = {"wells": [("A", "01")], "n_fields": 1, "channel_names": ["DNA"], "field_shape": SHAPE} | kwargs
    with pytest.raises(PlateError, match=expected):
        create_plate(str(tmp_path / "bad.zarr"), "bad", **args)


def test_open_store_handles_local_paths_and_remote_urls(tmp_path):
    local = open_store(str(tmp_path / "p.zarr"), "r")
    assert isinstance(local, zarr.storage.LocalStore) and local.read_only
    assert isinstance(open_store(f"file://{tmp_path}/p.zarr", "w"), zarr.storage.LocalStore)
    remote = open_store("s3://bucket/plates/p.zarr", "r", {"anon": True, "endpoint_url": "http://127.0.0.1:9"})
    assert isinstance(remote, zarr.storage.FsspecStore) and remote.read_only
    assert remote.path == "bucket/plates/p.zarr"


def test_large_fields_are_tiled_and_crops_decode_only_their_tiles(tmp_path):
    """Fields larger than tile_size get tile x tile inner chunks inside the one shard; a crop
    decodes only the tiles it covers: with the last tile corrupted, crops elsewhere still read."""
    from cellfm.data.plate import PlateError

    uri = str(tmp_path / "T.zarr")
    create_plate(uri, "T", [("A", "01")], 1, ["DNA"], (256, 256), tile_size=128)
    image = np.random.default_rng(0).integers(0, 60000, (1, 256, 256)).astype(np.uint16)
    write_field(uri, "A", "01", 0, image)
    array = zarr.open_array(str(Path(uri) / "A" / "01" / "0" / "0"), mode="r")
    assert array.chunks == (1, 128, 128) and array.shards == (1, 256, 256)
    crop, _ = read_field(uri, "A", "01", 0, region=(3, 100, 130, 250))
    np.testing.assert_array_equal(crop, image[:, 3:100, 130:250])

    shard = _shard(uri, "A", "01", 0)
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(4 * 16 + 4):-4]), dtype="<u8").reshape(4, 2)  # (offset, nbytes), C order
    offset, nbytes = (int(v) for v in index[3])  # tile (1, 1): y >= 128, x >= 128
    data[offset:offset + nbytes] = bytes(b ^ 0xFF for b in data[offset:offset + nbytes])
    shard.write_bytes(bytes(data))
    crop, _ = read_field(uri, "A", "01", 0, region=(0, 128, 0, 256))  # tiles (0, 0) and (0, 1) only
    np.testing.assert_array_equal(crop, image[:, :128])
    with pytest.raises(PlateError, match="well A01, field 0: cannot read field data"):
        read_field(uri, "A", "01", 0, region=(120, 140, 120, 140))


@pytest.mark.parametrize("region", [(0, 0, 0, 5), (0, 25, 0, 5), (-1, 3, 0, 5), (0, 3, 0)])
def test_bad_region_names_field_and_bounds(plate, region):
    from cellfm.data.plate import PlateError

    uri, _ = plate
    with pytest.raises(PlateError, match=r"well B03, field 0: region"):
        read_field(uri, "B", "03", 0, region=region)


def test_zarrs_codec_pipeline_reads_identically(plate):
    from cellfm.data.plate import use_zarrs

    uri, images = plate
    try:
        assert use_zarrs(True)
        assert zarr.config.get("codec_pipeline.path") == "zarrs.ZarrsCodecPipeline"
        image, _ = read_field(uri, "C", "11", 1, channels=["Mito", "ER"], region=(2, 20, 5, 37))
        np.testing.assert_array_equal(image, images["C", "11", 1][[4, 1], 2:20, 5:37])
    finally:
        use_zarrs(False)
    assert zarr.config.get("codec_pipeline.path") == "zarr.core.codec_pipeline.BatchedCodecPipeline"

"""Plates written by another library, ngff-zarr: cellfm reads every field exactly, resolves channel
names and validates plate and manifest; ngff-zarr reads cellfm's sharded plates back; what cellfm
does not read (no channel labels, a z-stack without a z setting, a time series) fails naming
plate/well/field. OME-Zarr 0.4, z-stacks and resolution levels: tests/test_ome_zarr_plates.py."""

from __future__ import annotations

import json
from pathlib import Path

import ngff_zarr as nz
import numpy as np
import pandas as pd
import pytest
import zarr

from cellfm.data.plate import PlateError, plate_channel_names, read_field
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.data.validate import open_plate, plate_problems, validate_target
from tests.conftest import write_control_manifest

CHANNELS = ["DNA", "ER", "Mito"]
WELLS = [("B", "3"), ("C", "11"), ("B", "11")]
N_FIELDS = 2
# Sizes that give ngff-zarr's defaults two resolution levels and partial edge chunks: 256 x 256
# chunks for 2-D images, 128 x 128 once a z axis is present.
SIZES = {("c", "y", "x"): {"c": 3, "y": 600, "x": 520},
         ("t", "c", "z", "y", "x"): {"t": 1, "c": 3, "z": 1, "y": 300, "x": 280}}


def _plate_order(name: str) -> tuple[int, str]:
    return len(name), name


def _write_ngff_zarr_plate(uri: str, dims: tuple[str, ...], sizes: dict[str, int], wells=WELLS,
                           n_fields: int = N_FIELDS, version: str = "0.5",
                           omero: bool = True) -> dict[tuple[str, str, int], np.ndarray]:
    """Write a uint16 plate with ngff-zarr's HCS writer and its default multiscales and chunking;
    return each field's pixels as (C, H, W), keyed by (row, col, field)."""
    rows = sorted({r for r, _ in wells}, key=_plate_order)
    cols = sorted({c for _, c in wells}, key=_plate_order)
    plate = nz.Plate(
        rows=[nz.PlateRow(name=r) for r in rows], columns=[nz.PlateColumn(name=c) for c in cols],
        wells=[nz.PlateWell(path=f"{r}/{c}", rowIndex=rows.index(r), columnIndex=cols.index(c)) for r, c in wells],
        name="ngff", field_count=n_fields, version=version)
    squeezed = tuple(i for i, d in enumerate(dims) if d not in ("c", "y", "x") and sizes[d] == 1)
    images = {}
    with nz.HCSPlateWriter(uri, plate) as writer:
        for i, (row, col) in enumerate(wells):
            for field in range(n_fields):
                data = np.random.default_rng(10 * i + field).integers(0, 60000, [sizes[d] for d in dims]).astype(np.uint16)
                image = nz.to_ngff_image(data, dims=list(dims), channel_names=CHANNELS,
                                         scale={d: 0.65 for d in dims if d in ("z", "y", "x")})
                multiscales = nz.to_multiscales(image)
                if omero:  # ngff-zarr writes channel names only inside omero metadata
                    multiscales.metadata.omero = nz.compute_omero_from_multiscales(multiscales)
                writer.write_well_image(multiscales, row, col, field)
                images[row, col, field] = np.squeeze(data, axis=squeezed)
    return images


@pytest.fixture(scope="module", params=list(SIZES), ids=lambda dims: "".join(dims))
def ngff_plate(request, tmp_path_factory) -> tuple[str, tuple[str, ...], dict]:
    """An ngff-zarr plate (written once per module and dims), its dims and its fields' pixels."""
    dims = request.param
    uri = str(tmp_path_factory.mktemp("ngff") / "ngff.zarr")
    return uri, dims, _write_ngff_zarr_plate(uri, dims, SIZES[dims])


def test_ngff_zarr_writes_unsharded_multiscale_ome_zarr_05(ngff_plate):
    """Pins what this test reads: not cellfm's own layout (one shard per field, path "0")."""
    uri, dims, _ = ngff_plate
    root = json.loads((Path(uri) / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["attributes"]["ome"]["version"] == "0.5"
    field = zarr.open_group(str(Path(uri) / "C" / "11" / "1"), mode="r")
    multiscale = field.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == list(dims)
    assert [d["path"] for d in multiscale["datasets"]] == ["scale0/image", "scale1/image"]
    array = field["scale0/image"]
    assert array.shards is None
    assert array.shape == tuple(SIZES[dims][d] for d in dims)
    assert all(array.chunks[dims.index(d)] < array.shape[dims.index(d)] for d in ("y", "x"))
    assert [c["label"] for c in field.attrs["ome"]["omero"]["channels"]] == CHANNELS


def test_every_field_of_an_ngff_zarr_plate_reads_exactly(ngff_plate):
    uri, _, images = ngff_plate
    assert plate_channel_names(uri) == CHANNELS
    for (row, col, field), expected in images.items():
        image, names = read_field(uri, row, col, field)
        assert names == CHANNELS and image.dtype == np.uint16
        np.testing.assert_array_equal(image, expected)
    crop, names = read_field(uri, "B", "11", 1, channels=["Mito", "DNA"], region=(100, 290, 120, 270))
    assert names == ["Mito", "DNA"]
    np.testing.assert_array_equal(crop, images["B", "11", 1][[2, 0], 100:290, 120:270])


def test_ngff_zarr_plate_and_its_manifest_validate(ngff_plate, tmp_path):
    uri, dims, _ = ngff_plate
    shape = (SIZES[dims]["y"], SIZES[dims]["x"])
    assert plate_problems(uri, deep=True) == []
    manifest = write_control_manifest(uri, WELLS, N_FIELDS, CHANNELS, shape, tmp_path / "m.parquet", plate="ngff")
    assert validate_target(str(manifest)) == ([str(manifest)], [])
    info = open_plate(uri, manifest=pd.read_parquet(manifest))
    assert (info.name, info.wells, info.field_count) == ("ngff", ["B/3", "C/11", "B/11"], N_FIELDS)
    assert (info.channel_names, info.field_shape, info.dtype) == (CHANNELS, shape, "uint16")


def test_ngff_zarr_reads_a_cellfm_plate(tmp_path):
    """The other direction: ngff-zarr reads cellfm's sharded plate, pixels and channel labels."""
    uri = str(tmp_path / "cellfm.zarr")
    create_plate(uri, "P1", WELLS, N_FIELDS, CHANNELS, (24, 40))
    images = {}
    for i, (row, col) in enumerate(WELLS):
        for field in range(N_FIELDS):
            images[row, col, field] = np.random.default_rng(10 * i + field).integers(0, 60000, (3, 24, 40)).astype(np.uint16)
            write_field(uri, row, col, field, images[row, col, field])
    plate = nz.from_hcs_zarr(uri, validate=True)
    assert (plate.name, plate.field_count, [w.path for w in plate.wells]) == ("P1", N_FIELDS, ["B/3", "C/11", "B/11"])
    for (row, col, field), expected in images.items():
        multiscales = plate.get_well(row, col).get_image(field)
        assert tuple(multiscales.images[0].dims) == ("c", "y", "x")
        assert [c.label for c in multiscales.metadata.omero.channels] == CHANNELS
        np.testing.assert_array_equal(np.asarray(multiscales.images[0].data), expected)


@pytest.mark.parametrize("dims, sizes, options, read_error, problem", [
    (("c", "y", "x"), {"c": 3, "y": 32, "x": 24}, {"omero": False},
     "well B3, field 0: no omero channel labels", "well B3, field 0: no omero channel labels"),
    (("c", "z", "y", "x"), {"c": 3, "z": 2, "y": 32, "x": 24}, {},
     "well B3, field 0: z-stack of 2 planes; choose one with data.z_plane", None),
    (("t", "c", "y", "x"), {"t": 2, "c": 3, "y": 32, "x": 24}, {},
     "well B3, field 0: axis 't' has size 2", "well B3, field 0: non-singleton axes besides c, z, y, x: [('t', 2)]"),
], ids=["no-omero", "z-stack", "time-series"])
def test_unsupported_ngff_zarr_plates_fail_saying_why(tmp_path, dims, sizes, options, read_error, problem):
    """One line naming plate/well/field; a z-stack is a valid plate that needs a read setting."""
    uri = str(tmp_path / "ngff.zarr")
    _write_ngff_zarr_plate(uri, dims, sizes, wells=[("B", "3")], n_fields=1, **options)
    with pytest.raises(PlateError) as err:
        read_field(uri, "B", "3", 0)
    assert uri in str(err.value) and "well B3, field 0" in str(err.value) and read_error in str(err.value)
    assert "\n" not in str(err.value)
    problems = plate_problems(uri)
    if problem is None:
        assert problems == []
    else:
        assert any(uri in p and problem in p for p in problems), problems

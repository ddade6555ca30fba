"""Validation at the edge: every problem of a store is reported (not just the first), each naming
plate/well/field; jobs/validate.py exits non-zero; plates from another writer validate and read."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr_models.v05.hcs import HCS

from cellfm.data.manifest import write_manifest
from cellfm.data.plate import PlateError, read_field
from cellfm.data.plate_writer import create_plate, write_field
from cellfm.data.validate import open_plate, plate_problems, validate_target
from cellfm.cli import main as cellfm_main
from tests.conftest import write_control_manifest


def validate_main(argv: list[str]) -> int:
    return cellfm_main(["validate", *argv])

CHANNELS = ["DNA", "ER", "Mito"]
WELLS = [("A", "01"), ("A", "02"), ("B", "01")]
SHAPE = (16, 24)


def _plate(root: Path, name: str = "V") -> str:
    uri = str(root / f"{name}.zarr")
    create_plate(uri, name, WELLS, 2, CHANNELS, SHAPE)
    for i, (row, col) in enumerate(WELLS):
        for f in range(2):
            write_field(uri, row, col, f, np.full((3, *SHAPE), 10 * i + f + 1, np.uint16))
    return uri


def _manifest(uri: str, path: Path) -> Path:
    return write_control_manifest(uri, WELLS, 2, CHANNELS, SHAPE, path)


def _edit_attrs(path: Path, edit) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"])
    (path / "zarr.json").write_text(json.dumps(doc))


def test_clean_plate_and_manifest_have_no_problems(tmp_path, capsys):
    uri = _plate(tmp_path)
    manifest = _manifest(uri, tmp_path / "m.parquet")
    assert plate_problems(uri) == []
    assert validate_target(str(manifest)) == ([str(manifest)], [])
    assert validate_main([str(tmp_path)]) == 0
    assert "0 problem(s) in 2 item(s)" in capsys.readouterr().out
    info = open_plate(uri, manifest=pd.read_parquet(manifest))
    assert info.channel_names == CHANNELS and info.field_count == 2 and info.dtype == "uint16"


def test_every_problem_is_reported_with_plate_well_field(tmp_path, capsys):
    uri = _plate(tmp_path)
    root = Path(uri)
    (root / "A" / "01" / "1" / "0" / "c" / "0" / "0" / "0").unlink()                      # missing shard
    shard = root / "A" / "02" / "0" / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[30:60] = bytes(b ^ 0xFF for b in data[30:60])
    shard.write_bytes(bytes(data))                                                         # corrupt chunk
    _edit_attrs(root, lambda a: a["ome"]["plate"]["wells"].append(dict(a["ome"]["plate"]["wells"][2])))  # dup well
    _edit_attrs(root / "B" / "01" / "1", lambda a: a["ome"]["omero"]["channels"].pop())    # label/array mismatch
    zarr.create_array(str(root / "B" / "01" / "0"), name="0", shape=(3, *SHAPE), dtype="int64",
                      chunks=(1, *SHAPE), overwrite=True)[...] = 1                          # wrong dtype
    problems = plate_problems(uri)
    expected = [
        ("well B01", "duplicate well"),
        ("well A01, field 1", "missing shard"),
        ("well A02, field 0", "corrupt or unreadable chunk"),
        ("well B01, field 0", "dtype int64 not supported"),
        ("well B01, field 1", "omero lists 2 channel labels"),
    ]
    for where, what in expected:
        assert any(where in p and what in p for p in problems), (where, what, problems)
    assert all(uri in p for p in problems)

    with pytest.raises(PlateError) as err:
        open_plate(uri)  # metadata-level checks raise one error listing them all
    assert "duplicate well" in str(err.value) and "omero lists 2 channel labels" in str(err.value)

    assert validate_main([uri]) == 1
    out = capsys.readouterr().out
    assert out.count("PROBLEM") == len(problems) >= 5


def test_manifest_problems_are_all_listed(tmp_path, capsys):
    uri = _plate(tmp_path)
    df = pd.read_parquet(_manifest(uri, tmp_path / "m.parquet"))
    df.at[1, "channel_names"] = ["DNA", "Tubulin", "Mito"]
    df.at[3, "height"] = 99
    df.at[4, "dtype"] = "uint8"
    df.loc[len(df)] = df.iloc[0].to_dict() | {"well": "H12", "row": "H", "col": "12"}
    bad = write_manifest(df, tmp_path / "bad.parquet")
    assert validate_main([str(bad)]) == 1
    out = capsys.readouterr().out
    for part in ("well A01, field 1: channel(s) ['Tubulin'] not in plate", "well A02, field 1: manifest says 99 x 24",
                 "well B01, field 0: manifest says dtype uint8", "well H12, field 0: well not in the plate"):
        assert part in out, out
    with pytest.raises(PlateError, match="Tubulin"):
        open_plate(uri, manifest=df)


def test_plate_written_by_another_writer_validates_and_reads(tmp_path):
    """A plate in another valid OME-Zarr 0.5 layout, written with raw zarr-python by the spec:
    t,c,z,y,x axes, two resolution levels, unsharded 8x8 chunks with the default zstd codec, a
    non-default field path and rows/columns listed in a different order. ome-zarr-models (an
    independent validator) accepts it, and cellfm reads it."""
    uri = tmp_path / "foreign.zarr"
    root = zarr.open_group(str(uri), mode="w", zarr_format=3)
    wells = [("B", "7"), ("A", "3")]
    root.attrs["ome"] = {"version": "0.5", "plate": {
        "version": "0.5", "name": "foreign", "columns": [{"name": "7"}, {"name": "3"}], "rows": [{"name": "B"}, {"name": "A"}],
        "wells": [{"path": "B/7", "rowIndex": 0, "columnIndex": 0}, {"path": "A/3", "rowIndex": 1, "columnIndex": 1}],
        "acquisitions": [{"id": 0, "name": "scan"}], "field_count": 1}}
    data = {}
    for i, (row, col) in enumerate(wells):
        well = root.create_group(f"{row}/{col}")
        well.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "fov0", "acquisition": 0}]}}
        image = well.create_group("fov0")
        image.attrs["ome"] = {"version": "0.5", "multiscales": [{
            "name": f"{row}{col}",
            "axes": [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"},
                     {"name": "z", "type": "space", "unit": "micrometer"},
                     {"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 0.3, 0.3]}]},
                         {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 0.6, 0.6]}]}],
        }], "omero": {"channels": [{"label": "Hoechst", "color": "0000FF", "window": {"min": 0, "max": 4095, "start": 0, "end": 4095}},
                                   {"label": "Phalloidin", "color": "FF0000", "window": {"min": 0, "max": 4095, "start": 0, "end": 4095}}]}}
        data[row, col] = np.random.default_rng(i).integers(0, 4096, (1, 2, 1, 20, 18)).astype(np.uint16)
        for level, arr in (("s0", data[row, col]), ("s1", data[row, col][..., ::2, ::2])):
            image.create_array(level, shape=arr.shape, dtype="uint16", chunks=(1, 1, 1, 8, 8),
                               dimension_names=["t", "c", "z", "y", "x"])[...] = arr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HCS.from_zarr(zarr.open_group(str(uri), mode="r")).n_wells == 2
    assert plate_problems(str(uri)) == []
    info = open_plate(str(uri))
    assert info.channel_names == ["Hoechst", "Phalloidin"] and info.field_shape == (20, 18)
    image, names = read_field(str(uri), "A", "3", "fov0", channels=["Phalloidin"], region=(4, 17, 2, 11))
    np.testing.assert_array_equal(image, data["A", "3"][0, [1], 0, 4:17, 2:11])


def test_validate_command_reports_unreadable_targets(tmp_path, capsys):
    assert validate_main([str(tmp_path / "missing.zarr")]) == 1
    assert "cannot open plate" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert validate_main([str(tmp_path / "empty")]) == 1
    shutil.rmtree(tmp_path / "empty")

"""Field manifests: schema, validation messages, atomic writes, consistency with plates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cellfm.data.manifest as manifest_module
from cellfm.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    check_manifest_against_plates,
    read_manifest,
    write_manifest,
)
from cellfm.data.plate import PlateError
from cellfm.data.plate_writer import create_plate

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def _manifest(store_uri: str = "/data/P1.zarr", wells=(("B", "03"), ("C", "11")), n_fields: int = 2) -> pd.DataFrame:
    rows = []
    for row, col in wells:
        for field in range(n_fields):
            control = row == "B"
            rows.append({
                "source": "test", "plate": "P1", "well": f"{row}{col}", "row": row, "col": col, "field": field,
                "store_uri": store_uri, "channel_names": list(CHANNELS), "channel_groups": ["context"] * 5,
                "height": 32, "width": 32, "dtype": "uint16",
                "perturbation_id": "DMSO" if control else "CMP-01", "moa": "control" if control else "er_stress",
                "is_control": control, "dose": 0.0 if control else 1.5, "cell_line": "U2OS", "batch": "B1",
            })
    return pd.DataFrame(rows)


def test_round_trip_keeps_columns_order_and_types(tmp_path):
    df = _manifest()
    df["site_note"] = "extra columns survive"
    path = write_manifest(df.iloc[:, ::-1], tmp_path / "m.parquet")  # column order is normalized
    back = read_manifest(path)
    assert list(back.columns) == [*MANIFEST_COLUMNS, "site_note"]
    assert back["field"].dtype == np.int64 and back["height"].dtype == np.int64
    assert back["is_control"].dtype == bool and back["dose"].dtype == np.float64
    assert back["channel_names"].iloc[0] == CHANNELS and isinstance(back["channel_names"].iloc[0], list)
    assert back["channel_groups"].iloc[0] == ["context"] * 5
    pd.testing.assert_frame_equal(back, df[[*MANIFEST_COLUMNS, "site_note"]])

    schema = pq.read_schema(path)
    assert schema.field("channel_names").type == pa.list_(pa.string())
    assert schema.field("channel_groups").type == pa.list_(pa.string())
    assert schema.field("field").type == pa.int64()
    assert schema.field("is_control").type == pa.bool_()
    assert schema.field("dose").type == pa.float64()


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['moa', 'dose'\]"):
        write_manifest(_manifest().drop(columns=["moa", "dose"]), tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pandas(_manifest().drop(columns=["batch"])), tmp_path / "raw.parquet")
    with pytest.raises(ManifestError, match=r"raw.parquet.*missing column\(s\) \['batch'\]"):
        read_manifest(tmp_path / "raw.parquet")


def test_duplicate_plate_well_field_rows_are_rejected_and_named(tmp_path):
    df = _manifest()
    duplicated = pd.concat([df, df.iloc[[3]]], ignore_index=True)
    with pytest.raises(ManifestError, match=r"1 duplicate \(plate, well, field\) key\(s\): \(P1, C11, 1\)"):
        write_manifest(duplicated, tmp_path / "m.parquet")
    # A file written by another tool is checked on read as well.
    raw = duplicated.copy()
    pq.write_table(pa.Table.from_pandas(raw), tmp_path / "raw.parquet")
    with pytest.raises(ManifestError, match=r"\(P1, C11, 1\)"):
        read_manifest(tmp_path / "raw.parquet")


def test_channel_names_and_groups_length_mismatch_names_the_row(tmp_path):
    df = _manifest()
    df.at[2, "channel_groups"] = ["context"] * 4
    with pytest.raises(ManifestError, match=r"plate 'P1' well C11 field 0 has 5 channel_names .* but 4 channel_groups"):
        write_manifest(df, tmp_path / "m.parquet")


def test_unknown_channel_group_is_rejected(tmp_path):
    df = _manifest()
    df.at[0, "channel_groups"] = ["context"] * 4 + ["protein"]
    with pytest.raises(ManifestError, match=r"well B03 field 0 has channel group\(s\) \['protein'\]"):
        write_manifest(df, tmp_path / "m.parquet")


def test_missing_file_message(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(ManifestError, match=f"^manifest not found: {path}$"):
        read_manifest(path)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = write_manifest(_manifest(), tmp_path / "m.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]
    before = path.read_bytes()

    def crash(table, where, **kwargs):
        Path(where).write_bytes(b"half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(manifest_module.pq, "write_table", crash)
    with pytest.raises(ManifestError, match="m.parquet'.*cannot write: OSError: disk full"):
        write_manifest(_manifest(n_fields=3), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]  # temp file cleaned up
    assert path.read_bytes() == before  # previous version intact


def test_check_against_plates_passes_and_catches_missing_channel(tmp_path):
    uri = str(tmp_path / "P1.zarr")
    create_plate(uri, "P1", [("B", "03"), ("C", "11")], 2, CHANNELS, (16, 16))
    df = _manifest(store_uri=uri)
    check_manifest_against_plates(df)

    df.at[3, "channel_names"] = ["DNA", "Tubulin"]
    df.at[3, "channel_groups"] = ["context", "concept"]
    with pytest.raises(PlateError) as err:
        check_manifest_against_plates(df)
    for part in (uri, "well C11", "field 1", "Tubulin", "available channels"):
        assert part in str(err.value)


def test_check_against_plates_catches_unknown_well_field_and_plate(tmp_path):
    uri = str(tmp_path / "P1.zarr")
    create_plate(uri, "P1", [("B", "03")], 2, CHANNELS, (16, 16))
    with pytest.raises(PlateError, match=r"well C11, field 0: well not in the plate"):
        check_manifest_against_plates(_manifest(store_uri=uri))
    with pytest.raises(PlateError, match=r"well B03, field 2: field index outside"):
        check_manifest_against_plates(_manifest(store_uri=uri, wells=[("B", "03")], n_fields=3))
    with pytest.raises(PlateError, match="missing.zarr"):
        check_manifest_against_plates(_manifest(store_uri=str(tmp_path / "missing.zarr")))

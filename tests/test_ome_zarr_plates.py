"""Existing OME-Zarr plates registered in place (`cellfm ingest --layout ome-zarr`) and read as labs have
them: 0.4 on Zarr v2 and 0.5 on Zarr v3 written by other libraries (ngff-zarr, ome-zarr-py), z-stacks
(one plane or a projection), multiscale levels, acquisitions, plates without channel labels, platemaps
joined on plate + well, and a plate on an S3-compatible server."""

from __future__ import annotations

import json
from pathlib import Path

import ngff_zarr as nz
import numpy as np
import pandas as pd
import pytest
import zarr

from cellfm.cli import main
from cellfm.data.ingest.ome_zarr import plan_ome_zarr, register_ome_zarr
from cellfm.data.ingest.plan import IngestError
from cellfm.data.manifest import read_manifest
from cellfm.data.plate import PlateError, read_field
from cellfm.data.validate import plate_problems, validate_target

CHANNELS = ["DNA", "Actin"]
WELLS = [("B", "3"), ("C", "5")]
N_FIELDS = 2
SIZES = {"c": 2, "z": 3, "y": 40, "x": 36}


def _write_plate(uri: str, version: str, wells=WELLS, n_fields: int = N_FIELDS, omero: bool = True,
                 acquisitions: int = 0, name: str = "P1") -> dict[tuple[str, str, int], np.ndarray]:
    """A (c, z, y, x) uint16 plate written by ngff-zarr with two resolution levels; its fields' pixels."""
    rows = sorted({r for r, _ in wells})
    cols = sorted({c for _, c in wells}, key=int)
    plate = nz.Plate(
        rows=[nz.PlateRow(name=r) for r in rows], columns=[nz.PlateColumn(name=c) for c in cols],
        wells=[nz.PlateWell(path=f"{r}/{c}", rowIndex=rows.index(r), columnIndex=cols.index(c)) for r, c in wells],
        name=name, field_count=n_fields, version=version,
        acquisitions=[nz.PlateAcquisition(id=a, name=f"acq{a}") for a in range(acquisitions)] or None)
    images = {}
    with nz.HCSPlateWriter(uri, plate) as writer:
        for i, (row, col) in enumerate(wells):
            for field in range(n_fields):
                data = np.random.default_rng(10 * i + field).integers(0, 60000, list(SIZES.values())).astype(np.uint16)
                image = nz.to_ngff_image(data, dims=list(SIZES), channel_names=CHANNELS,
                                         scale={"z": 1.0, "y": 0.65, "x": 0.65})
                multiscales = nz.to_multiscales(image, scale_factors=[2])
                if omero:
                    multiscales.metadata.omero = nz.compute_omero_from_multiscales(multiscales)
                writer.write_well_image(multiscales, row, col, field,
                                        acquisition_id=field % acquisitions if acquisitions else 0)
                images[row, col, field] = data
    return images


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def plate(request, tmp_path_factory) -> tuple[str, str, dict]:
    uri = str(tmp_path_factory.mktemp(f"ome{request.param}") / "P1.zarr")
    return uri, request.param, _write_plate(uri, request.param)


def _listing(uri: str) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(uri)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(uri).rglob("*")}


def test_plates_are_the_zarr_format_of_their_version(plate):
    uri, version, _ = plate
    if version == "0.4":
        assert json.loads((Path(uri) / ".zattrs").read_text())["plate"]["version"] == "0.4"
        assert not (Path(uri) / "zarr.json").exists()
    else:
        assert json.loads((Path(uri) / "zarr.json").read_text())["attributes"]["ome"]["version"] == "0.5"


def test_register_in_place_lists_every_field_and_a_rerun_writes_nothing(plate, tmp_path):
    uri, version, _ = plate
    before = _listing(uri)
    df = plan_ome_zarr([uri])
    assert len(df) == len(WELLS) * N_FIELDS
    assert list(zip(df["well"], df["field"])) == [("B3", 0), ("B3", 1), ("C5", 0), ("C5", 1)]
    assert set(df["store_uri"]) == {uri} and set(df["plate"]) == {"P1"}
    assert all(list(n) == CHANNELS for n in df["channel_names"]) and "channel_labels" not in df.columns
    assert (df["height"] == 40).all() and (df["width"] == 36).all() and (df["dtype"] == "uint16").all()
    assert (df["size_z"] == 3).all() and df["content_version"].nunique() == 1
    manifest = tmp_path / "m.parquet"
    assert register_ome_zarr(df, manifest, progress=None)
    assert _listing(uri) == before  # nothing copied into or written to the plate
    stamp = manifest.stat().st_mtime_ns
    assert not register_ome_zarr(plan_ome_zarr([uri]), manifest, progress=None)
    assert manifest.stat().st_mtime_ns == stamp and sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]
    assert validate_target(str(manifest)) == ([str(manifest)], [])
    assert plate_problems(uri) == []


def test_every_field_reads_exactly_as_a_plane_a_projection_and_a_level(plate):
    uri, _, images = plate
    for (row, col, field), data in images.items():
        for z in range(SIZES["z"]):
            image, names = read_field(uri, row, col, field, z_plane=z)
            assert names == CHANNELS
            np.testing.assert_array_equal(image, data[:, z])
        np.testing.assert_array_equal(read_field(uri, row, col, field, z_projection="max")[0], data.max(axis=1))
        mean = read_field(uri, row, col, field, z_projection="mean")[0]
        assert mean.dtype == np.float32
        np.testing.assert_array_equal(mean, data.mean(axis=1, dtype=np.float64).astype(np.float32))
    level1 = zarr.open_group(f"{uri}/C/5/1", mode="r")
    datasets = (level1.attrs.asdict().get("ome") or level1.attrs.asdict())["multiscales"][0]["datasets"]
    stored = np.asarray(level1[datasets[1]["path"]])
    assert stored.shape == (2, 1, 20, 18)  # ngff-zarr halves z, y and x
    image, _ = read_field(uri, "C", "5", 1, channels=["Actin"], z_plane=0, resolution_level=1)
    np.testing.assert_array_equal(image, stored[1:2, 0])
    with pytest.raises(PlateError, match=r"well C5, field 1: z-stack of 3 planes; choose one with data.z_plane"):
        read_field(uri, "C", "5", 1)
    with pytest.raises(PlateError, match=r"well C5, field 1: resolution level 2 requested .* 2 level\(s\) 0..1"):
        read_field(uri, "C", "5", 1, z_plane=0, resolution_level=2)
    with pytest.raises(PlateError, match=r"well C5, field 1: data.z_plane=3 but the field has 3 z-plane"):
        read_field(uri, "C", "5", 1, z_plane=3)


def test_platemap_joins_on_plate_and_well_with_jump_names_and_column_map(plate, tmp_path):
    uri, _, _ = plate
    platemap = pd.DataFrame({"Metadata_Plate": ["P1", "P1", "P2"], "Metadata_Well": ["B03", "C05", "B03"],
                             "Metadata_broad_sample": ["", "BRD-1", "BRD-9"], "Metadata_moa": ["", "tubulin", "x"],
                             "Metadata_mmoles_per_liter": ["", "10", "1"], "Metadata_Compartment": ["a", "b", "c"]})
    platemap.to_csv(tmp_path / "map.csv", index=False)
    df = plan_ome_zarr([uri], platemap=tmp_path / "map.csv")
    by_well = df.drop_duplicates("well").set_index("well")
    assert by_well.loc["B3", "is_control"] and by_well.loc["B3", "perturbation_id"] == "DMSO"
    assert (by_well.loc["C5", "perturbation_id"], by_well.loc["C5", "moa"], by_well.loc["C5", "dose"]) == ("BRD-1", "tubulin", 10.0)
    assert not by_well.loc["C5", "is_control"] and list(by_well["Metadata_Compartment"]) == ["a", "b"]
    assert "Metadata_moa" not in df.columns and "Metadata_broad_sample" not in df.columns  # they became moa, ...
    platemap.rename(columns={"Metadata_Plate": "Barcode", "Metadata_Well": "Pos"}).to_parquet(tmp_path / "map.parquet")
    mapped = plan_ome_zarr([uri], platemap=tmp_path / "map.parquet", column_map={"Barcode": "plate", "Pos": "well"})
    pd.testing.assert_frame_equal(mapped, df)


def test_platemap_missing_wells_or_duplicate_rows_are_refused_one_line_each(plate, tmp_path):
    uri, _, _ = plate
    pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["B03"]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(IngestError) as err:
        plan_ome_zarr([uri], platemap=tmp_path / "short.csv")
    assert str(err.value) == f"platemap {tmp_path / 'short.csv'}: plate 'P1': 1 well(s) not in the platemap: C5"
    pd.DataFrame({"well": ["B3", "B03", "C5"], "moa": ["a", "b", "c"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(IngestError) as err:
        plan_ome_zarr([uri], platemap=tmp_path / "dup.csv")
    assert str(err.value) == f"platemap {tmp_path / 'dup.csv'}: plate '(every plate)', well B03: listed 2 times (one row per plate and well)"


def test_a_changed_plate_is_registered_again_with_a_new_content_version(tmp_path):
    uri = str(tmp_path / "P1.zarr")
    _write_plate(uri, "0.4", wells=[("B", "3")], n_fields=1)
    manifest = tmp_path / "m.parquet"
    register_ome_zarr(plan_ome_zarr([uri]), manifest, progress=None)
    old = read_manifest(manifest)["content_version"].iloc[0]
    array = zarr.open_array(f"{uri}/B/3/0/scale0/image", mode="r+")
    array[0, 0, 0, 0] = array[0, 0, 0, 0] + 1
    assert register_ome_zarr(plan_ome_zarr([uri]), manifest, progress=None)
    assert read_manifest(manifest)["content_version"].iloc[0] != old


def test_acquisitions_one_or_all_and_plates_without_labels_need_a_channel_map(tmp_path):
    uri = str(tmp_path / "P2.zarr")
    images = _write_plate(uri, "0.5", wells=[("B", "3")], n_fields=2, omero=False, acquisitions=2, name="P2")
    with pytest.raises(IngestError, match=r"well B3, field 0: no omero channel labels; name the 2 channels with --channel-map"):
        plan_ome_zarr([uri])
    every = plan_ome_zarr([uri], channel_map={"0": "DNA", "1": "Actin"})
    assert list(every["field"]) == [0, 1] and list(every["acquisition"]) == ["0", "1"]
    only = plan_ome_zarr([uri], channel_map={"0": "DNA", "1": None}, acquisition="1")
    assert list(only["field"]) == [1] and list(only["channel_names"].iloc[0]) == ["DNA"]
    assert list(only["channel_labels"].iloc[0]) == ["DNA", ""]
    image, names = read_field(uri, "B", "3", 1, z_plane=1, labels=list(only["channel_labels"].iloc[0]))
    assert names == ["DNA"]
    np.testing.assert_array_equal(image, images["B", "3", 1][:1, 1])
    manifest = tmp_path / "m.parquet"
    register_ome_zarr(only, manifest, progress=None)
    assert validate_target(str(manifest)) == ([str(manifest)], [])
    with pytest.raises(IngestError, match="no acquisition '7'"):
        plan_ome_zarr([uri], channel_map={"0": "DNA", "1": None}, acquisition="7")


def test_an_ome_zarr_py_04_plate_registers_and_reads_exactly(tmp_path):
    """A second writer: ome-zarr-py's HCS helpers at format 0.4 (Zarr v2), t, c, z, y, x axes."""
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    uri = str(tmp_path / "ozp.zarr")
    root = zarr.open_group(parse_url(uri, mode="w", fmt=FormatV04()).store, zarr_format=2)
    write_plate_metadata(root, ["A"], ["1", "2"], ["A/1", "A/2"], fmt=FormatV04(), name="OZP", field_count=1)
    images = {}
    for i, col in enumerate(("1", "2")):
        well = root.require_group("A").require_group(col)
        write_well_metadata(well, [{"path": "0"}], fmt=FormatV04())
        data = np.random.default_rng(i).integers(0, 4000, (1, 2, 2, 32, 32)).astype(np.uint16)
        window = {"min": 0, "max": 65535, "start": 0, "end": 4000}
        write_image(data, well.require_group("0"), axes="tczyx", fmt=FormatV04(), scale_factors=[2],
                    omero={"channels": [{"label": c, "color": "FFFFFF", "window": window} for c in CHANNELS]})
        images[col] = data[0]
    df = plan_ome_zarr([uri])
    assert list(df["plate"].unique()) == ["OZP"] and list(df["well"]) == ["A1", "A2"] and (df["size_z"] == 2).all()
    for col, data in images.items():
        np.testing.assert_array_equal(read_field(uri, "A", col, 0, z_projection="max")[0], data.max(axis=1))
    assert plate_problems(uri) == []


def test_cli_registers_an_s3_plate_anonymously_readable(s3_server, tmp_path, capsys):
    """A public bucket (public-read ACLs) read with no credentials at all: {"anon": true}."""
    import boto3
    import s3fs

    so = s3_server["storage_options"]
    boto3.client("s3", endpoint_url=so["endpoint_url"], aws_access_key_id=so["key"], aws_secret_access_key=so["secret"],
                 region_name="us-east-1").create_bucket(Bucket="cellfm-public", ACL="public-read")
    local = str(tmp_path / "S3P.zarr")
    images = _write_plate(local, "0.4", wells=[("B", "3")], n_fields=1, name="S3P")
    s3fs.S3FileSystem(**so, s3_additional_kwargs={"ACL": "public-read"}).put(local, "cellfm-public/S3P.zarr",
                                                                              recursive=True)
    uri = "s3://cellfm-public/S3P.zarr"
    manifest = tmp_path / "s3.parquet"
    args = ["ingest", "--layout", "ome-zarr", "--plates", uri, "--manifest", str(manifest),
            "--endpoint-url", s3_server["endpoint_url"], "--storage-options", json.dumps({"anon": True})]
    assert main(args) == 0
    df = read_manifest(manifest)
    assert list(df["store_uri"]) == [uri] and list(df["well"]) == ["B3"]
    image, _ = read_field(uri, "B", "3", 0, z_plane=2, storage_options=so)
    np.testing.assert_array_equal(image, images["B", "3", 0][:, 2])
    assert main(args) == 0
    assert "nothing written" in capsys.readouterr().out


def _unlabelled_plate(tmp_path) -> tuple[str, dict, pd.DataFrame]:
    """A 0.4 z-stack plate without omero labels, registered with a channel map (one channel left out)."""
    uri = str(tmp_path / "P3.zarr")
    images = _write_plate(uri, "0.4", wells=[("B", "3"), ("C", "5")], n_fields=1, omero=False, name="P3")
    return uri, images, plan_ome_zarr([uri], channel_map={"0": None, "1": "Actin"})


def test_the_loader_reads_a_level_and_a_plane_with_the_manifest_channel_labels(tmp_path):
    """data.resolution_level / data.z_plane and the manifest's channel_labels reach FieldLoader."""
    from cellfm.config import DataConfig
    from cellfm.data.pipeline.layout import FIELD_INDEX, check_pipeline_config, field_table
    from cellfm.data.pipeline.loader import FieldLoader

    uri, _, df = _unlabelled_plate(tmp_path)
    cfg = DataConfig(normalization="none", z_plane=0, resolution_level=1, field_size=18, channel_permutation=False,
                     progress_interval_s=0)
    loader = FieldLoader(cfg, permute_channels=False, layout=check_pipeline_config(df, cfg))
    table = field_table(df, [])
    out = loader({k: table[k].to_numpy() for k in [*table.columns]} | {FIELD_INDEX: table[FIELD_INDEX].to_numpy()})
    assert list(out["channel_names"]) == ["Actin", "Actin"] and out["image"].shape == (2, 1, 18, 18)
    for i, (row, col) in enumerate([("B", "3"), ("C", "5")]):
        stored = np.asarray(zarr.open_array(f"{uri}/{row}/{col}/0/scale1/image", mode="r"))  # (c, z, 20, 18)
        np.testing.assert_array_equal(out["image"][i, 0], stored[1, 0, 1:19, :])  # centre crop of the level


@pytest.mark.integration
def test_a_registered_z_stack_streams_through_ray_data_as_its_projection(ray_session, tmp_path):
    from cellfm.config import DataConfig
    from cellfm.data.pipeline.dataset import build_field_dataset

    _, images, df = _unlabelled_plate(tmp_path)
    cfg = DataConfig(normalization="none", z_projection="max", progress_interval_s=0)
    rows = list(build_field_dataset(df, cfg, training=False, keep_columns=["well"]).iter_rows())
    assert [r["well"] for r in rows] == ["B3", "C5"] and [r["channel_names"] for r in rows] == ["Actin", "Actin"]
    for r, key in zip(rows, [("B", "3", 0), ("C", "5", 0)]):
        np.testing.assert_array_equal(r["image"], images[key][1:2].max(axis=1))

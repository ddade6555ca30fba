"""Ingestion of the three layouts end to end (on Ray), resume after a kill, and clear input errors.

The Cell Painting Gallery test uses REAL CPJUMP1 metadata: the per-plane image table shipped in the
PyPI package ``jump-image-datasets`` (plate BR00116991: real plate/well/site/channel rows and real
file names), the real CPJUMP1 barcode -> platemap table, real rows of the JUMP-Target-1 compound
platemap and of its compound metadata (jump-cellpainting/2024_Chandrasekaran_NatureMethods). Only
the pixels are generated (small TIFFs under the real file names).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.hcs import HCS
from PIL import Image

from cellfm.data.ingest.chammi import plan_chammi
from cellfm.data.ingest.cpg import CPG_CHANNEL_MAP, plan_cpg
from cellfm.data.ingest.generic import plan_generic
from cellfm.data.ingest.plan import IngestError, split_well
from cellfm.data.ingest.writer import run_ingestion
from cellfm.data.manifest import MANIFEST_COLUMNS, check_manifest_against_plates, read_manifest
from cellfm.data.plate import read_field
from cellfm.data.validate import plate_problems
from cellfm.reaper import session_processes
from tests.conftest import ray_session_dir_of_group, wait_until

REPO = Path(__file__).resolve().parent.parent
PLATE = "BR00116991"
WELLS = ["A01", "A02", "C09", "C13"]
CPJUMP1_MAP = {**CPG_CHANNEL_MAP, "OrigBrightfield": "Brightfield", "OrigHighZBF": None, "OrigLowZBF": None}
# Real rows (2024_Chandrasekaran_NatureMethods/metadata): barcode_platemap.csv, JUMP-Target-1 compound
# platemap and compound metadata, restricted to the wells used here.
BARCODE_PLATEMAP = "Assay_Plate_Barcode,Plate_Map_Name\nBR00116991,JUMP-Target-1_compound_platemap\n"
PLATEMAP = ("well_position\tbroad_sample\tsolvent\nA01\tBRD-A86665761-001-01-1\tDMSO\nA02\t\tDMSO\n"
            "C09\tBRD-K23363278-001-02-1\tDMSO\nC13\tBRD-K90747162-001-01-4\tDMSO\n")
COMPOUNDS = ("broad_sample\tInChIKey\tpert_iname\tpubchem_cid\tgene\tpert_type\tcontrol_type\n"
             "BRD-A86665761-001-01-1\tTZDUHAJSIBHXDL-UHFFFAOYSA-N\tgabapentin-enacarbil\t9883933\tCACNB4\ttrt\t\n"
             "BRD-K23363278-001-02-1\tMTJHLONVHHPNSI-IBGZPJMESA-N\tCYT-997\t11351021\tTUBB\tcontrol\tposcon_diverse\n"
             "BRD-K90747162-001-01-4\tCMYHZFCJPORPHY-UHFFFAOYSA-N\tKG-5\t53328059\tFLT3\tcontrol\tposcon_cp\n")


def _pixels(name: str, shape=(24, 32)) -> np.ndarray:
    seed = int.from_bytes(name.encode()[-8:], "little") % (2 ** 32)
    return np.random.default_rng(seed).integers(0, 5000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def cpg(tmp_path_factory) -> dict:
    """A load_data.csv built from the real CPJUMP1 plane table (2 sites of 4 wells), TIFFs at the
    real file names, plus the real platemap/compound metadata."""
    import pyarrow.parquet as pq
    from jump_image_datasets.jump_pilot.image_metadata import get_metadata_path

    planes = pq.read_table(
        get_metadata_path(),
        columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_ChannelURLName", "Metadata_Filename",
                 "Metadata_FileUrl"],
        filters=[("Metadata_Plate", "=", PLATE), ("Metadata_Well", "in", WELLS), ("Metadata_Site", "<=", 2)],
    ).to_pandas()
    assert len(planes) == len(WELLS) * 2 * 8  # 8 planes per site: 5 stains + 3 brightfield
    root = tmp_path_factory.mktemp("cpg")
    # Mirror the real S3 folder layout below a local root.
    planes["PathName"] = [str(root / "images" / url.split("/images/", 1)[1].rsplit("/", 1)[0])
                          for url in planes["Metadata_FileUrl"]]
    for rec in planes.itertuples():
        Path(rec.PathName).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(Path(rec.PathName) / rec.Metadata_Filename, _pixels(rec.Metadata_Filename))
    planes["channel"] = planes["Metadata_ChannelURLName"].str.removeprefix("URL_")
    wide = planes.pivot_table(index=["Metadata_Plate", "Metadata_Well", "Metadata_Site"], columns="channel",
                              values=["Metadata_Filename", "PathName"], aggfunc="first")
    wide.columns = [f"{'FileName' if kind == 'Metadata_Filename' else 'PathName'}_{ch}" for kind, ch in wide.columns]
    load_data = root / "load_data.csv"
    wide.reset_index().to_csv(load_data, index=False)
    (root / "platemaps" / "platemap").mkdir(parents=True)
    (root / "platemaps" / "barcode_platemap.csv").write_text(BARCODE_PLATEMAP)
    (root / "platemaps" / "platemap" / "JUMP-Target-1_compound_platemap.txt").write_text(PLATEMAP)
    (root / "compounds.tsv").write_text(COMPOUNDS)
    return {"root": root, "load_data": load_data, "planes": planes}


def _cpg_plan(cpg, **kwargs):
    args = dict(channel_map=CPJUMP1_MAP, platemaps=cpg["root"] / "platemaps",
                compound_metadata=cpg["root"] / "compounds.tsv", cell_line="U2OS", batch="2020_11_04_CPJUMP1")
    return plan_cpg(cpg["load_data"], **(args | kwargs))


@pytest.mark.integration
def test_cpg_real_cpjump1_metadata_end_to_end_on_ray(cpg, tmp_path, ray_session):
    report = run_ingestion(_cpg_plan(cpg), str(tmp_path / "plates"), tmp_path / "m.parquet", progress=None)
    assert report.written == 8 and report.skipped == 0 and report.plates == [PLATE]
    df = read_manifest(tmp_path / "m.parquet")
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert len(df) == 8 and df["well"].tolist() == ["A01", "A01", "A02", "A02", "C09", "C09", "C13", "C13"]
    assert (df["field"].tolist() == [0, 1] * 4) and df["site"].tolist() == ["1", "2"] * 4
    assert df["channel_names"].iloc[0] == ["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"]
    by_well = df.drop_duplicates("well").set_index("well")
    assert by_well.loc["A01", "perturbation_id"] == "BRD-A86665761-001-01-1"
    assert by_well.loc["A01", "moa"] == "CACNB4" and not by_well.loc["A01", "is_control"]
    assert by_well.loc["A02", "perturbation_id"] == "DMSO" and by_well.loc["A02", "is_control"]
    assert by_well.loc["A02", "moa"] == "control"
    assert by_well.loc["C09", "target"] == "TUBB" and not by_well.loc["C09", "is_control"]  # positive control
    assert (df["cell_line"] == "U2OS").all() and (df["batch"] == "2020_11_04_CPJUMP1").all()
    check_manifest_against_plates(df)

    planes = cpg["planes"].set_index(["Metadata_Well", "Metadata_Site", "channel"])
    row = df.iloc[5]  # C09, site 2
    assert [Path(u).name for u in row.original_uris] == [
        planes.loc[("C09", 2, ch), "Metadata_Filename"] for ch in ("OrigDNA", "OrigER", "OrigRNA", "OrigAGP",
                                                                   "OrigMito", "OrigBrightfield")]
    image, names = read_field(row.store_uri, row.row, row.col, row.field)
    expected = np.stack([_pixels(Path(u).name) for u in row.original_uris])
    np.testing.assert_array_equal(image, expected)
    hcs = HCS.from_zarr(zarr.open_group(row.store_uri, mode="r"))
    assert hcs.n_wells == 4
    assert plate_problems(row.store_uri) == []


def test_cpg_unknown_channel_and_missing_file_are_named(cpg, tmp_path):
    with pytest.raises(IngestError) as err:
        plan_cpg(cpg["load_data"])  # default map lacks the CPJUMP1 brightfield channels
    for part in (PLATE, "well A01", "site 1", "'OrigBrightfield'", ".tiff", "channel mapping"):
        assert part in str(err.value)
    table = pd.read_csv(cpg["load_data"])
    table.loc[3, "FileName_OrigMito"] = "r99c99f99p01-ch4sk1fk1fl1.tiff"
    broken = tmp_path / "load_data.csv"
    table.to_csv(broken, index=False)
    with pytest.raises(IngestError) as err:
        plan_cpg(broken, channel_map=CPJUMP1_MAP)
    message = str(err.value)
    assert "1 input file(s) missing" in message and "r99c99f99p01-ch4sk1fk1fl1.tiff" in message
    assert f"plate '{PLATE}', well {table.loc[3, 'Metadata_Well'][0]}" in message


def _chammi(root: Path, widths=(16, 16, 16)) -> Path:
    """A CHAMMI-CP-like folder: enriched_meta.csv + 5-channel uint16 PNG strips."""
    sub = root / "CP"
    sub.mkdir(parents=True)
    records = []
    for i, (plate, well, label) in enumerate([("BR1", "A01", "control"), ("BR1", "A01", "control"),
                                              ("BR1", "B02", "trt-x"), ("BR1", "B02", "trt-x"),
                                              ("BR2", "A01", "trt-y"), ("BR2", "A01", "trt-y")]):
        width = widths[i // 2]
        strip = _pixels(f"chammi{i:08d}", (width, width * 5))
        path = f"CP/{plate}/{well}_{i}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(root / path)
        records.append({"Key": f"k{i}", "file_path": path, "channel_width": width, "Label": label,
                        "train_test_split": "Train" if i < 4 else "Task_one", "Plate": plate, "Well": well,
                        "cell_type": "U2OS"})
    pd.DataFrame(records).to_csv(sub / "enriched_meta.csv", index=False)
    return sub


@pytest.mark.integration
def test_chammi_strips_end_to_end_on_ray(tmp_path, ray_session):
    sub = _chammi(tmp_path / "CHAMMI")
    plan = plan_chammi(sub)
    run_ingestion(plan, str(tmp_path / "plates"), tmp_path / "m.parquet", progress=None)
    df = read_manifest(tmp_path / "m.parquet")
    assert sorted(df["plate"].unique()) == ["BR1", "BR2"] and len(df) == 6
    assert df["channel_names"].iloc[0] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert df.groupby(["plate", "well"])["field"].apply(list).tolist() == [[0, 1], [0, 1], [0, 1]]
    assert df["moa"].tolist() == ["control", "control", "trt-x", "trt-x", "trt-y", "trt-y"]
    assert df["train_test_split"].tolist()[-1] == "Task_one" and (df["cell_line"] == "U2OS").all()
    row = df.iloc[3]
    strip = np.asarray(Image.open(row.original_uris[0]))
    image, _ = read_field(row.store_uri, row.row, row.col, row.field)
    np.testing.assert_array_equal(image, np.stack(np.split(strip, 5, axis=1)))  # channel k = columns k*W..(k+1)*W
    # Matches CHAMMI's own fold_channels (reshape (H, W, C) in Fortran order).
    folded = np.reshape(strip, (strip.shape[0], 16, -1), order="F")
    np.testing.assert_array_equal(image, np.moveaxis(folded, -1, 0))


def test_chammi_inconsistent_crop_size_names_the_file(tmp_path):
    sub = _chammi(tmp_path / "CHAMMI", widths=(16, 20, 16))
    with pytest.raises(IngestError) as err:
        run_ingestion(plan_chammi(sub), str(tmp_path / "plates"), tmp_path / "m.parquet", use_ray=False,
                      progress=None)
    assert "well B02" in str(err.value) and "B02_2.png" in str(err.value) and "(16, 16)" in str(err.value)


GENERIC_REGEX = r"(?P<plate>[^/]+)/(?P<row>[A-H])(?P<col>\d{2})_s(?P<site>\d+)_w(?P<channel>\d)\.tif"
GENERIC_MAP = {"1": "DNA", "2": "Tubulin", "3": "Actin"}


def _generic(root: Path, plates=("PL1", "PL2"), wells=("A01", "A02", "B05"), sites=(1, 2, 3), shape=(20, 28)):
    for plate in plates:
        for well in wells:
            for site in sites:
                for w in GENERIC_MAP:
                    path = root / plate / f"{well}_s{site}_w{w}.tif"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(path, _pixels(f"{plate}{well}{site}{w}", shape))
    wells_table = pd.DataFrame({"plate": ["PL1"] * 3 + ["PL2"] * 3, "well": list(wells) * 2,
                                "perturbation_id": ["DMSO", "cmpA", "cmpB"] * 2, "moa": ["control", "mA", "mB"] * 2,
                                "is_control": ["true", "false", "false"] * 2, "dose": ["0", "1.5", "3"] * 2})
    wells_table.to_csv(root / "wells.csv", index=False)
    return root


@pytest.mark.integration
def test_generic_layout_end_to_end_on_ray(tmp_path, ray_session):
    root = _generic(tmp_path / "raw")
    plan = plan_generic(f"{root}/*/*.tif", GENERIC_REGEX, GENERIC_MAP, well_metadata=root / "wells.csv")
    report = run_ingestion(plan, str(tmp_path / "plates"), tmp_path / "m.parquet", fields_per_task=2, progress=None)
    assert report.written == 18
    df = read_manifest(tmp_path / "m.parquet")
    assert len(df) == 18 and df["channel_names"].iloc[0] == ["DNA", "Tubulin", "Actin"]
    b05 = df[(df["plate"] == "PL2") & (df["well"] == "B05")]
    assert b05["perturbation_id"].unique().tolist() == ["cmpB"] and b05["dose"].unique().tolist() == [3.0]
    assert df[df["well"] == "A01"]["is_control"].all() and not df[df["well"] != "A01"]["is_control"].any()
    row = b05.iloc[2]
    image, _ = read_field(row.store_uri, row.row, row.col, row.field)
    np.testing.assert_array_equal(image[1], _pixels("PL2B053" + "2", (20, 28)))


def test_generic_inconsistent_channels_and_unknown_channel(tmp_path):
    root = _generic(tmp_path / "raw", plates=("PL1",))
    (root / "PL1" / "A02_s2_w3.tif").unlink()
    with pytest.raises(IngestError) as err:
        plan_generic(f"{root}/*/*.tif", GENERIC_REGEX, GENERIC_MAP)
    for part in ("plate 'PL1'", "well A02", "site 2", "inconsistent channel set", "missing ['Actin']"):
        assert part in str(err.value)
    with pytest.raises(IngestError, match=r"well A01, site 1, file .*A01_s1_w3.tif: channel '3' is not in the channel"):
        plan_generic(f"{root}/*/*.tif", GENERIC_REGEX, {"1": "DNA", "2": "Tubulin"})
    with pytest.raises(IngestError, match="named groups"):
        plan_generic(f"{root}/*/*.tif", r"(?P<plate>\w+)", GENERIC_MAP)


def test_unreadable_first_image_and_unwritable_manifest_end_with_one_clear_error(tmp_path, capsys):
    """`cellfm ingest` on a plate whose first image is not a TIFF names the file, plate, well and site;
    a manifest path it cannot write is named too; both exit with code 2 and no traceback."""
    from cellfm.cli import main

    root = _generic(tmp_path / "raw", plates=("PL1",))
    first = root / "PL1" / "A01_s1_w1.tif"
    first.write_bytes(b"not a tiff at all")
    args = ["ingest", "--layout", "generic", "--glob", f"{root}/*/*.tif", "--regex", GENERIC_REGEX,
            "--channel-map", json.dumps(GENERIC_MAP), "--out", str(tmp_path / "plates"), "--no-ray"]
    assert main([*args, "--manifest", str(tmp_path / "m.parquet")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: plate 'PL1', well A01, site 1, channel DNA, file ") and str(first) in line
    assert "cannot read the plate's first image" in line

    _generic(tmp_path / "raw", plates=("PL1",))  # a readable screen again
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the manifest's folder should be")
    assert main([*args, "--manifest", str(blocked / "m.parquet")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: manifest '{blocked / 'm.parquet'}': cannot write:")


@pytest.mark.parametrize("well, expected", [("B03", ("B", "03")), ("b3", ("B", "03")), ("r02c11", ("B", "11")),
                                            ("AA24", ("AA", "24"))])
def test_split_well(well, expected):
    assert split_well(well) == expected


def _all_fields(manifest: Path) -> dict:
    df = read_manifest(manifest)
    return {(r.plate, r.well, r.field): read_field(r.store_uri, r.row, r.col, r.field)[0] for r in df.itertuples()}


@pytest.mark.integration
def test_rerun_after_sigkill_completes_every_field_exactly_once(tmp_path):
    """jobs/ingest.py is SIGKILLed mid-run (driver and its Ray processes); the rerun skips the
    verified fields, writes the rest, and ends identical to a clean run."""
    root = _generic(tmp_path / "raw")
    args = [sys.executable, str(REPO / "jobs" / "ingest.py"), "--layout", "generic", "--glob", f"{root}/*/*.tif",
            "--regex", GENERIC_REGEX, "--channel-map", json.dumps(GENERIC_MAP),
            "--well-metadata", str(root / "wells.csv"), "--fields-per-task", "1"]
    out, manifest = tmp_path / "plates", tmp_path / "m.parquet"
    env = os.environ | {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.Popen([*args, "--out", str(out), "--manifest", str(manifest), "--field-delay", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    state = out / "_ingest_state"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*/*_*.json"))) < 4:
        time.sleep(0.1)
    session = ray_session_dir_of_group(proc.pid)
    assert session, "the ingest job's Ray session was not found"
    os.killpg(proc.pid, signal.SIGKILL)  # the process group started above: driver + its Ray processes
    proc.wait(timeout=30)
    killed_with = len(list(state.glob("*/*_*.json")))
    # Ray worker processes outside the group may still finish the field they hold, then die.
    wait_until(lambda: not session_processes(session), 60, "the killed ingest's Ray processes to exit")
    written_before = len(list(state.glob("*/*_*.json")))
    assert written_before - killed_with <= 4  # at most one field per in-flight task
    assert 4 <= written_before < 18, f"kill came too late or too early ({written_before} fields)"
    assert not manifest.exists()  # written last: an interrupted run leaves no manifest

    rerun = subprocess.run([*args, "--out", str(out), "--manifest", str(manifest)], capture_output=True, text=True,
                           timeout=180, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = int(re.search(r"(\d+) already written and verified", rerun.stdout).group(1))
    assert skipped == written_before, rerun.stdout
    plan = plan_generic(f"{root}/*/*.tif", GENERIC_REGEX, GENERIC_MAP, well_metadata=root / "wells.csv")
    run_ingestion(plan, str(tmp_path / "clean"), tmp_path / "clean.parquet", use_ray=False, progress=None)

    resumed, reference = _all_fields(manifest), _all_fields(tmp_path / "clean.parquet")
    assert len(resumed) == 18 and resumed.keys() == reference.keys()  # every field exactly once
    for key, image in reference.items():
        np.testing.assert_array_equal(resumed[key], image)
    assert len(list(state.glob("*/*_*.json"))) == 18
    a, b = read_manifest(manifest), read_manifest(tmp_path / "clean.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["store_uri"]), b.drop(columns=["store_uri"]))
    for plate in ("PL1", "PL2"):
        assert plate_problems(str(out / f"{plate}.zarr")) == []

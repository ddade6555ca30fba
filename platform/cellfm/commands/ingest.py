"""`cellfm ingest`: a screen (CPG load_data.csv + TIFFs, CHAMMI strips, or a generic glob + regex) to
OME-Zarr plates + a Parquet manifest, in parallel on Ray (a rerun resumes an interrupted run); or
existing OME-Zarr plates registered in place (`--layout ome-zarr`: a manifest only, a rerun on unchanged
plates writes nothing)."""

from __future__ import annotations

import argparse
import glob as globbing

DESCRIPTION = ("Convert a screen (CPG load_data.csv, CHAMMI strips, glob + regex) to OME-Zarr plates + a manifest, "
               "or register existing OME-Zarr plates in place.")
EXAMPLES = r"""examples:
  cellfm ingest --layout cpg --load-data load_data.csv --platemaps metadata/platemaps/BATCH \
      --compound-metadata compounds.tsv \
      --channel-map '{"OrigDNA":"DNA","OrigER":"ER","OrigRNA":"RNA","OrigAGP":"AGP","OrigMito":"Mito","OrigBrightfield":null}' \
      --out s3://bucket/plates --manifest s3://bucket/m.parquet [--endpoint-url http://host:9000] [--image-root DIR]
  cellfm ingest --layout chammi --chammi-root CHAMMI/CP --out plates/ --manifest chammi.parquet
  cellfm ingest --layout generic --glob 'raw/*/*.tif' \
      --regex '(?P<plate>[^/]+)/(?P<well>[A-P]\d\d)_s(?P<site>\d+)_(?P<channel>\w+)\.tif' \
      --channel-map '{"w1":"DNA","w2":"Tubulin"}' --out plates/ --manifest m.parquet
  cellfm ingest --layout ome-zarr --plates screen/P1.zarr screen/P2.zarr --platemap platemap.csv \
      --manifest screen.parquet [--channel-map '{"Hoechst":"DNA"}'] [--column-map '{"Barcode":"plate"}']
  cellfm ingest --layout ome-zarr --plates s3://public-bucket/plate.ome.zarr --manifest m.parquet \
      --endpoint-url https://host --storage-options '{"anon": true}'

Credentials for s3:// come from the AWS environment / config files (never from flags)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("--layout", required=True, choices=["cpg", "chammi", "generic", "ome-zarr"])
    parser.add_argument("--out", default=None,
                        help="plate store root: local folder or s3://bucket/prefix (not for --layout ome-zarr)")
    parser.add_argument("--manifest", required=True, help="manifest path (.parquet; local or s3://)")
    parser.add_argument("--source", default=None, help="source name recorded in the manifest (default: the layout)")
    parser.add_argument("--channel-map", default=None,
                        help="JSON object: input channel -> stain name (null: skip); ome-zarr: omero label or "
                             "channel index -> name")
    parser.add_argument("--cell-line", default="")
    parser.add_argument("--batch", default="")
    parser.add_argument("--well-metadata", default=None,
                        help="CSV/TSV with well (and optional plate) + perturbation columns")
    cpg = parser.add_argument_group("--layout cpg")
    cpg.add_argument("--load-data", nargs="+", help="load_data.csv file(s)")
    cpg.add_argument("--image-root", default=None, help="folder holding the FileName_* files (overrides PathName_*)")
    cpg.add_argument("--platemaps", default=None, help="folder with barcode_platemap.csv and platemap/")
    cpg.add_argument("--compound-metadata", default=None, help="compound table keyed by broad_sample")
    chammi = parser.add_argument_group("--layout chammi")
    chammi.add_argument("--chammi-root", default=None, help="sub-dataset folder holding enriched_meta.csv")
    chammi.add_argument("--chammi-subset", default=None, help="CP, HPA or Allen (default: folder name)")
    chammi.add_argument("--channels", nargs="+", default=None, help="channel names in strip order")
    chammi.add_argument("--plate-column", default="Plate")
    chammi.add_argument("--well-column", default="Well")
    generic = parser.add_argument_group("--layout generic")
    generic.add_argument("--glob", default=None, help="file glob (local or s3://)")
    generic.add_argument("--regex", default=None,
                         help="regex with named groups plate, well (or row, col), site, channel")
    ome = parser.add_argument_group("--layout ome-zarr (register existing plates in place; nothing copied)")
    ome.add_argument("--plates", nargs="+", help="OME-Zarr 0.4/0.5 HCS plates (local or s3://)")
    ome.add_argument("--platemap", default=None,
                     help="CSV/TSV/Parquet joined on plate + well (Metadata_Plate/Metadata_Well accepted; "
                          "no plate column: one layout for every plate)")
    ome.add_argument("--column-map", default=None, help="JSON object: platemap column -> manifest name "
                                                        "(e.g. {\"Barcode\": \"plate\", \"Pos\": \"well\"})")
    ome.add_argument("--acquisition", default=None,
                     help="register the fields of this acquisition id only (default: every acquisition, "
                          "each image its own field)")
    execution = parser.add_argument_group("execution")
    execution.add_argument("--no-ray", action="store_true", help="write in this process (debugging)")
    execution.add_argument("--fields-per-task", type=_positive_int, default=4, help="fields written per Ray task")
    execution.add_argument("--no-verify", action="store_true", help="trust completion markers without re-reading fields")
    execution.add_argument("--field-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow writes
    execution.add_argument("--storage-options", default=None,
                           help="JSON fsspec options (e.g. endpoint_url); credentials come from the AWS environment")
    execution.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint URL")


def run(args: argparse.Namespace) -> int:
    from cellfm.config import ConfigError
    from cellfm.data.ingest.chammi import plan_chammi
    from cellfm.data.ingest.cpg import plan_cpg
    from cellfm.data.ingest.generic import plan_generic
    from cellfm.data.ingest.writer import run_ingestion
    from cellfm.storage import json_object, storage_options_from_cli
    from cellfm.paths import check_paths

    needed = {"cpg": ("--load-data", args.load_data), "chammi": ("--chammi-root", args.chammi_root),
              "generic": ("--glob and --regex", args.glob and args.regex),
              "ome-zarr": ("--plates", args.plates)}[args.layout]
    if not needed[1]:
        raise ConfigError(f"--layout {args.layout} needs {needed[0]}")
    if args.layout == "ome-zarr":
        return _register(args)
    if not args.out:
        raise ConfigError(f"--layout {args.layout} needs --out")
    inputs = {f"--load-data[{i}]": p for i, p in enumerate(args.load_data or [])}
    inputs.update({"--image-root": args.image_root, "--platemaps": args.platemaps, "--well-metadata": args.well_metadata,
                   "--compound-metadata": args.compound_metadata, "--chammi-root": args.chammi_root,
                   "--glob": _glob_root(args.glob) if args.glob else None})
    check_paths(inputs, {"--out": args.out, "--manifest": args.manifest})
    options = storage_options_from_cli(args.storage_options, args.endpoint_url) or None
    channel_map = json_object(args.channel_map, "--channel-map")
    source = args.source or args.layout
    if args.layout == "cpg":
        plan = plan_cpg(args.load_data, channel_map, args.image_root, args.platemaps, args.compound_metadata,
                        args.well_metadata, source, args.cell_line, args.batch, options)
    elif args.layout == "chammi":
        plan = plan_chammi(args.chammi_root, subset=args.chammi_subset, channel_names=args.channels,
                           plate_column=args.plate_column, well_column=args.well_column, source=source,
                           storage_options=options)
    else:
        plan = plan_generic(args.glob, args.regex, channel_map, args.well_metadata, source, args.cell_line,
                            args.batch, storage_options=options)
    run_ingestion(plan, args.out, args.manifest, options, use_ray=not args.no_ray,
                  fields_per_task=args.fields_per_task, verify=not args.no_verify, field_delay_s=args.field_delay,
                  progress=lambda msg: print(msg, flush=True))
    return 0


def _register(args: argparse.Namespace) -> int:
    """--layout ome-zarr: the manifest of existing plates, written unless it is already up to date."""
    from cellfm.data.ingest.ome_zarr import plan_ome_zarr, register_ome_zarr
    from cellfm.storage import json_object, storage_options_from_cli
    from cellfm.paths import check_paths

    check_paths({"--platemap": args.platemap, **{f"--plates[{i}]": p for i, p in enumerate(args.plates)}},
                {"--manifest": args.manifest})
    options = storage_options_from_cli(args.storage_options, args.endpoint_url) or None
    df = plan_ome_zarr(args.plates, args.platemap, json_object(args.channel_map, "--channel-map"),
                       json_object(args.column_map, "--column-map"), args.acquisition, args.source or "ome-zarr",
                       args.cell_line, args.batch, options)
    register_ome_zarr(df, args.manifest, options, progress=lambda msg: print(msg, flush=True))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from (what must exist for it to match anything)."""
    head = pattern
    while globbing.has_magic(head):
        head = head.rsplit("/", 1)[0] if "/" in head else "."
    return head

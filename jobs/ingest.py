"""Convert a screen (CPG load_data.csv + TIFFs, CHAMMI strips, or a generic glob + regex) into
OME-Zarr plates + a Parquet manifest, in parallel on Ray; a rerun resumes an interrupted run.

    python jobs/ingest.py --layout cpg --load-data load_data.csv [--image-root DIR] \\
        [--platemaps metadata/platemaps/BATCH] [--compound-metadata compounds.tsv] \\
        [--channel-map '{"OrigDNA": "DNA", ..., "OrigBrightfield": null}'] --out plates/ --manifest m.parquet
    python jobs/ingest.py --layout chammi --chammi-root CHAMMI/CP --out s3://bucket/chammi --manifest chammi.parquet
    python jobs/ingest.py --layout generic --glob 'raw/**/*.tif' \\
        --regex '(?P<plate>[^/]+)/(?P<well>[A-P]\\d{2})_s(?P<site>\\d+)_(?P<channel>\\w+)\\.tif' --out plates --manifest m.parquet
"""

from __future__ import annotations

import argparse
import json
import sys

from cellfm.data.ingest import IngestError, plan_chammi, plan_cpg, plan_generic, run_ingestion
from cellfm.data.plate import PlateError
from cellfm.data.stores import storage_options_from_cli


def _json_map(text: str | None, flag: str):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag} is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag} must be a JSON object")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", required=True, choices=["cpg", "chammi", "generic"])
    p.add_argument("--out", required=True, help="plate store root: local folder or s3://bucket/prefix")
    p.add_argument("--manifest", required=True, help="manifest path (.parquet; local or s3://)")
    p.add_argument("--source", default=None, help="source name recorded in the manifest (default: the layout)")
    p.add_argument("--channel-map", default=None, help="JSON object: input channel -> stain name (null: skip)")
    p.add_argument("--cell-line", default="")
    p.add_argument("--batch", default="")
    p.add_argument("--well-metadata", default=None, help="CSV/TSV with well (and optional plate) + perturbation columns")
    # cpg
    p.add_argument("--load-data", nargs="+", help="cpg: load_data.csv file(s)")
    p.add_argument("--image-root", default=None, help="cpg: folder holding the FileName_* files (overrides PathName_*)")
    p.add_argument("--platemaps", default=None, help="cpg: folder with barcode_platemap.csv and platemap/")
    p.add_argument("--compound-metadata", default=None, help="cpg: compound table keyed by broad_sample")
    # chammi
    p.add_argument("--chammi-root", default=None, help="chammi: sub-dataset folder holding enriched_meta.csv")
    p.add_argument("--chammi-subset", default=None, help="chammi: CP, HPA or Allen (default: folder name)")
    p.add_argument("--channels", nargs="+", default=None, help="chammi: channel names in strip order")
    p.add_argument("--plate-column", default="Plate")
    p.add_argument("--well-column", default="Well")
    # generic
    p.add_argument("--glob", default=None, help="generic: file glob (local or s3://)")
    p.add_argument("--regex", default=None, help="generic: regex with groups plate, well (or row, col), site, channel")
    # execution
    p.add_argument("--no-ray", action="store_true", help="write in this process (debugging)")
    p.add_argument("--fields-per-task", type=int, default=4)
    p.add_argument("--no-verify", action="store_true", help="trust completion markers without re-reading fields")
    p.add_argument("--field-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow writes to interrupt
    p.add_argument("--storage-options", default=None, help="JSON fsspec options (e.g. endpoint_url); "
                   "credentials come from the AWS environment/config")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint URL")
    args = p.parse_args(argv)
    options = storage_options_from_cli(args.storage_options, args.endpoint_url) or None
    channel_map = _json_map(args.channel_map, "--channel-map")
    source = args.source or args.layout
    try:
        if args.layout == "cpg":
            if not args.load_data:
                p.error("--layout cpg needs --load-data")
            plan = plan_cpg(args.load_data, channel_map, args.image_root, args.platemaps, args.compound_metadata,
                            args.well_metadata, source, args.cell_line, args.batch, options)
        elif args.layout == "chammi":
            if not args.chammi_root:
                p.error("--layout chammi needs --chammi-root")
            plan = plan_chammi(args.chammi_root, subset=args.chammi_subset, channel_names=args.channels,
                               plate_column=args.plate_column, well_column=args.well_column, source=source,
                               storage_options=options)
        else:
            if not (args.glob and args.regex):
                p.error("--layout generic needs --glob and --regex")
            plan = plan_generic(args.glob, args.regex, channel_map, args.well_metadata, source, args.cell_line,
                                args.batch, storage_options=options)
        run_ingestion(plan, args.out, args.manifest, options, use_ray=not args.no_ray,
                      fields_per_task=args.fields_per_task, verify=not args.no_verify, field_delay_s=args.field_delay,
                      progress=lambda msg: print(msg, flush=True))
    except (IngestError, PlateError) as exc:
        print(f"[ingest] ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

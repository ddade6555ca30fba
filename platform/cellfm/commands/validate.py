"""`cellfm validate`: report every problem of a plate store, a manifest, or a folder of them."""

from __future__ import annotations

import argparse

DESCRIPTION = "Report every problem in a plate (.zarr), a manifest (.parquet) or a folder of them (exit 1 if any)."
EXAMPLES = """examples:
  cellfm validate demo_output/screen/train.parquet
  cellfm validate s3://bucket/screens/P1.zarr --endpoint-url http://127.0.0.1:9000
  cellfm validate demo_output/screen --shallow        # metadata only, no pixel decoding"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("target", help="plate (.zarr), manifest (.parquet), or a local folder holding them")
    parser.add_argument("--shallow", action="store_true", help="check metadata only (do not decode every chunk)")
    parser.add_argument("--storage-options", default=None,
                        help="JSON fsspec options for remote stores, e.g. '{\"endpoint_url\": \"http://...\"}' "
                             "(credentials: the AWS environment / config files)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (shortcut for storage options)")


def run(args: argparse.Namespace) -> int:
    from cellfm.storage import storage_options_from_cli
    from cellfm.data.validate import validate_target
    from cellfm.paths import check_paths

    check_paths({"target": args.target})
    options = storage_options_from_cli(args.storage_options, args.endpoint_url)
    checked, problems = validate_target(args.target, options, deep=not args.shallow)
    for item in checked:
        print(f"[validate] checked {item}")
    for problem in problems:
        print(f"[validate] PROBLEM {problem}")
    print(f"[validate] {len(problems)} problem(s) in {len(checked)} item(s)")
    return 1 if problems else 0

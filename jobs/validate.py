"""Report EVERY problem in a plate store, a manifest, or a folder of them (exit code 1 if any).

    python jobs/validate.py demo_output/screen/train.parquet
    python jobs/validate.py s3://bucket/screens/P1.zarr --endpoint-url http://127.0.0.1:9000
    python jobs/validate.py demo_output/screen --shallow        # metadata only, no pixel decoding
"""

from __future__ import annotations

import argparse
import sys

from cellfm.data.stores import storage_options_from_cli
from cellfm.data.validate import validate_target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="plate (.zarr), manifest (.parquet), or a local folder holding them")
    p.add_argument("--shallow", action="store_true", help="check metadata only (do not decode every chunk)")
    p.add_argument("--storage-options", default=None,
                   help="JSON fsspec options for remote stores, e.g. '{\"endpoint_url\": \"http://...\"}' "
                        "(credentials: prefer the AWS environment / config files)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (shortcut for storage options)")
    args = p.parse_args(argv)
    options = storage_options_from_cli(args.storage_options, args.endpoint_url)
    checked, problems = validate_target(args.target, options, deep=not args.shallow)
    for item in checked:
        print(f"[validate] checked {item}")
    for problem in problems:
        print(f"[validate] PROBLEM {problem}")
    print(f"[validate] {len(problems)} problem(s) in {len(checked)} item(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

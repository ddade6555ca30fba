"""`cellfm refresh`: bring the feature store up to date with features.manifests and features.checkpoint,
embedding only plates the store lacks for that checkpoint (the scheduled job: cron, a KubeRay RayJob)."""

from __future__ import annotations

import argparse
import json

from cellfm.cli import add_config_arguments, config_from_args

DESCRIPTION = ("Embed every plate of features.manifests that the feature store lacks for features.checkpoint "
               "(scheduled; with nothing new it says so in seconds without starting Ray).")
EXAMPLES = """examples:
  cellfm refresh --config configs/demo.yaml                        # latest checkpoint of train.run_name
  cellfm refresh --config configs/demo.yaml --dry-run              # what would be embedded; starts nothing
  cellfm refresh --config configs/demo.yaml --store s3://bucket/features data.storage_options.endpoint_url=http://...
  ray job submit --working-dir . -- python jobs/refresh.py --config configs/demo.yaml"""
# The common flags that matter here: where "latest" looks, and which Ray cluster to use.
FLAGS = ("--storage-path", "--run-name", "--address")


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    """Config arguments plus the flags `embed` and `refresh` share."""
    add_config_arguments(parser, flags=FLAGS)
    parser.add_argument("--store", default=None, help="sets features.store: a local folder or s3://bucket/prefix")
    parser.add_argument("--checkpoint", default=None,
                        help="sets features.checkpoint: a checkpoint folder, an s3:// URI, or 'latest' (the newest "
                             "checkpoint of train.storage_path/train.run_name)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be embedded, then stop (starts no Ray)")


def feature_config(args: argparse.Namespace):
    """The config with --store/--checkpoint applied as features.* overrides (JSON-quoted, so any path is
    taken as a string)."""
    for flag, key in (("store", "features.store"), ("checkpoint", "features.checkpoint")):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"{key}={json.dumps(value)}")
    return config_from_args(args)


def run_features(args: argparse.Namespace, manifests: dict[str, str] | None = None) -> int:
    """Plan (everything validated before Ray starts), then embed what is missing; prints progress and
    where the features are."""
    from cellfm.features.refresh import refresh

    cfg = feature_config(args)
    summary = refresh(cfg, manifests, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"[cellfm] read them: cellfm.features.store.read_features({summary.store!r}, {summary.key!r}, "
              f"level='well' | 'field')", flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_feature_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_features(args)

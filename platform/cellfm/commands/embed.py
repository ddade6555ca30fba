"""`cellfm embed`: embed the plates of given manifests (default features.manifests) with a checkpoint into
the feature store, skipping plates it already holds for that checkpoint."""

from __future__ import annotations

import argparse

from cellfm.commands.refresh import add_feature_arguments, run_features

DESCRIPTION = ("Embed the plates of manifests with a checkpoint into the feature store: per-field embeddings, "
               "per-well aggregates, optional per-plate normalization (plates already stored are skipped).")
EXAMPLES = """examples:
  cellfm embed --config configs/demo.yaml --manifest demo_output/screen/heldout.parquet
  cellfm embed --config configs/demo.yaml --manifest plates_a.parquet --manifest plates_b.parquet \\
      --checkpoint demo_output/runs/cellrep-demo/checkpoint_epoch0011 --store s3://bucket/features
  cellfm embed --config configs/demo.yaml features.normalization=robust_mad features.actors=2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_feature_arguments(parser)
    parser.add_argument("--manifest", action="append", default=None, metavar="PATH",
                        help="manifest (local or s3://) whose plates to embed; repeatable (default: features.manifests)")


def run(args: argparse.Namespace) -> int:
    return run_features(args, {path: path for path in args.manifest} if args.manifest else None)

"""`cellfm evaluate`: checkpoints side by side, with a random-init encoder and intensity statistics as
baselines, on held-out plates (every protocol of docs/evaluation.md)."""

from __future__ import annotations

import argparse

from cellfm.cli import add_config_arguments, checked_config, config_from_args

DESCRIPTION = "Evaluate checkpoints side by side (vs a random-init encoder and intensity statistics) on held-out plates."
EXAMPLES = """examples:
  cellfm evaluate --config configs/demo.yaml                      # latest checkpoint of train.run_name
  cellfm evaluate --config configs/demo.yaml --checkpoint demo_output/runs/cellrep-demo/checkpoint_epoch0011
  cellfm evaluate --config configs/demo.yaml --checkpoint cellrep=RUN1/checkpoint_epoch0011 --checkpoint vit_rgb=RUN2/checkpoint_epoch0011
  cellfm evaluate --config runs/my-run/config.yaml 'eval.manifests={plate9: /shared/screens/plate9.parquet}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]PATH",
                        help="checkpoint folder or s3:// URI (default: the latest of the configured run); repeat "
                             "as NAME=PATH to compare several models in one report")


def run(args: argparse.Namespace) -> int:
    from cellfm.preflight import PreflightError, path_problem
    from cellfm.train.checkpoint import latest_checkpoint
    from cellfm.train.trainer import run_directory

    cfg = config_from_args(args, check_rules=False)
    from cellfm.evaluate.run import checkpoints_from_args

    if args.checkpoint is None:
        problem = path_problem("train.storage_path", cfg.train.storage_path)
        if problem:
            raise PreflightError(problem)
        checkpoints = {"trained": str(latest_checkpoint(run_directory(cfg), cfg.data.storage_options or None))}
    else:
        checkpoints = checkpoints_from_args(args.checkpoint)
    for checkpoint in checkpoints.values():
        checked_config(args, cfg, evaluate=True, checkpoint=str(checkpoint))

    from cellfm.evaluate.report import summary_lines
    from cellfm.evaluate.run import run_evaluation

    report, paths = run_evaluation(cfg, checkpoints)
    print("\n".join(summary_lines(report)))
    print(f"[cellfm] report: {paths['markdown']} (+ {paths['json'].name} and {len(paths) - 2} PNG plots)")
    return 0

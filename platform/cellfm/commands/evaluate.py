"""`cellfm evaluate`: a checkpoint against a random-init encoder and intensity statistics on held-out plates."""

from __future__ import annotations

import argparse

from cellfm.cli import add_config_arguments, checked_config, config_from_args

DESCRIPTION = "Evaluate a checkpoint (vs a random-init encoder and intensity statistics) on held-out plates."
EXAMPLES = """examples:
  cellfm evaluate --config configs/demo.yaml                      # latest checkpoint of train.run_name
  cellfm evaluate --config configs/demo.yaml --checkpoint demo_output/runs/cellrep-demo/checkpoint_epoch0011
  cellfm evaluate --config runs/my-run/config.yaml 'eval.manifests={plate9: /shared/screens/plate9.parquet}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder or s3:// URI (default: the latest of the configured run)")


def run(args: argparse.Namespace) -> int:
    from cellfm.preflight import PreflightError, path_problem
    from cellfm.train.checkpoint import latest_checkpoint
    from cellfm.train.trainer import run_directory

    cfg = config_from_args(args, check_rules=False)
    checkpoint = args.checkpoint
    if checkpoint is None:
        problem = path_problem("train.storage_path", cfg.train.storage_path)
        if problem:
            raise PreflightError(problem)
        checkpoint = latest_checkpoint(run_directory(cfg), cfg.data.storage_options or None)
    checked_config(args, cfg, evaluate=True, checkpoint=str(checkpoint))

    from cellfm.evaluate.run import run_evaluation, summary_lines

    report, paths = run_evaluation(cfg, checkpoint)
    print("\n".join(summary_lines(report)))
    print(f"[cellfm] report: {paths['markdown']} (+ {paths['json'].name}, {paths['plot'].name})")
    return 0

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
  cellfm evaluate --config runs/my-run/config.yaml 'eval.manifests={plate9: /shared/screens/plate9.parquet}'
  cellfm evaluate --config configs/demo.yaml --from-store         # the features `cellfm refresh` stored (no embedding)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]PATH",
                        help="checkpoint folder or s3:// URI (default: the latest of the configured run); repeat "
                             "as NAME=PATH to compare several models in one report")
    parser.add_argument("--from-store", action="store_true",
                        help="sets eval.from_store=true: score the well features features.store holds for each "
                             "checkpoint (default features.checkpoint) instead of embedding; no baselines, no Ray")


def run(args: argparse.Namespace) -> int:
    from cellfm.evaluate.run import DEFAULT_MODEL_NAME, checkpoints_from_args
    from cellfm.features.identity import resolve_checkpoint
    from cellfm.config import PreflightError
    from cellfm.paths import path_problem

    if args.from_store:
        args.overrides.append("eval.from_store=true")
    cfg = config_from_args(args, check_rules=False)
    if args.checkpoint is not None:
        checkpoints = checkpoints_from_args(args.checkpoint)
    else:
        # From the store: the checkpoint `cellfm refresh` keeps it fresh with; else the run's newest.
        checkpoint = cfg.features.checkpoint if cfg.eval.from_store else "latest"
        problem = path_problem("train.storage_path", cfg.train.storage_path) if checkpoint == "latest" else None
        if problem:
            raise PreflightError(problem)
        checkpoints = {DEFAULT_MODEL_NAME: resolve_checkpoint(cfg, checkpoint)}
    for checkpoint in checkpoints.values():
        checked_config(args, cfg, evaluate=True, checkpoint=str(checkpoint))

    from cellfm.evaluate.report import summary_lines
    from cellfm.evaluate.run import run_evaluation

    report, paths = run_evaluation(cfg, checkpoints)
    print("\n".join(summary_lines(report)))
    print(f"[cellfm] report: {paths['markdown']} (+ {paths['json'].name} and {len(paths) - 2} PNG plots)")
    return 0

"""`cellfm pretrain`: self-supervised pre-training on Ray Train."""

from __future__ import annotations

import argparse

from cellfm.cli import add_config_arguments, preflighted

DESCRIPTION = "Pre-train an encoder (DINO / iBOT self-distillation) on Ray Train."
EXAMPLES = """examples:
  cellfm pretrain --config configs/demo.yaml                      # embedded local Ray
  cellfm pretrain --config configs/demo.yaml optim.epochs=20 model.pooling_ratio=2
  cellfm pretrain --config configs/cellrep_vits16.yaml --address auto --num-workers 8 --use-gpu

Without --address an embedded local Ray starts (an exported RAY_ADDRESS joins only with
ray.use_env_address=true; a `ray job submit` job joins its cluster). Relaunching with the same
--storage-path and --run-name resumes that run from its latest checkpoint."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg, manifests = preflighted(args, train=True)
    from cellfm.train.trainer import run_pretraining

    result = run_pretraining(cfg, manifest=manifests["data.train_manifest"])
    print(f"[cellfm] checkpoint: {result.checkpoint.path}")
    print(f"[cellfm] final metrics: {result.metrics}")
    return 0

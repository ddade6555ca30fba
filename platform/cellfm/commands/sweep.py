"""`cellfm sweep`: a Ray Tune hyperparameter sweep of pre-training, judged by a downstream objective."""

from __future__ import annotations

import argparse

from cellfm.cli import OVERRIDES_EPILOG

DESCRIPTION = "Sweep pre-training hyperparameters on Ray Tune (ASHA), judged by held-out well-level accuracy."
EXAMPLES = """examples:
  cellfm sweep --config configs/sweeps/smoke.yaml                 # embedded local Ray, ~6 minutes on 2 cores
  cellfm sweep --config configs/sweeps/paper_dimensions.yaml --name paper-seed0
  cellfm sweep --config configs/sweeps/paper_dimensions.yaml --address auto --gpus-per-worker 1 \\
      --cpus-per-worker 8 --storage s3://my-bucket/cellfm/sweeps data.train_manifest=s3://my-bucket/screens/train.parquet

The sweep file (docs/sweeps.md) names the base training config, the search space, the search algorithm,
ASHA, resources per trial and the objective. Running the same command again on the same --storage and
--name resumes the sweep: finished trials are kept, unfinished ones continue from their checkpoints.
Outputs in <storage>/<name>/: results.parquet + results.md (sorted by the objective), best.yaml
(`cellfm pretrain --config best.yaml`), best.json, objective_vs_dimensions.png, objective_vs_flops.png."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES + "\n\n" + OVERRIDES_EPILOG.replace("Any config key", "Any key of the base training config")
    parser.add_argument("--config", required=True, help="the sweep file (configs/sweeps/<name>.yaml)")
    parser.add_argument("--name", default=None, help="the sweep's name: its folder under the storage (default: the file's)")
    parser.add_argument("--storage", default=None, help="folder or s3://bucket/prefix holding sweeps (sets storage)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (sets ray.address; default: an embedded "
                                                        "local Ray, whatever RAY_ADDRESS says)")
    parser.add_argument("--max-concurrent-trials", type=int, default=None,
                        help="trials at once (sets search.max_concurrent_trials; 0 = as many as fit)")
    parser.add_argument("--num-samples", type=int, default=None, help="sets search.num_samples")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per trial (sets resources.num_workers)")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="sets resources.cpus_per_worker")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="sets resources.gpus_per_worker (> 0: trials train on GPUs)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the base training config, for every trial")


def plan_from_args(args: argparse.Namespace):
    """The `cellfm.tune.sweep_config.SweepPlan` of the parsed arguments (no rules checked yet)."""
    from cellfm.tune.sweep_config import load_sweep

    resources = {key: getattr(args, key) for key in ("num_workers", "cpus_per_worker", "gpus_per_worker")
                 if getattr(args, key) is not None}
    return load_sweep(args.config, overrides=args.overrides, name=args.name, storage=args.storage,
                      address=args.address, max_concurrent_trials=args.max_concurrent_trials,
                      num_samples=args.num_samples, resources=resources)


def run(args: argparse.Namespace) -> int:
    from cellfm.tune.preflight import check_sweep

    plan = plan_from_args(args)
    resources = check_sweep(plan)

    from cellfm.progress import format_duration
    from cellfm.tune.driver import run_sweep
    from cellfm.tune.results import markdown_table

    outcome = run_sweep(plan, resources)
    table = outcome.table
    columns = [c for c in ("rank", "trial", "arm", *plan.swept_keys(), plan.spec.objective.metric, "loss",
                           "gflops_per_image", "epochs", "status") if c in table.columns]
    print(markdown_table(table[columns]) if len(table) else "(no trials)")
    print(f"[cellfm] sweep {plan.spec.name} {'resumed and ' if outcome.restored else ''}finished in "
          f"{format_duration(outcome.seconds)}: {len(table)} trials")
    for name in ("results.md", "results.parquet", "best.yaml", "best.json", "objective_vs_dimensions.png",
                 "objective_vs_flops.png"):
        if name in outcome.outputs:
            print(f"[cellfm] {name}: {outcome.outputs[name]}")
    return 0

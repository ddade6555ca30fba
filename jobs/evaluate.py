"""Evaluate checkpoints side by side (with random-init and intensity-statistics baselines) on held-out plates.

    python jobs/evaluate.py --config configs/demo.yaml --checkpoint PATH
    python jobs/evaluate.py --config configs/demo.yaml            # latest checkpoint of train.run_name
    python jobs/evaluate.py --config configs/demo.yaml --checkpoint cellrep=PATH --checkpoint vit_rgb=PATH2
"""

from cellfm.cli import config_from_args, parser, run_main
from cellfm.evaluate.report import summary_lines
from cellfm.evaluate.run import checkpoints_from_args, run_evaluation
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.train.trainer import run_directory


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=None, metavar="[NAME=]PATH",
                   help="checkpoint directory or s3:// URI (default: latest of the configured run); repeat as "
                        "NAME=PATH to compare several models in one report")
    args = p.parse_args()
    cfg = config_from_args(args)
    checkpoints = checkpoints_from_args(args.checkpoint or [
        str(latest_checkpoint(run_directory(cfg), cfg.data.storage_options or None))])
    report, paths = run_evaluation(cfg, checkpoints)
    print("\n".join(summary_lines(report)))
    print(f"[cellfm] report: {paths['markdown']} (+ {paths['json'].name} and {len(paths) - 2} PNG plots)")


if __name__ == "__main__":
    run_main(main)

"""Evaluate a checkpoint (and a random-init encoder of the same architecture) on held-out plates.

    python jobs/evaluate.py --config configs/demo.yaml --checkpoint PATH
    python jobs/evaluate.py --config configs/demo.yaml            # latest checkpoint of train.run_name
"""

from cellfm.cli import config_from_args, parser, run_main
from cellfm.evaluate.run import run_evaluation, summary_lines
from cellfm.train.checkpoint import latest_checkpoint
from cellfm.train.trainer import run_directory


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint directory or s3:// URI (default: latest of the configured run)")
    args = p.parse_args()
    cfg = config_from_args(args)
    checkpoint = args.checkpoint or latest_checkpoint(run_directory(cfg), cfg.data.storage_options or None)
    report, paths = run_evaluation(cfg, checkpoint)
    print("\n".join(summary_lines(report)))
    print(f"[cellfm] report: {paths['markdown']} (+ {paths['json'].name}, {paths['plot'].name})")


if __name__ == "__main__":
    run_main(main)

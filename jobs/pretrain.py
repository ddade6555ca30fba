"""Pre-train an encoder with DINO self-distillation on Ray Train.

    python jobs/pretrain.py --config configs/demo.yaml [section.key=value ...]
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/demo.yaml

Without a cluster (no --address, no RAY_ADDRESS) an embedded local Ray is started.
Relaunching with the same --storage-path and --run-name resumes that run.
"""

from cellfm.cli import config_from_args, parser, run_main
from cellfm.train.trainer import run_pretraining


def main() -> None:
    cfg = config_from_args(parser(__doc__.splitlines()[0]).parse_args())
    result = run_pretraining(cfg)
    print(f"[cellfm] checkpoint: {result.checkpoint.path}")
    print(f"[cellfm] final metrics: {result.metrics}")


if __name__ == "__main__":
    run_main(main)

"""The whole platform on a laptop: generate the synthetic demo screen (if missing), pre-train
CellRep with DINO on 2 CPU workers, and evaluate trained vs random-init encoders on held-out
plates with the training channels and with an unseen channel configuration.

    python jobs/demo.py [--config configs/demo.yaml] [section.key=value ...]
"""

import time
from pathlib import Path

from cellfm.cli import config_from_args, parser, run_main
from cellfm.data.synthetic import generate_screen
from cellfm.evaluate.report import summary_lines
from cellfm.evaluate.run import run_evaluation
from cellfm.train.trainer import run_pretraining

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(config=str(DEFAULT_CONFIG))
    cfg = config_from_args(p.parse_args())
    t0 = time.perf_counter()
    manifests = generate_screen(Path(cfg.data.screen_dir).resolve(), layout=cfg.data.synthetic_layout,
                                seed=cfg.data.synthetic_seed)
    # The generated screen is the single source of truth for what is trained and evaluated on.
    cfg.data.train_manifest = str(manifests["train"])
    cfg.eval.manifests = {"seen": str(manifests["heldout"]), "unseen": str(manifests["unseen"])}
    print(f"[cellfm] screen ready in {time.perf_counter() - t0:.0f}s: {', '.join(str(m) for m in manifests.values())}")
    result = run_pretraining(cfg)
    print(f"[cellfm] pre-training done at {time.perf_counter() - t0:.0f}s; checkpoint {result.checkpoint.path}")
    report, paths = run_evaluation(cfg, result.checkpoint.path)
    print("\n[cellfm] held-out wells, trained encoder vs baselines (docs/evaluation.md):")
    print("\n".join(summary_lines(report)))
    print(f"\n[cellfm] report: {paths['markdown']}  (demo took {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    run_main(main)

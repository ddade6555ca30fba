"""`cellfm demo`: the whole platform on a laptop. Generate the synthetic demo screen (if missing),
pre-train CellRep with DINO on 2 CPU workers, and evaluate trained vs random-init encoders on held-out
plates with the training channels and with an unseen channel configuration."""

from __future__ import annotations

import argparse

from cellfm.cli import add_config_arguments, checked_config, config_from_args

DESCRIPTION = "Generate the synthetic demo screen, pre-train CellRep on it and evaluate it (CPU, embedded Ray)."
DEFAULT_CONFIG = "configs/demo.yaml"
EXAMPLES = """examples:
  cellfm demo                                   # = make demo (run from the repository root)
  cellfm demo optim.epochs=2                    # a shorter run

A second run over an existing demo_output/ resumes the finished run and only re-evaluates."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)


def run(args: argparse.Namespace) -> int:
    import logging
    import time
    from pathlib import Path

    from cellfm.config import ConfigError
    from cellfm.data.synthetic.catalog import LAYOUTS
    from cellfm.data.synthetic.screens import generate_screen
    from cellfm.preflight import preflight

    cfg = config_from_args(args, check_rules=False)
    demo_layouts = sorted(name for name, layout in LAYOUTS.items() if layout.n_heldout_plates and layout.n_unseen_plates)
    if cfg.data.synthetic_layout not in demo_layouts:
        raise ConfigError(f"data.synthetic_layout={cfg.data.synthetic_layout!r} is not one of {demo_layouts} "
                          "(the layouts with held-out and unseen plates)")
    checked_config(args, cfg)  # the config alone, before minutes of screen generation
    _log_to_console(logging.getLogger("cellfm.data.synthetic.screens"))
    t0 = time.perf_counter()
    manifests = generate_screen(Path(cfg.data.screen_dir).resolve(), layout=cfg.data.synthetic_layout,
                                seed=cfg.data.synthetic_seed)
    # The generated screen is the single source of truth for what is trained and evaluated on.
    cfg.data.train_manifest = str(manifests["train"])
    cfg.eval.manifests = {"seen": str(manifests["heldout"]), "unseen": str(manifests["unseen"])}
    print(f"[cellfm] screen ready in {time.perf_counter() - t0:.0f}s: {', '.join(str(m) for m in manifests.values())}")
    preflight(cfg, train=True, evaluate=True)

    from cellfm.evaluate.report import summary_lines
    from cellfm.evaluate.run import run_evaluation
    from cellfm.train.trainer import run_pretraining

    result = run_pretraining(cfg)
    print(f"[cellfm] pre-training done at {time.perf_counter() - t0:.0f}s; checkpoint {result.checkpoint.path}")
    report, paths = run_evaluation(cfg, result.checkpoint.path)
    print("\n[cellfm] held-out wells, trained encoder vs baselines (docs/evaluation.md):")
    print("\n".join(summary_lines(report)))
    print(f"\n[cellfm] report: {paths['markdown']}  (demo took {time.perf_counter() - t0:.0f}s)")
    return 0


def _log_to_console(logger) -> None:
    """INFO lines of one library logger (here: the screen generator's per-plate progress) on stdout."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[cellfm] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

"""`cellfm synth`: write a synthetic multichannel screen (plates + manifests)."""

from __future__ import annotations

import argparse

DESCRIPTION = "Write a synthetic multichannel microscopy screen (OME-Zarr plates + Parquet manifests)."
EXAMPLES = """examples:
  cellfm synth demo_output/screen --layout demo --seed 0        # the demo's train / held-out / unseen screen
  cellfm synth screens/hpa4 --family hpa4 --layout tiny          # one configuration of the synthetic family
  cellfm synth screens/cp5-clear --family cp5 --difficulty clear  # the calibrated screen (docs/screens.md)

--layout: tiny | demo | benchmark (cellfm.data.synthetic.catalog.LAYOUTS; benchmark: 3 training and 5 held-out plates
of 96 px, no unseen ones, as benchmarks/model_quality.py scores each configuration); --family: cp5 | novel4 | hpa4 | brightfield1;
--difficulty: subtle | clear. Ground truth (cell tables, nucleus/cell labels) goes to OUT_DIR/truth/."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("out_dir", help="output folder (plates/ and the manifests)")
    parser.add_argument("--layout", default="demo", help="screen size (default: demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default=None,
                        help="write one configuration of the synthetic family instead (train/heldout manifests)")
    parser.add_argument("--difficulty", default="subtle",
                        help="subtle (the original screen, default) or clear (calibrated: every MoA visible in the "
                             "stains that show it; docs/screens.md)")


def run(args: argparse.Namespace) -> int:
    import logging
    import time

    from cellfm.config import ConfigError
    from cellfm.data.synthetic.catalog import DIFFICULTIES, FAMILY_CONFIGS, LAYOUTS
    from cellfm.data.synthetic.screens import generate_family_screen, generate_screen
    from cellfm.paths import check_paths

    problems = [f"--{flag}={value!r} is not one of {sorted(allowed)}"
                for flag, value, allowed in (("layout", args.layout, LAYOUTS), ("family", args.family, FAMILY_CONFIGS),
                                             ("difficulty", args.difficulty, DIFFICULTIES))
                if value is not None and value not in allowed]
    if problems:
        raise ConfigError(problems)
    check_paths(outputs={"out_dir": args.out_dir})
    logging.basicConfig(level=logging.INFO, format="[synth] %(message)s")
    started = time.perf_counter()
    if args.family:
        manifests = generate_family_screen(args.out_dir, config=args.family, layout=args.layout, seed=args.seed,
                                           difficulty=args.difficulty)
    else:
        manifests = generate_screen(args.out_dir, layout=args.layout, seed=args.seed, difficulty=args.difficulty)
    print(f"[synth] done in {time.perf_counter() - started:.1f} s")
    for split, path in manifests.items():
        print(f"[synth] {split}: {path}")
    return 0

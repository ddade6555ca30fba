"""Shared command-line handling for the thin `jobs/` entry points: a config file, a few named
flags that map to config keys, and free `section.key=value` overrides."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cellfm.config import Config, ConfigError, load_config

# Flag -> dotted config key, for the settings people change most from the command line.
COMMON_FLAGS = {
    "--storage-path": "train.storage_path",
    "--run-name": "train.run_name",
    "--num-workers": "train.num_workers",
    "--cpus-per-worker": "train.cpus_per_worker",
    "--gpus-per-worker": "train.gpus_per_worker",
    "--address": "ray.address",
}
# On/off flags: present -> the key is set to true.
SWITCHES = {"--use-gpu": "train.use_gpu"}


OVERRIDES_EPILOG = "Any config key can be overridden as section.key=value, e.g. optim.epochs=3"


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None,
                         flags: Sequence[str] = tuple(COMMON_FLAGS)) -> None:
    """`--config`, the common flags (`flags` of COMMON_FLAGS, and SWITCHES) and free
    `section.key=value` overrides, on an existing parser (a command's)."""
    parser.add_argument("--config", default=default_config,
                        help=f"YAML experiment config (default: {default_config or 'the defaults of cellfm.config'})")
    for flag in flags:
        parser.add_argument(flag, default=None, help=f"sets {COMMON_FLAGS[flag]}")
    for flag, key in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=f"sets {key}=true")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.epilog = "\n\n".join(text for text in (parser.epilog, OVERRIDES_EPILOG) if text)


def parser(description: str, flags: Sequence[str] = tuple(COMMON_FLAGS)) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    add_config_arguments(p, flags=flags)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in COMMON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.append(f"{key}={value}")
    for flag, key in SWITCHES.items():
        if getattr(args, flag.lstrip("-").replace("-", "_"), False):
            overrides.append(f"{key}=true")
    return load_config(args.config, overrides)


def run_main(main) -> None:
    """Run a job's main; configuration and input errors end with one clear line and exit code 2."""
    from cellfm.data.manifest import ManifestError
    from cellfm.data.plate import PlateError
    from cellfm.features.store import StoreError
    from cellfm.train.checkpoint import CheckpointError

    try:
        main()
    except (ConfigError, ManifestError, PlateError, CheckpointError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """`cellfm` console script: points at the jobs."""
    print("cellfm jobs: python jobs/pretrain.py | jobs/evaluate.py | jobs/demo.py  (each takes --help)")

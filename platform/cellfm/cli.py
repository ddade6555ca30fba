"""The `cellfm` command: one subcommand per job (`cellfm pretrain | evaluate | ingest | validate |
synth | demo | ...`), each with `--help`.

A command is a module `cellfm.commands.<name>` exposing

    DESCRIPTION: str                                      # one line, shown by `cellfm --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int                  # the exit code

registered in `COMMANDS` below. Command modules import only light modules at import time (heavy
ones such as torch and ray inside `run`), so `cellfm --help` stays fast. Config-driven commands call
`add_config_arguments` in `add_arguments` and `checked_config` first thing in `run`: that loads the
config and runs the preflight (`cellfm.preflight`) before anything starts Ray. `main` turns bad input
(config, preflight, manifest, plate, checkpoint and ingestion errors) into `error: ...` lines on
stderr and exit code 2. `jobs/<name>.py` are the same commands as scripts for `ray job submit`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
from typing import TYPE_CHECKING, Sequence

from cellfm.config import Config, ConfigError, config_source, load_config

if TYPE_CHECKING:
    import pandas as pd

# Command name -> module; a new command is one module and one line here.
COMMANDS: dict[str, str] = {
    "pretrain": "cellfm.commands.pretrain",
    "evaluate": "cellfm.commands.evaluate",
    "ingest": "cellfm.commands.ingest",
    "validate": "cellfm.commands.validate",
    "synth": "cellfm.commands.synth",
    "demo": "cellfm.commands.demo",
    "embed": "cellfm.commands.embed",
    "refresh": "cellfm.commands.refresh",
    "sweep": "cellfm.commands.sweep",
    "cells": "cellfm.commands.cells",
}

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
OVERRIDES_EPILOG = ("Any config key can be overridden as section.key=value, e.g. optim.epochs=3 "
                    "(docs/configuration.md lists every key).")


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None = None,
                         flags: Sequence[str] = tuple(COMMON_FLAGS)) -> None:
    """`--config`, the common flags (`flags` of COMMON_FLAGS, and SWITCHES) and free
    `section.key=value` overrides."""
    parser.add_argument("--config", default=default_config,
                        help=f"YAML experiment config (default: {default_config or 'the defaults of cellfm.config'})")
    for flag in flags:
        parser.add_argument(flag, default=None, help=f"sets {COMMON_FLAGS[flag]}")
    for flag, key in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=f"sets {key}=true")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.epilog = "\n\n".join(text for text in (parser.epilog, OVERRIDES_EPILOG) if text)


def config_from_args(args: argparse.Namespace, check_rules: bool = True) -> Config:
    """The config of `add_config_arguments`' arguments: defaults <- --config <- flags and overrides
    (`check_rules` as in `cellfm.config.load_config`)."""
    return load_config(args.config, _overrides(args), check_rules=check_rules)


def checked_config(args: argparse.Namespace, cfg: Config | None = None, **preflight_args) -> Config:
    """The config of `add_config_arguments`' arguments after `cellfm.preflight.preflight(cfg,
    **preflight_args)` (e.g. train=True, evaluate=True, checkpoint=..., manifests={...}): every problem
    of the config and of the manifests it names raises at once, before Ray starts. `cfg`: the config
    as the command already loaded it with `config_from_args(args, check_rules=False)` (e.g. to find
    the checkpoint to check)."""
    return preflighted(args, cfg, **preflight_args)[0]


def preflighted(args: argparse.Namespace, cfg: Config | None = None,
                **preflight_args) -> tuple[Config, dict[str, "pd.DataFrame"]]:
    """`checked_config` and the manifests preflight loaded (key -> manifest with its plates checked), for a job
    that reads them next (pretrain: "data.train_manifest") without opening every plate again."""
    from cellfm.preflight import preflight

    cfg = cfg or config_from_args(args, check_rules=False)
    return cfg, preflight(cfg, source=config_source(args.config, _overrides(args)), **preflight_args)


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    for flag, key in COMMON_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides.append(f"{key}={value}")
    for flag, key in SWITCHES.items():
        if getattr(args, flag.lstrip("-").replace("-", "_"), False):
            overrides.append(f"{key}=true")
    return overrides


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, one subparser per registered command (`args.command` names it)."""
    parser = argparse.ArgumentParser(
        prog="cellfm", description="Pre-train, evaluate and feed channel-adaptive encoders for multichannel microscopy.",
        epilog="`cellfm <command> --help` describes each command; docs/README.md the rest.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        # No abbreviations: `--check` must not silently mean `--checkpoint`.
        sub = commands.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        module.add_arguments(sub)
        sub.set_defaults(command_module=module_path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command, and return its exit code; bad input ends as `error: ...` lines and 2."""
    args = build_parser().parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even where the caller ignored SIGINT (a job started with `&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(importlib.import_module(args.command_module).run(args) or 0)
    except KeyboardInterrupt:
        from cellfm.runtime import PendingWatch

        if PendingWatch.reason:  # its message is printed already
            return 1
        print("error: interrupted (Ctrl-C): stopped", file=sys.stderr, flush=True)
        return 130
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
    except Exception as exc:
        message = bad_input_in(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
    return 2


# A traceback's last line for an exception of ours: "cellfm.data.pipeline.monitor.BadFieldError: 3 of 52 fields ...".
_OUR_ERROR_LINE = re.compile(r"^(cellfm(?:\.\w+)+)\.(\w+): (.+)$", flags=re.MULTILINE)


def bad_input_in(exc: BaseException) -> str | None:
    """The one-line message of the bad-input error (`_input_errors`) `exc` is or carries; None when it is a
    bug. Ray re-raises what a Ray Data task or a training worker raised (e.g. a field over
    data.max_bad_fraction, deep in the data pipeline) as its own exception holding the original only as
    traceback text, so that text is read too."""
    errors, todo, seen = _input_errors(), [exc], set()
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, errors) and "\n" not in str(error).strip():
            return str(error)
        if type(error).__module__.startswith("ray."):
            for module, name, message in _OUR_ERROR_LINE.findall(str(error)):
                cls = getattr(importlib.import_module(module), name, None)
                if isinstance(cls, type) and issubclass(cls, errors):
                    return message
        todo += [getattr(error, "cause", None), *(getattr(error, "worker_failures", None) or {}).values(),
                 error.__cause__, error.__context__]
    return None


def _input_errors() -> tuple[type[ValueError], ...]:
    """The errors that mean bad input (manifest, plate and its fields, checkpoint, ingestion, feature store), not a bug. Imported only
    when needed: their modules pull in pandas, zarr and torch."""
    from cellfm.data.cells import LocationsError
    from cellfm.data.ingest.plan import IngestError
    from cellfm.data.manifest import ManifestError
    from cellfm.data.plate import PlateError
    from cellfm.features.store import StoreError
    from cellfm.train.checkpoint import CheckpointError

    return ManifestError, PlateError, CheckpointError, IngestError, StoreError, LocationsError

"""A config's YAML file: `load_config` (defaults <- file <- presets <- dotted overrides, then checked) and
`save_config` (the resolved config beside a run, credentials replaced by markers)."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml

from cellfm.config.credentials import saved_config_dict
from cellfm.config.schema import Config
from cellfm.config.typed_yaml import apply_overrides, read_yaml_mapping


def config_source(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> str:
    """How errors name a config: its file (or <defaults>), `+ overrides` when there are any."""
    return f"{path if path is not None else '<defaults>'}{' + overrides' if overrides else ''}"


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                check_rules: bool = True, presets: typing.Mapping[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- `presets` (dotted key -> value, e.g. a sweep file's overrides) <- dotted
    `key=value` overrides (values parsed as YAML scalars/lists); `check_rules` as in `Config.from_dict`."""
    raw = read_yaml_mapping(path) if path is not None else {}
    apply_overrides(raw, presets, overrides)
    return Config.from_dict(raw, source=config_source(path, overrides), check_rules=check_rules)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (temp file in the same folder, then rename),
    with credential values replaced by `CREDENTIAL_MARKER` (`saved_config_dict`)."""
    from cellfm.storage import write_file  # cellfm.storage imports the config package

    path = Path(path)
    write_file(path, yaml.safe_dump(saved_config_dict(cfg), sort_keys=False))
    return path


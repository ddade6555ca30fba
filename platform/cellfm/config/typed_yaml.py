"""Typed YAML: a YAML file's mapping, dotted `key=value` overrides laid over it, and a dataclass built from
it under one rule set: unknown keys and wrong types raise `ConfigError` naming the dotted key and the file it
came from, every problem at once (one line each), so a typo never silently falls back to a default. Used by
the experiment config (`cellfm.config`) and other typed YAML files (sweep files, cellfm.tune.sweep_config)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cellfm.config.errors import ConfigError


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file (an empty file is {}); `ConfigError` naming the file when it is
    missing, not YAML, or not a mapping."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            loaded = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def typed_from_mapping(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """The dataclass `cls` (fields of the kinds Config's sections use: scalars, lists, mappings, nested
    dataclasses) from the mapping `raw` under `load_config`'s rules: `ConfigError` with one line per unknown
    key or badly typed value, each naming `source` and the dotted key (`prefix` + field). For `Config` itself
    and other typed YAML files, e.g. sweep files (cellfm.tune.sweep_config)."""
    problems: list[str] = []
    built = _build(cls, raw, prefix=prefix, source=source, problems=problems)
    if problems:
        raise ConfigError(problems)
    return built


def apply_overrides(raw: dict, presets: typing.Mapping[str, Any] | None = None,
                    overrides: typing.Sequence[str] = ()) -> None:
    """Lay `presets` (dotted key -> value) and then dotted `key=value` `overrides` (values parsed as YAML
    scalars/lists) over the mapping `raw`, in place; `ConfigError` with one line per malformed override."""
    problems = []
    for key, value in (presets or {}).items():
        try:
            _set_nested(raw, str(key).split("."), value, str(key))
        except ConfigError as exc:
            problems += exc.problems
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not of the form section.key=value")
            continue
        try:
            _set_nested(raw, key.strip().split("."), yaml.safe_load(value) if value != "" else "", key.strip())
        except yaml.YAMLError:
            problems.append(f"override {key.strip()}: value is not valid YAML")
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)


def _set_nested(raw: dict, keys: list[str], value: Any, item: str) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str, problems: list[str]) -> Any:
    """`cls` from `raw`, appending one line per unknown key or badly typed value to `problems`
    (a bad value keeps the field's default so the rest is still checked)."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        problems.append(f"{source}: {where} must be a mapping, got {_shown(where, raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        problems.append(f"{source}: unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                        f"valid keys under {where}: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw[name], prefix + name + ".", source, problems)
            continue
        try:
            kwargs[name] = _coerce(hints[name], raw[name], prefix + name)
        except _TypeProblem as exc:
            problems.append(f"{source}: {exc}")
    return cls(**kwargs)


class _TypeProblem(Exception):
    pass


_SCALARS = {int: int, float: float, str: str, bool: bool}


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` as type `hint` (int -> float and float literals in strings accepted; list and dict
    element types checked), or `_TypeProblem` naming `key` (`key[i]` for list elements)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if hint is Any:
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise _TypeProblem(f"{key} must be a list, got {_shown(key, value)}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _TypeProblem(f"{key} must be a mapping, got {_shown(key, value)}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(key_hint, k, f"{key} key {k!r}"): _coerce(value_hint, v, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept any float literal.
        try:
            return float(value)
        except ValueError:
            pass
    expected = _SCALARS[hint]
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise _TypeProblem(f"{key} must be {expected.__name__}, got {_shown(key, value)}")
    return value


def _shown(key: str, value: Any) -> str:
    """A value for an error message; never the value of a storage option (it may be a credential)."""
    if "storage_options" in key:
        return f"a {type(value).__name__}"
    return f"{value!r} ({type(value).__name__})"

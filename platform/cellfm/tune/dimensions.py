"""The search space of a sweep file: each `space` entry ({kind: values} under a config key) parsed into a
`Dimension`, checked against the config schema (the key exists, a drawn kind draws the field's type), one
problem line per bad entry naming where it is in the sweep file."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Sequence

from cellfm.config import Config

# Kinds of search dimension, as Ray Tune names them: grid = every value (crossed with the other grid
# dimensions), choice = one value drawn per trial, uniform / loguniform = a float drawn from [low, high),
# randint = an int drawn from [low, high) (high excluded, as tune.randint).
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
LISTED_KINDS = ("grid", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched config key. grid / choice: `values`; uniform / loguniform / randint: `values` = (low, high)."""

    key: str
    kind: str
    values: tuple
    where: str  # its key in the sweep file, e.g. "arms.c3r.space.model.n_pre"

    @property
    def listed(self) -> bool:
        return self.kind in LISTED_KINDS

    def checked_values(self) -> list:
        """The values preflight builds a trial config from: every listed value, or a range's two ends
        (randint: low and high - 1)."""
        if self.listed:
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


def parse_dimension(key: str, raw: Any, where: str) -> tuple[Dimension | None, list[str]]:
    """The dimension of a space entry `raw` ({kind: values}) at `where` in the sweep file, or the problem
    lines naming `where`."""
    kinds = ", ".join(DIMENSION_KINDS)
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DIMENSION_KINDS:
        return None, [f"{where} must be one of {{grid: [values]}}, {{choice: [values]}}, {{uniform: [low, high]}}, "
                      f"{{loguniform: [low, high]}}, {{randint: [low, high]}} (kinds: {kinds}); got {raw!r}"]
    kind, values = next(iter(raw.items()))
    if kind in LISTED_KINDS:
        if not isinstance(values, list):
            return None, [f"{where}: {kind} must be a list of values, got {values!r}"]
        if not values:
            return None, [f"{where}: {kind} is empty; give at least one value"]
        return Dimension(key, kind, tuple(values), where), []
    numbers = isinstance(values, list) and len(values) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers:
        return None, [f"{where}: {kind} must be [low, high] (two numbers), got {values!r}"]
    low, high = values
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        return None, [f"{where}: randint must be [low, high] integers (high excluded), got {values!r}"]
    if not low < high:
        return None, [f"{where}: {kind} needs low < high, got {values!r}"]
    if kind == "loguniform" and low <= 0:
        return None, [f"{where}: loguniform needs 0 < low, got {values!r}"]
    return Dimension(key, kind, (low, high), where), []


def config_key_type(key: str) -> Any:
    """The type hint of the config field a dotted key names (`section.field`), or None if there is none."""
    section, _, name = str(key).partition(".")
    sections = typing.get_type_hints(Config)
    if section not in sections or not name:
        return None
    return typing.get_type_hints(sections[section]).get(name)


def config_key_problem(key: str, where: str) -> str | None:
    """Why `key` is not a config field a sweep can set (a line naming `where`), or None."""
    section, _, name = str(key).partition(".")
    sections = typing.get_type_hints(Config)
    if section not in sections:
        return f"{where}: unknown config key {key!r}; keys are section.field with section one of {', '.join(sections)}"
    fields = typing.get_type_hints(sections[section])
    if name not in fields:
        return f"{where}: unknown config key {key!r}; valid keys under {section}: {', '.join(sorted(fields))}"
    return None


def _kind_fits_type(dim: Dimension) -> str | None:
    """A drawn kind must draw values of the field's type."""
    hint = config_key_type(dim.key)
    hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
    if dim.kind in ("uniform", "loguniform") and hint is not float:
        return f"{dim.where}: {dim.kind} draws floats but {dim.key} is {getattr(hint, '__name__', hint)}; use grid, choice or randint"
    if dim.kind == "randint" and hint not in (int, float):
        return f"{dim.where}: randint draws integers but {dim.key} is {getattr(hint, '__name__', hint)}; use grid or choice"
    return None


def optuna_can_hold(values: Sequence) -> bool:
    """Whether Optuna's suggest_categorical can take these values as they are."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def dimensions_of(space: dict[str, Any], where: str, source: str) -> tuple[list[Dimension], list[str]]:
    """The dimensions of a sweep file's `space` at `where` (e.g. "arms.c3r.space"), and the problem lines."""
    dims, problems = [], []
    for key, raw in space.items():
        at = f"{where}.{key}"
        problem = config_key_problem(key, at)
        if problem:
            problems.append(f"{source}: {problem}")
            continue
        dim, dim_problems = parse_dimension(str(key), raw, at)
        problems += [f"{source}: {p}" for p in dim_problems]
        if dim is not None:
            kind_problem = _kind_fits_type(dim)
            if kind_problem:
                problems.append(f"{source}: {kind_problem}")
            else:
                dims.append(dim)
    return dims, problems

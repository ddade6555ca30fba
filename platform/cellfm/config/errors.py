"""The errors of a config that cannot run: `ConfigError` (the config itself) and `PreflightError` (the config
with its manifests and paths)."""

from __future__ import annotations

import typing


class ConfigError(ValueError):
    """A config file or override is malformed; each line of the message (one per problem, in
    `problems`) names the dotted key at fault and what is allowed."""

    def __init__(self, problems: str | typing.Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PreflightError(ConfigError):
    """The config, its manifests or its paths cannot run (`cellfm.preflight`); `problems` holds one line per
    problem."""

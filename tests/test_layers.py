"""The one-way layers of cellfm (pyproject.toml's [tool.importlinter] contract): a module imports only from
layers below its own, so data never reaches up into training, training never into preflight, and so on. A
back-edge fails here with the offending import (module, line) in the message."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_every_import_follows_the_layers():
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        exit_code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    assert exit_code == 0, report.getvalue()
    assert "2 kept, 0 broken" in report.getvalue()

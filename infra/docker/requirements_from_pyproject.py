"""Print the requirements pinned in pyproject.toml (the project's dependencies plus the named extras),
one per line, for `pip install -r`. The container image installs exactly these (infra/docker/Dockerfile),
so pyproject.toml stays the one place where pins are written.

    python infra/docker/requirements_from_pyproject.py pyproject.toml --extra zarrs > requirements.txt
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Sequence


def pinned_requirements(pyproject: Path, extras: Sequence[str] = ()) -> list[str]:
    """`project.dependencies` followed by the requirements of each extra (in order, without repeats)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"{pyproject}: no extra(s) {', '.join(unknown)}; it defines {', '.join(sorted(optional))}")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += [req for req in optional[extra] if req not in requirements]
    return requirements


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject", type=Path)
    p.add_argument("--extra", action="append", default=[], help="also the requirements of this extra (repeatable)")
    args = p.parse_args(argv)
    try:
        print("\n".join(pinned_requirements(args.pyproject, args.extra)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

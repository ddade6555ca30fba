"""Fill the ${VARIABLE}s of an infra/ template from the environment and print the result.

    python3 infra/render.py infra/kuberay/pretrain-rayjob.yaml | kubectl apply -n cellfm -f -
    python3 infra/render.py infra/aws/cluster.yaml > cellfm-cluster.yaml && ray up cellfm-cluster.yaml

Only ${UPPER_CASE} names are replaced; shell syntax such as $(...) or $VAR is left for the shell. A variable
that a template uses but the environment leaves unset or empty stops the command with one line naming it
(exit code 2), so nothing half-filled reaches kubectl or `ray up`. Standard library only: no venv needed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class RenderError(ValueError):
    """A template needs a variable that has no value."""


def template_variables(text: str) -> set[str]:
    return set(VARIABLE.findall(text))


def render(text: str, values: Mapping[str, str], source: str = "<template>") -> str:
    missing = sorted(name for name in template_variables(text) if not values.get(name))
    if missing:
        raise RenderError(f"{source} needs {', '.join(missing)}: export them first (see docs/cluster.md)")
    return VARIABLE.sub(lambda match: values[match.group(1)], text)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[0] + "\nusage: python3 infra/render.py TEMPLATE", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        sys.stdout.write(render(path.read_text(), os.environ, source=str(path)))
    except (OSError, RenderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The configuration reference (docs/configuration.md), generated from the typed config: every key with
its type, default and meaning; and configs/defaults.yaml, every key at its default. A key's meaning is the
comment directly above its field in `cellfm/config/schema.py` (and any comment on the field's own line), so
a key added with a comment is documented by regenerating both:

    python -m cellfm.config_reference docs/configuration.md configs/defaults.yaml     # or: make docs

`tests/test_docs.py` fails when either file is stale or a key has no comment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

from cellfm.config import Config


class UndocumentedKeyError(ValueError):
    """A config field has no comment to document it."""


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the text of the comment lines directly above it plus a comment on its own line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    meanings = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            meanings[node.target.id] = " ".join(above + own)
    return meanings


def type_name(hint: typing.Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return "any" if hint is typing.Any else hint.__name__


def _default(value: typing.Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown(root: type = Config) -> str:
    """The Markdown reference of every key of `root`'s sections; UndocumentedKeyError lists every key
    without a comment."""
    lines = ["# Configuration reference", "",
             "Generated from the typed config (`platform/cellfm/config/schema.py`) by `make docs`; "
             "`tests/test_docs.py` fails when it is stale. Set a key in a YAML file (`--config`) or on the "
             "command line as `section.key=value` (values are YAML: `optim.epochs=3`, "
             "`ssl.global_crop_scale=[0.4,1]`, `'eval.manifests={seen: a.parquet}'`). Every job checks the "
             "whole config, with the manifests it names, before Ray starts (`cellfm.preflight`).", ""]
    missing = []
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        hints, meanings, instance = typing.get_type_hints(cls), field_comments(cls), cls()
        lines += [f"## `{section.name}`", "", (inspect.getdoc(cls) or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            if not meanings.get(f.name):
                missing.append(key)
            lines.append(f"| `{key}` | {_cell(type_name(hints[f.name]))} | `{_cell(_default(getattr(instance, f.name)))}` "
                         f"| {_cell(meanings.get(f.name, ''))} |")
        lines.append("")
    if missing:
        raise UndocumentedKeyError(f"config key(s) without a comment above their field in cellfm/config/schema.py: "
                                   f"{', '.join(missing)}")
    return "\n".join(lines)


def defaults_yaml(root: type = Config) -> str:
    """Every key of `root`'s sections at its default, as the YAML file `--config` takes (loading it gives
    `root()`): one block per section under its description, one line per key."""
    lines = ["# Every config key at its default, generated from the typed config (platform/cellfm/config/schema.py)",
             "# by `make docs`; docs/configuration.md says what each key means. Copy the keys you change into your",
             "# own config: a config file need only hold those."]
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        instance = cls()
        lines += ["", *(f"# {line}" for line in textwrap.wrap(inspect.getdoc(cls) or "", 108)), f"{section.name}:"]
        lines += [f"  {f.name}: {_default(getattr(instance, f.name))}" for f in dataclasses.fields(cls)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to every given .md path and the defaults to every given .yaml path; with no
    path, print the reference."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stdout.write(reference_markdown())
    for path in map(Path, argv):
        path.write_text(defaults_yaml() if path.suffix in (".yaml", ".yml") else reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The documentation stays true: the configuration reference and configs/defaults.yaml are generated from the
typed config (and every key has a comment to generate it from), the README is short and its links and cluster
example are real."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cellfm.config import Config
from cellfm.config_reference import UndocumentedKeyError, defaults_yaml, field_comments, main, reference_markdown
from tests.conftest import REPO

DOCS = REPO / "docs"
CLUSTER_MARKER = "<!-- cluster-example: tests/test_jobs.py submits this block to a local head, as written -->"


def test_configuration_reference_is_generated_from_the_config():
    assert (DOCS / "configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `make docs`")


def test_defaults_yaml_is_generated_from_the_config():
    assert (REPO / "configs" / "defaults.yaml").read_text() == defaults_yaml(), (
        "configs/defaults.yaml is stale: run `make docs`")


def test_the_generator_writes_each_path_by_its_suffix(tmp_path):
    main([str(tmp_path / "reference.md"), str(tmp_path / "defaults.yaml")])
    assert (tmp_path / "reference.md").read_text() == reference_markdown()
    assert yaml.safe_load((tmp_path / "defaults.yaml").read_text()) == Config().to_dict()


def test_every_key_is_in_the_reference_with_its_default():
    text = (DOCS / "configuration.md").read_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f"| `{section.name}.{f.name}` |" in text
    assert "| `optim.warmup_epochs` | int | `1` | Epochs of linear learning-rate warm-up (at most optim.epochs). |" in text
    assert "| `model.layerscale_init` | float or null | `0.1` |" in text
    assert "| `ssl.global_crop_scale` | list[float] | `[0.32, 1.0]` |" in text


@dataclasses.dataclass
class _Section:
    """A section with a key someone forgot to document."""

    # Documented above, with a second line
    # that continues it.
    documented: int = 1
    inline: float = 0.5  # documented on its own line

    undocumented: str = "x"


@dataclasses.dataclass
class _Root:
    """Root."""

    demo: _Section = dataclasses.field(default_factory=_Section)


def test_comments_become_meanings_and_a_key_without_one_fails():
    assert field_comments(_Section) == {"documented": "Documented above, with a second line that continues it.",
                                        "inline": "documented on its own line", "undocumented": ""}
    with pytest.raises(UndocumentedKeyError, match=r"without a comment .*: demo\.undocumented$"):
        reference_markdown(_Root)


def test_readme_is_a_few_screens():
    assert len((REPO / "README.md").read_bytes()) < 10_000


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_relative_links_point_at_files_and_headings_that_exist(page):
    text = (REPO / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        resolved = (REPO / page).parent / path if path else REPO / page
        assert resolved.exists(), f"{page} links to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved.read_text()), f"{page} links to missing heading {target}"


def readme_cluster_example() -> str:
    """The README's cluster example: the bash block right after its marker comment."""
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(CLUSTER_MARKER) + r"\n```bash\n(.*?)```", text, flags=re.DOTALL)
    assert match, "README.md lost its cluster example (or its marker)"
    return match.group(1)


def test_the_user_guide_shows_the_readmes_cluster_example():
    assert f"```bash\n{readme_cluster_example()}```" in (DOCS / "user-guide.md").read_text()


def test_set_up_commands_exist():
    makefile = (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: ", makefile, flags=re.MULTILINE)
        assert f"make {target} " in readme


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_every_cellfm_name_a_page_cites_exists(page):
    """`cellfm.x.y` in the docs names a module, or an attribute of one, that exists: a moved or renamed function
    fails here instead of leaving a page that points nowhere."""
    import importlib

    missing = []
    for name in sorted(set(re.findall(r"`(cellfm(?:\.\w+)+)", (REPO / page).read_text()))):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:split]))
                break
            except ImportError:
                continue
        for attr in parts[split:]:
            found = getattr(found, attr, None)
        if found is None:
            missing.append(name)
    assert not missing, f"{page} cites names that do not exist: {missing}"

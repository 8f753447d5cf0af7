"""The documentation site builds without a warning, and the code it shows is the code tests run.

``mkdocs build --strict`` turns every warning (a broken link or include, a docstring that does
not parse, a failing command-line help) into an error; it builds into a temporary folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::[\w-]+)?"$')
# The background notes this project started from are not part of it; no file may point to them.
OUTSIDE_NOTES = ("ALGORITHMS", "ECOSYSTEM", "PUBLISHED")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_site_builds_strict(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    methods = (tmp_path / "methods.html").read_text()
    assert methods.count('class="arithmatex"') > 20  # the formulas went to MathJax
    lightly = (tmp_path / "lightly.html").read_text()
    assert "IndexedCollate" in lightly and "--8&lt;--" not in lightly  # includes resolved
    cli = (tmp_path / "cli.html").read_text()
    assert "--tau-key-index" in cli and "--fake-data" in cli  # generated from the parsers
    api = (tmp_path / "api" / "lightly_tau.html").read_text()
    assert 'id="lightly_tau.ISogCLRLoss"' in api and "Raises" in api


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_python_on_a_page_is_included_from_an_example(page: Path) -> None:
    """Every Python block of the site is a ``--8<--`` include of an existing example file."""
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        lines = [line for line in block.splitlines() if line.strip()]
        assert lines, f"empty python block in {page}"
        for line in lines:
            match = SNIPPET.match(line.strip())
            assert match, f"{page}: python block line is not an include: {line!r}"
            assert match.group(1).startswith("examples/"), line
            assert (REPO_ROOT / match.group(1)).is_file(), line


def test_every_public_name_is_in_the_api_reference() -> None:
    import lightly_tau
    import openclip_tau
    import tau_core

    for module in (tau_core, lightly_tau, openclip_tau):
        page = (DOCS / "api" / f"{module.__name__}.md").read_text()
        assert f"::: {module.__name__}\n" in page
        assert module.__all__  # mkdocstrings renders exactly the names of __all__


def test_no_file_refers_to_notes_outside_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = REPO_ROOT / name
        if path.suffix not in {".py", ".md", ".sh", ".sbatch", ".toml", ".yml", ".txt"}:
            continue
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for note in OUTSIDE_NOTES:
            if f"{note}.md" in text or f"/shared/{note}" in text:
                offenders.append(f"{name}: {note}.md")
    assert not offenders, offenders


# Modules whose docstring examples are complete programs (the others show fragments of a loop).
DOCTEST_MODULES = ("lightly_tau.losses", "lightly_tau.data", "openclip_tau.losses")


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    import doctest
    import importlib

    import torch

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module_name))
    assert result.attempted > 0 and result.failed == 0, result

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
OUTSIDE_NOTES = tuple(name.upper() for name in ("algorithms", "ecosystem", "published"))


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict`` into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def test_site_builds_strict(site: Path) -> None:
    methods = (site / "methods.html").read_text()
    assert methods.count('class="arithmatex"') > 20  # the formulas went to MathJax
    lightly = (site / "lightly.html").read_text()
    assert "IndexedCollate" in lightly and "--8&lt;--" not in lightly  # includes resolved
    cli = (site / "cli.html").read_text()
    assert "--tau-key-index" in cli and "--fake-data" in cli  # generated from the parsers
    for page in (site / "api").glob("*.html"):
        assert ":class:" not in page.read_text(), page  # Sphinx roles rendered as code


def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    """Each name of each package's ``__all__`` has its entry (re-exports: in tau_core's)."""
    import lightly_tau
    import openclip_tau
    import tau_core

    core = (site / "api" / "tau_core.html").read_text()
    for module in (tau_core, lightly_tau, openclip_tau):
        page = (site / "api" / f"{module.__name__}.html").read_text()
        for name in module.__all__:
            # in the package's entry or one of its submodules' (lightly_tau.lightning.X)
            here = re.search(rf'id="{module.__name__}(\.\w+)*\.{name}"', page)
            assert here or (name in tau_core.__all__ and f'id="tau_core.{name}"' in core), name


@pytest.mark.parametrize(
    "name",
    ["SogCLRLoss", "ISogCLRLoss", "RGCLGLoss", "TempNetLoss", "DySTreSSLoss", "IndexedDataset"],
)
def test_each_lightly_class_has_its_raises_section(site: Path, name: str) -> None:
    page = (site / "api" / "lightly_tau.html").read_text()
    start = page.index(f'id="lightly_tau.{name}"')
    following = [page.find('<div class="doc doc-object doc-class">', start + 1), len(page)]
    entry = page[start : min(i for i in following if i > 0)]
    assert "Raises:" in entry or ">Raises<" in entry, name


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
LOSS_MODULES = ("sogclr", "isogclr", "rgclg", "tempnet", "dystress")
DOCTEST_MODULES = (
    *(f"{host}.losses.{loss}" for host in ("lightly_tau", "openclip_tau") for loss in LOSS_MODULES),
    "lightly_tau.data",
    "openclip_tau.registry",
    "openclip_tau.flags",
    "tau_core.registry_source",
)


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    import doctest
    import importlib

    import torch

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module_name))
    assert result.attempted > 0 and result.failed == 0, result


# ---------------------------------------------------------------- the architecture drawing
def architecture():
    """The hook that draws the design page's architecture (docs/hooks/architecture.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("architecture", DOCS / "hooks/architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_drawing_shows_every_module_and_only_modules_that_exist() -> None:
    """The modules of tau_core, lightly_tau and openclip_tau are the drawing's nodes.

    Left out: the packages' ``__init__`` (they gather the public names; tau_core's is drawn as
    its public API) and ``__main__`` (it calls the entry point).
    """
    drawing = architecture()
    modules = drawing.source_modules()
    in_tree = {
        name
        for name, path in modules.items()
        if path.name not in ("__init__.py", "__main__.py") or name == "tau_core"
    }
    drawn = set(drawing.drawn_modules()) - set(drawing.FOLDERS)
    assert sorted(in_tree - drawn) == [], "modules missing from the drawing"
    assert sorted(drawn - in_tree) == [], "modules drawn that do not exist"
    assert len(drawing.drawn_modules()) == len(set(drawing.drawn_modules()))


def test_the_drawing_arrows_are_the_imports() -> None:
    drawing = architecture()
    edges = drawing.import_edges()
    # direct imports are drawn; a transitive one (registry -> tau_core via losses) is not
    assert ("openclip_tau.registry", "openclip_tau.losses.sogclr") in edges
    assert ("tau_core.tiled", "tau_core.functional") in edges
    assert ("lightly_tau.registry", "lightly_tau.losses.sogclr") in edges
    assert ("openclip_tau.train.checks", "openclip_tau.key_index") in edges
    assert ("openclip_tau.train.training", "openclip_tau.train.errors") not in edges
    # the adapters reach the core through its public surfaces only
    # (and the three standard-library modules that command lines read before torch is loaded)
    surfaces = {
        "tau_core",
        "tau_core.adapter",
        "tau_core.lazy",
        "tau_core.options",
        "tau_core.registry_source",
    }
    into_core = {
        (a, b) for a, b in edges if b.startswith("tau_core") and not a.startswith("tau_core")
    }
    assert into_core and {b for _, b in into_core} <= surfaces, into_core
    # layers are defined: no module imports itself through others
    after: dict[str, set[str]] = {}
    for a, b in edges:
        after.setdefault(a, set()).add(b)

    def below(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in after.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [m for m in after if m in below(m)] == [], "import cycle"


def test_the_built_site_draws_the_tree(site: Path) -> None:
    drawing = (site / "images" / "architecture.svg").read_text()
    for module in architecture().drawn_modules():
        assert f"<title>{module}</title>" in drawing, module
    assert 'src="images/architecture.svg"' in (site / "design.html").read_text()


def test_every_name_of_the_training_wrapper_is_in_the_api_reference(site: Path) -> None:
    """``openclip_tau.train`` re-exports names of its modules; each has its entry there."""
    import openclip_tau.train

    page = (site / "api" / "openclip_tau.html").read_text()
    for name in openclip_tau.train.__all__:
        found = re.search(rf'id="openclip_tau\.(train\.\w+|registry|flags)\.{name}"', page)
        assert found or f'id="openclip_tau.{name}"' in page, name

"""The README stays one screen of facts: its two commands, its code taken from ``examples/``.

Nothing in the README is run here; every program it shows is a file in ``examples/`` that
``tests/test_examples.py`` runs. These tests check that the README's Python is verbatim lines of
those files and that its OpenCLIP command uses only flags of ``examples/openclip/train.sh``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()
EXAMPLES = REPO_ROOT / "examples"

COMMANDS = (
    "bash scripts/main_job.sh   # the main job",
    "bash scripts/test.sh       # the tests",
)


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def example_files() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(EXAMPLES.rglob("*")) if path.is_file()}


def is_contiguous_lines_of(block: str, text: str) -> bool:
    return ("\n" + block) in ("\n" + text) or text.startswith(block)


def test_readme_is_one_screen_and_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    assert len(lines) <= 200
    first_block = fenced_blocks(README, "bash")[0]
    for command in COMMANDS:
        assert command in first_block


def test_readme_python_is_verbatim_from_an_example() -> None:
    blocks = fenced_blocks(README, "python")
    assert blocks, "the README shows the Lightly swap"
    files = example_files()
    for block in blocks:
        sources = [path for path, text in files.items() if is_contiguous_lines_of(block, text)]
        assert sources, f"README block is not a run of lines of any example file:\n{block}"


def test_readme_openclip_command_uses_the_example_scripts_flags() -> None:
    script = (EXAMPLES / "openclip" / "train.sh").read_text()
    script_flags = set(re.findall(r"(--[a-z][a-z-]*)", script))
    (command,) = [b for b in fenced_blocks(README, "bash") if "openclip_tau.train" in b]
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    flags = {w for w in words if w.startswith("--")}
    assert {"--loss", "--tau-key-index", "--train-data"} <= flags
    assert flags - {"--shards", "--output"} <= script_flags, flags - script_flags


def test_readme_links_resolve() -> None:
    """Every link of the README that is not a web address names a file of the repository."""
    targets = [
        link.split("#")[0]
        for link in re.findall(r"\]\(([^)\s]+)\)", README)
        if not link.startswith(("http://", "https://", "#", "mailto:"))
    ]
    assert targets  # the README links into the documentation
    for target in targets:
        assert (REPO_ROOT / target).exists(), target

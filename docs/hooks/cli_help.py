"""mkdocs hook: the command-line reference is generated from the parsers themselves.

A page line ``<!-- cli-help: PROGRAM -->`` becomes a code block with the text that the program
prints for ``--help``. ``PROGRAM`` is a module (``openclip_tau.train``: its ``main(["--help"])``
is called) or a script path relative to the repository (``examples/lightly/simclr.py``: run as
``__main__`` with ``sys.argv = [path, "--help"]``). argparse prints the help and exits; the hook
captures what was printed, so the reference cannot drift from the options the programs accept.

Two more markers let a page name parts that may not exist in every checkout (they arrive with
other changes), without breaking the strict build where they are missing:

- ``<!-- api-if-present: MODULE -->`` becomes mkdocstrings' ``::: MODULE`` when the module exists;
- ``<!-- example-if-present: PATH -->`` becomes a Python block including that example file.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import sys
from pathlib import Path

MARKER = re.compile(r"^<!-- cli-help: ([\w./-]+) -->$", re.M)
API_MARKER = re.compile(r"^<!-- api-if-present: ([\w.]+) -->$", re.M)
EXAMPLE_MARKER = re.compile(r"^<!-- example-if-present: ([\w./-]+) -->$", re.M)
ROOT = Path(__file__).resolve().parents[2]


def _run(program: str) -> None:
    if program.endswith(".py"):
        argv = sys.argv
        sys.argv = [program, "--help"]
        try:
            runpy.run_path(str(ROOT / program), run_name="__main__")
        finally:
            sys.argv = argv
    else:
        module = importlib.import_module(program)
        if hasattr(module, "main"):
            module.main(["--help"])
        else:  # a parser module whose command runs elsewhere (recipes.longtail.cli)
            module.build_parser().parse_args(["--help"])


def help_text(program: str) -> str:
    """What ``program --help`` prints on stdout."""
    buffer = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same width every build
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            _run(program)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    text = buffer.getvalue().strip()
    if not text:
        raise RuntimeError(f"{program} --help printed nothing")
    return text


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    def block(match: re.Match[str]) -> str:
        return f"```text\n{help_text(match.group(1))}\n```"

    def api(match: re.Match[str]) -> str:
        try:
            found = importlib.util.find_spec(match.group(1)) is not None
        except ModuleNotFoundError:
            found = False
        return f"::: {match.group(1)}" if found else ""

    def example(match: re.Match[str]) -> str:
        path = match.group(1)
        if not (ROOT / path).is_file():
            return ""
        return f'`{path}`:\n\n```python\n--8<-- "{path}"\n```'

    markdown = API_MARKER.sub(api, markdown)
    markdown = EXAMPLE_MARKER.sub(example, markdown)
    return MARKER.sub(block, markdown)

"""Names of a package that load on first use (PEP 562), read from its ``if TYPE_CHECKING:`` block.

One list serves type checkers, the documentation and the run: the block's imports. A package
whose names pull in torch can so be imported by a command line that only parses its options.
Only the standard library is used.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name that its ``if TYPE_CHECKING:``
    block imports (``from module import name``) is imported from there at first use, then kept
    as a plain attribute.

    Args:
        package: The package's ``__name__`` (its module must be loading or loaded).

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` functions.

    Example (a package's ``__init__.py``)::

        from typing import TYPE_CHECKING

        from tau_core.lazy import lazy_exports

        if TYPE_CHECKING:
            from tau_core.state import PerSampleState

        __all__ = ["PerSampleState"]
        __getattr__, __dir__ = lazy_exports(__name__)
    """
    module = sys.modules[package]
    homes = type_checking_imports(Path(module.__file__))  # type: ignore[arg-type]

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(module, name, value)  # the next access is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *homes})

    return __getattr__, __dir__


def type_checking_imports(path: Path) -> dict[str, str]:
    """``name -> module`` of the ``from module import name`` statements under the top-level
    ``if TYPE_CHECKING:`` blocks of the file at ``path``."""
    homes: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    for alias in statement.names:
                        homes[alias.asname or alias.name] = statement.module
    return homes

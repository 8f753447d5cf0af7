"""A host's loss registry as a command line sees it, read without importing torch.

``--help`` lists every loss and its options, which a registry (``<package>.registry``, a dict
``LOSSES`` of loss name to class, or to an entry whose first argument is the class) reads from
the classes' signatures; importing the classes costs seconds (torch). So, unless the registry is
loaded already, its source is read instead: the names of ``LOSSES``, the class each one names,
and that class's ``__init__`` signature and docstring, turned into a bodiless class from which
:func:`tau_core.options.class_options` derives the options exactly as from the class itself. A
registry already imported (a loss added at run time, a command that runs) is read as it is.

Only the standard library is used (``tau_core``'s names load on first use).

Examples:
    >>> from tau_core import registry_source
    >>> registry_source.loss_options("lightly_tau")["isogclr"]["rho"].default
    0.3
"""

from __future__ import annotations
import __future__

import ast
import copy
import functools
import importlib.util
import sys
import typing
from pathlib import Path
from typing import Any

from tau_core import options

__all__ = ["class_options", "constant", "loss_classes", "loss_options"]


def _source(module: str) -> tuple[Path, ast.Module]:
    """The file and syntax tree of ``module`` (``package.name``), without importing either."""
    package, _, name = module.partition(".")
    spec = importlib.util.find_spec(package)  # a top-level package is found, not run
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {package} is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder.joinpath(*name.split("."))  # name "": the package itself
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")  # a (sub)package
    return path, ast.parse(path.read_text(), str(path))


def _registry_tree(package: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``loss name -> class import path`` of ``package``'s ``LOSSES``, and its module constants."""
    _, tree = _source(f"{package}.registry")
    imported = {
        alias.asname or alias.name: f"{node.module}:{alias.name}"
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    entries, constants = {}, {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if not isinstance(target, ast.Name) or node.value is None:  # type: ignore[attr-defined]
            continue
        value = node.value  # type: ignore[attr-defined]
        if target.id == "LOSSES":
            for key, entry in zip(value.keys, value.values):
                cls = entry.args[0] if isinstance(entry, ast.Call) else entry  # LossSpec(Cls)
                entries[ast.literal_eval(key)] = imported[cls.id]
        else:
            try:
                constants[target.id] = ast.literal_eval(value)
            except ValueError:
                pass
    if not entries:
        raise LookupError(f"{package}.registry has no LOSSES literal")
    return entries, constants


def _class_stub(import_path: str) -> type:
    """A class with the signature (defaults, annotations) and docstring of ``import_path``'s
    ``__init__``, and no body: what :func:`class_options` reads."""
    module, _, name = import_path.partition(":")
    path, tree = _source(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    if node is None:  # a name a package's __init__ imports from the module defining it
        origin = next(
            f"{n.module}:{alias.name}"
            for n in tree.body
            if isinstance(n, ast.ImportFrom) and n.module and not n.level
            for alias in n.names
            if (alias.asname or alias.name) == name
        )
        return _class_stub(origin)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    stub = copy.deepcopy(init)
    stub.body, stub.decorator_list, stub.returns = [ast.Pass()], [], None
    code = compile(
        ast.fix_missing_locations(ast.Module(body=[stub], type_ignores=[])),
        str(path),
        "exec",
        flags=__future__.annotations.compiler_flag,
        dont_inherit=True,
    )
    namespace: dict[str, Any] = dict(vars(typing))
    exec(code, namespace)  # defines __init__: its defaults are literals of the source
    doc = ast.get_docstring(node)
    return type(name, (), {"__init__": namespace["__init__"], "__doc__": doc, "__module__": module})


@functools.cache
def _from_source(package: str) -> tuple[dict[str, type], dict[str, Any]]:
    entries, constants = _registry_tree(package)
    return {n: _class_stub(p) for n, p in entries.items()}, constants


def _read(package: str) -> tuple[dict[str, type], dict[str, Any]]:
    live = sys.modules.get(f"{package}.registry")
    if live is None:
        try:
            return _from_source(package)
        except Exception:  # a registry written differently: slower, but the same answer
            live = importlib.import_module(f"{package}.registry")
    classes = {name: getattr(entry, "cls", entry) for name, entry in live.LOSSES.items()}
    return classes, vars(live)


def loss_classes(package: str) -> dict[str, type]:
    """``loss name -> class`` of ``package``'s registry, in its order: the classes themselves
    when the registry is loaded, else classes with their ``__init__`` signatures and docstrings
    and no body (enough for :mod:`tau_core.options`, not to build a loss)."""
    return _read(package)[0]


def loss_options(package: str) -> dict[str, dict[str, options.LossOption]]:
    """``loss name -> {keyword: LossOption}`` of ``package``'s registry, in its order."""
    return {name: options.class_options(cls) for name, cls in loss_classes(package).items()}


def constant(package: str, name: str) -> Any:
    """A literal module constant of ``package``'s registry (e.g. ``UPSTREAM_LOSSES``)."""
    return _read(package)[1][name]


def class_options(import_path: str) -> dict[str, options.LossOption]:
    """The options of class ``module:Name`` read from its source (imported if that fails)."""
    try:
        return options.class_options(_class_stub(import_path))
    except Exception:  # a signature that is not literal: read the class itself
        module, _, name = import_path.partition(":")
        return options.class_options(getattr(importlib.import_module(module), name))

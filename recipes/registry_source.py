"""The adapters' loss registries as the command lines see them, read without importing torch.

``--help`` has to list every loss and its options, which the registries read from the loss
classes' signatures; importing the classes costs seconds (torch). So, unless the registry is
loaded already, its source is read instead: the names of ``LOSSES`` (``lightly_tau/registry.py``,
``openclip_tau/registry.py``), the class each one names, and that class's ``__init__`` signature
and docstring, from which :func:`tau_core.options.class_options` derives the options exactly as
for the class itself (tests/test_fast_help.py checks that both give the same options). A
registry already imported (a loss added at run time, a command that runs) is read as it is.
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
from types import ModuleType
from typing import Any

HOSTS = ("lightly_tau", "openclip_tau")


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


def _options_module() -> ModuleType:
    """``tau_core.options`` (standard library only), loaded from its file when ``tau_core``,
    whose package imports torch, is not loaded yet."""
    if "tau_core.options" in sys.modules:
        return sys.modules["tau_core.options"]
    path, _ = _source("tau_core.options")
    spec = importlib.util.spec_from_file_location("recipes._tau_core_options", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _registry_tree(host: str) -> tuple[dict[str, str], dict[str, Any]]:
    """``loss name -> class import path`` of ``host``'s ``LOSSES``, and its module constants."""
    _, tree = _source(f"{host}.registry")
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
        raise LookupError(f"{host}.registry has no LOSSES literal")
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
def _from_source(host: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    entries, constants = _registry_tree(host)
    class_options = _options_module().class_options
    return {n: class_options(_class_stub(p)) for n, p in entries.items()}, constants


def class_options(import_path: str) -> dict[str, Any]:
    """The options of class ``module:Name`` read from its source (imported if that fails)."""
    try:
        return _options_module().class_options(_class_stub(import_path))
    except Exception:  # a signature that is not literal: read the class itself
        module, _, name = import_path.partition(":")
        cls = getattr(importlib.import_module(module), name)
        return importlib.import_module("tau_core.options").class_options(cls)


def _read(host: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    live = sys.modules.get(f"{host}.registry")
    if live is None:
        try:
            return _from_source(host)
        except Exception:  # a registry written differently: slower, but the same answer
            live = importlib.import_module(f"{host}.registry")
    return {name: live.options(name) for name in live.LOSSES}, vars(live)


def loss_options(host: str) -> dict[str, dict[str, Any]]:
    """``loss name -> {keyword: LossOption}`` of ``host``'s registry, in its order."""
    return _read(host)[0]


def constant(host: str, name: str) -> Any:
    """A literal module constant of ``host``'s registry (e.g. ``UPSTREAM_LOSSES``)."""
    return _read(host)[1][name]

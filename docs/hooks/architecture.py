"""The architecture drawing of the design page, generated from the source tree.

Which modules are drawn, and in which package box, is declared in :data:`PACKAGES`; who imports
whom is read from the modules' import statements (``ast``, nothing is imported), so the arrows
cannot drift from the code. An arrow implied by two others (a imports b, b imports c: the arrow
a to c) is left out, so the drawing shows each layer's direct neighbours only.

As an mkdocs hook it adds ``images/architecture.svg`` to the site; run as a script it writes the
drawing to the path given (``python docs/hooks/architecture.py out.svg``).
"""

from __future__ import annotations

import ast
import html
import sys
from pathlib import Path

from tau_core.lazy import type_checking_imports

ROOT = Path(__file__).resolve().parents[2]
TARGET = "images/architecture.svg"

# The adapters' losses, one module each (lightly_tau/losses/, openclip_tau/losses/).
LOSS_MODULES = ("sogclr", "isogclr", "rgclg", "tempnet", "dystress")

# Package box -> (title, fill, stroke, modules); a module is a dotted name, a folder of scripts
# ("recipes", "examples") one node. tau_core's own name is its public API (its __init__).
PACKAGES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "users": (
        "programs: examples/ and recipes/ (one node per folder)",
        "#f3f3f3",
        "#999",
        ("examples", "recipes"),
    ),
    "lightly_tau": (
        "lightly_tau: the Lightly adapter",
        "#e8eaf6",
        "#3f51b5",
        tuple(
            f"lightly_tau.{m}"
            for m in (
                "registry",
                "lightning",
                *(f"losses.{loss}" for loss in (*LOSS_MODULES, "unimodal")),
                "data",
            )
        ),
    ),
    "openclip_tau": (
        "openclip_tau: the OpenCLIP adapter and python -m openclip_tau.train",
        "#e8f5e9",
        "#2e7d32",
        tuple(
            f"openclip_tau.{m}"
            for m in (
                *(
                    f"train.{t}"
                    for t in (
                        "training",
                        "patches",
                        "checks",
                        "checkpoint",
                        "monitoring",
                        "options",
                        "errors",
                        "command",
                    )
                ),
                "registry",
                "flags",
                *(f"losses.{loss}" for loss in (*LOSS_MODULES, "image_text")),
                "data",
                "key_index",
            )
        ),
    ),
    "tau_core": (
        "tau_core: the losses (imports torch only)",
        "#fff8e1",
        "#f57f17",
        (
            "tau_core",
            "tau_core.adapter",
            "tau_core.options",
            "tau_core.registry_source",
            "tau_core.lazy",
            "tau_core.global_contrastive",
            "tau_core.dystress",
            "tau_core.losses",
            "tau_core.blocks",
            "tau_core.global_temperature",
            "tau_core.temperature_network",
            "tau_core.trained",
            "tau_core.temperature",
            "tau_core.tiled",
            "tau_core.functional",
            *(
                f"tau_core.state.{m}"
                for m in (
                    "base",
                    "replicated",
                    "sharded",
                    "exchange",
                    "checkpoint",
                    "memory",
                    "layouts",
                )
            ),
            "tau_core.device",
            "tau_core.distributed",
            "tau_core.checks",
        ),
    ),
}
LIBRARY = ("tau_core", "lightly_tau", "openclip_tau")
FOLDERS = ("examples", "recipes")


def drawn_modules() -> list[str]:
    """Every node of the drawing, in box order."""
    return [m for _, _, _, modules in PACKAGES.values() for m in modules]


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the three packages (``pkg/__init__.py``: ``pkg``)."""
    found = {}
    for package in LIBRARY:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _node(name: str, nodes: set[str]) -> str | None:
    """The drawn node of a module (itself), or None for a module the drawing leaves out."""
    return name if name in nodes else None


def _statements(tree: ast.AST, lazy: bool = False):  # noqa: ANN202 - a generator of ast nodes
    """Every import statement, except those under ``if TYPE_CHECKING:`` (not run) unless the
    module is ``lazy`` (a package whose ``__getattr__`` imports those names at first use)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            if lazy:
                yield from _statements(node, lazy)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _statements(node, lazy)


def _is_lazy(tree: ast.Module) -> bool:
    """Whether a module defines ``__getattr__`` (PEP 562): its TYPE_CHECKING imports are the
    names it loads on first use."""

    def defines(node: ast.stmt) -> bool:  # def __getattr__, or __getattr__, ... = lazy_exports()
        if isinstance(node, ast.FunctionDef):
            return node.name == "__getattr__"
        targets = node.targets if isinstance(node, ast.Assign) else []
        names = [t for target in targets for t in getattr(target, "elts", [target])]
        return any(getattr(t, "id", "") == "__getattr__" for t in names)

    return any(defines(node) for node in tree.body)


def _imported(path: Path, modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(module, name) of each project import of ``path``; name "" for ``import module``.

    ``from pkg import sub`` of a submodule gives (``pkg.sub``, "").
    """
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for statement in _statements(tree, _is_lazy(tree)):
        if isinstance(statement, ast.Import):
            found.update((a.name, "") for a in statement.names)
        elif statement.module and not statement.level:
            for alias in statement.names:
                sub = f"{statement.module}.{alias.name}"
                found.add((sub, "") if sub in modules else (statement.module, alias.name))
    return {(m, n) for m, n in found if m.split(".")[0] in LIBRARY}


def _reexports(modules: dict[str, Path]) -> dict[str, str]:
    """``pkg.Name`` -> the module it is imported from, for the names of each ``__init__``."""
    table = {}
    for package, path in modules.items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for statement in tree.body:
            if isinstance(statement, ast.ImportFrom) and statement.module:
                for alias in statement.names:
                    table[f"{package}.{alias.asname or alias.name}"] = statement.module
        if _is_lazy(tree):  # the names it loads on first use, read as tau_core.lazy reads them
            for name, module in type_checking_imports(path).items():
                table[f"{package}.{name}"] = module
    return table


def import_edges(root: Path = ROOT) -> set[tuple[str, str]]:
    """(importer, imported) between drawn nodes, transitive ones left out.

    A name imported from a package is an arrow to the module that defines it, except that a
    name of ``tau_core`` imported from outside the core is an arrow to its public API.
    """
    modules = source_modules(root)
    nodes = set(drawn_modules())
    reexports = _reexports(modules)
    files = {name: [path] for name, path in modules.items()}
    for folder in FOLDERS:
        files[folder] = sorted((root / folder).rglob("*.py"))
    edges = set()
    for name, paths in files.items():
        source = _node(name, nodes)
        if source is None or (source != name and modules[name].name == "__init__.py"):
            continue  # a subpackage's __init__ only gathers its names (tau_core's is drawn)
        for path in paths:
            for module, imported in _imported(path, modules):
                outside = module.split(".")[0] != name.split(".")[0]
                while imported and not (outside and module in nodes):
                    origin = reexports.get(f"{module}.{imported}")
                    if origin is None:
                        break
                    module = origin
                node = _node(module, nodes)
                if node and node != source:
                    edges.add((source, node))
    return _transitive_reduction(edges)


def _transitive_reduction(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges a -> b such that b cannot be reached from a through another module."""
    after: dict[str, set[str]] = {}
    for a, b in edges:
        after.setdefault(a, set()).add(b)

    def below(start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in after.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return {(a, b) for a, b in edges if not any(b in below(o) for o in after[a] - {b})}


# ------------------------------------------------------------------ layout and drawing
BOX_H, ROW_GAP, COL_GAP, PAD, FONT = 24, 26, 10, 14, 12


def _label(module: str) -> str:
    if module in FOLDERS:
        return f"{module}/"
    if module == "tau_core":
        return "tau_core (public API)"
    package, _, rest = module.partition(".")
    return rest.replace(".", "/") + ".py"


def _width(module: str) -> int:
    return 16 + int(len(_label(module)) * FONT * 0.6)


def _layers(modules: tuple[str, ...], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Rows of one box: a module sits below every module of the box that imports it."""
    inside = set(modules)
    depth = {m: 0 for m in modules}
    for _ in modules:  # longest path from the box's top (the graph has no cycles)
        for a, b in edges:
            if a in inside and b in inside:
                depth[b] = max(depth[b], depth[a] + 1)
    rows: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for m in modules:
        rows[depth[m]].append(m)
    return rows


def _wrapped(rows: list[list[str]], width: float) -> list[list[str]]:
    """Rows wider than ``width`` split into several (in order)."""
    out: list[list[str]] = []
    for row in rows:
        line: list[str] = []
        for m in row:
            if line and sum(_width(n) + COL_GAP for n in [*line, m]) - COL_GAP > width:
                out.append(line)
                line = []
            line.append(m)
        out.append(line)
    return out


def layout(edges: set[tuple[str, str]], width: int = 1000) -> dict[str, tuple[float, float]]:
    """Top-left corner of each module's box; the packages' boxes as ``box:<name>`` (x, y, w, h)."""
    place: dict[str, tuple[float, float]] = {}
    boxes = {}
    y = 10.0
    # users on top, the adapters side by side, the core below
    bands = [("users",), ("lightly_tau", "openclip_tau"), ("tau_core",)]
    for band in bands:
        share = {"lightly_tau": 0.34, "openclip_tau": 0.66}
        x, bottom = 10.0, y
        for name in band:
            _, _, _, modules = PACKAGES[name]
            w = (width - 20 - COL_GAP * (len(band) - 1)) * share.get(name, 1.0)
            rows = _wrapped(_layers(modules, edges), w - 2 * PAD)
            top = y + 34
            for r, row in enumerate(rows):
                # fewer crossings: each module under the mean of the modules that import it
                order = {m: x + w * (i + 0.5) / len(row) for i, m in enumerate(row)}
                for m in row:
                    above = [place[a][0] + _width(a) / 2 for a, b in edges if b == m and a in place]
                    if above:
                        order[m] = sum(above) / len(above)
                row.sort(key=order.__getitem__)
                total = sum(_width(m) for m in row) + COL_GAP * (len(row) - 1)
                cx = x + (w - total) / 2
                for m in row:
                    place[m] = (cx, top + r * (BOX_H + ROW_GAP))
                    cx += _width(m) + COL_GAP
            h = 34 + len(rows) * (BOX_H + ROW_GAP) - ROW_GAP + PAD
            boxes[name] = (x, y, w, h)
            bottom = max(bottom, y + h)
            x += w + COL_GAP
        for name in band:
            bx, by, bw, _ = boxes[name]
            boxes[name] = (bx, by, bw, bottom - by)
        y = bottom + 34
    place.update({f"box:{k}": v for k, v in boxes.items()})  # type: ignore[misc]
    return place


def svg(root: Path = ROOT, width: int = 1000) -> str:
    """The drawing of the tree at ``root``."""
    edges = import_edges(root)
    place = layout(edges, width)
    height = max(v[1] + v[3] for k, v in place.items() if k.startswith("box:")) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height:.0f}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="{FONT}">',
        "<title>lightly-tau's modules and who imports whom (arrows: imports)</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#666"/></marker></defs>',
    ]
    for name, (title, fill, stroke, _) in PACKAGES.items():
        x, y, w, h = place[f"box:{name}"]
        out.append(
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="8" '
            f'fill="{fill}" stroke="{stroke}"/>'
        )
        out.append(
            f'<text x="{x + 10:.0f}" y="{y + 19:.0f}" font-weight="bold">{html.escape(title)}</text>'
        )
    for a, b in sorted(edges):
        (ax, ay), (bx, by) = place[a], place[b]
        x1, y1 = ax + _width(a) / 2, ay + BOX_H
        x2, y2 = bx + _width(b) / 2, by
        bend = max(20.0, (y2 - y1) / 2)
        out.append(
            f'<path d="M {x1:.0f} {y1:.0f} C {x1:.0f} {y1 + bend:.0f} {x2:.0f} {y2 - bend:.0f} '
            f'{x2:.0f} {y2 - 1:.0f}" fill="none" stroke="#666" stroke-opacity="0.55" '
            'stroke-width="1.2" marker-end="url(#arrow)"/>'
        )
    for _, _, stroke, modules in PACKAGES.values():
        for m in modules:
            x, y = place[m]
            out.append(
                f'<g><title>{m}</title><rect x="{x:.0f}" y="{y:.0f}" width="{_width(m)}" '
                f'height="{BOX_H}" rx="4" fill="#fff" stroke="{stroke}"/>'
                f'<text x="{x + _width(m) / 2:.0f}" y="{y + 16:.0f}" text-anchor="middle" '
                f'font-family="Menlo, Consolas, monospace">{html.escape(_label(m))}</text></g>'
            )
    out.append(
        f'<text x="10" y="{height - 10:.0f}" fill="#555">An arrow from a to b: a imports b '
        "(read from the source; an arrow implied by two others is left out).</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def on_files(files, config, **kwargs):  # noqa: ANN001, ANN201 - mkdocs' hook signature
    from mkdocs.structure.files import File

    files.append(File.generated(config, TARGET, content=svg()))
    return files


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(svg(Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT))

"""A loss class's hyperparameters read from its signature and docstring (for the adapters'
registries and the command lines built from them).

Only the standard library is used, so a registry can describe its losses without building one.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Iterable, Optional

STATE_LAYOUTS = ("replicated", "sharded")
"""The values of a stateful loss's ``state_layout`` keyword (see :func:`tau_core.make_state`)."""

__all__ = [
    "PLUMBING",
    "STATE_LAYOUTS",
    "LossOption",
    "class_options",
    "docstring_help",
    "signature_keywords",
    "takes_index",
    "temperature_bounds",
]

# Keywords a host or a training loop sets, never a user's hyperparameter.
PLUMBING = frozenset(
    {
        "num_samples",
        "dim",
        "gather_distributed",
        "state_layout",
        "local_loss",
        "gather_with_grad",
        "rank",
        "world_size",
    }
)


@dataclasses.dataclass(frozen=True)
class LossOption:
    """One hyperparameter of a loss class.

    Attributes:
        name: The constructor's keyword.
        kind: Its type (``float``, ``int``, ...; ``Optional[X]`` gives ``X``).
        default: The constructor's default.
        optional: Whether None is allowed (the feature switched off).
        help: The docstring's text for it, without its "Default ..." sentence.
    """

    name: str
    kind: type
    default: Any
    optional: bool
    help: str


def _kind(annotation: Any, default: Any) -> tuple[type, bool]:
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 and isinstance(rest[0], type) else str), True
    if isinstance(annotation, type):
        return annotation, False
    return (type(default) if default is not None else str), default is None


_ENTRY = re.compile(r"^(\s*)([A-Za-z_][\w, ]*):\s*(.*)$")


def docstring_help(cls: type) -> dict[str, str]:
    """``keyword -> text`` from the ``Attributes:`` (or ``Args:``) section of ``cls``'s docstring.

    An entry ``tau_min, tau_max: text`` gives the text to both names; the sentences starting with
    "Default" are left out (a command line shows the signature's default instead).
    """
    lines = inspect.getdoc(cls) or ""
    found: dict[str, str] = {}
    section, indent, current = False, None, None
    for line in lines.splitlines():
        if line.strip() in ("Attributes:", "Args:"):
            section, indent, current = True, None, None
            continue
        if not section:
            continue
        if line and not line[0].isspace():
            section = False
            continue
        match = _ENTRY.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            current = [n.strip() for n in match.group(2).split(",")]
            for name in current:
                found[name] = match.group(3).strip()
        elif current and line.strip():
            for name in current:
                found[name] += " " + line.strip()
    return {name: _without_default(text) for name, text in found.items()}


def _without_default(text: str) -> str:
    sentences = re.split(r"(?<=\.)\s+", text)
    kept = [s for s in sentences if not s.startswith(("Default", "Required"))]
    return " ".join(kept).rstrip(".")


def class_options(cls: type, skip: Iterable[str] = PLUMBING) -> dict[str, LossOption]:
    """The keyword hyperparameters of ``cls.__init__`` (those with a default, less ``skip``)."""
    skip = set(skip)
    hints = typing.get_type_hints(cls.__init__)
    texts = docstring_help(cls)
    options = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in skip or param.default is inspect.Parameter.empty or name == "self":
            continue
        kind, optional = _kind(hints.get(name), param.default)
        options[name] = LossOption(name, kind, param.default, optional, texts.get(name, ""))
    return options


def signature_keywords(cls: type) -> frozenset[str]:
    """Every keyword ``cls.__init__`` accepts."""
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self"}


def takes_index(cls: type) -> bool:
    """Whether ``cls`` keeps per-sample state: it takes ``num_samples`` (and, at each call, the
    batch's dataset indices)."""
    return "num_samples" in signature_keywords(cls)


def temperature_bounds(cls: type, values: Optional[dict[str, Any]] = None) -> tuple[float, float]:
    """The range ``cls``'s temperatures stay in, for the given keyword values (else the defaults):
    ``[tau_min, tau_max]``, or ``[temperature, temperature]`` for a fixed temperature."""
    values = dict(values or {})
    defaults = {n: o.default for n, o in class_options(cls, skip=()).items()}
    merged = {**defaults, **values}
    if "tau_min" in merged and "tau_max" in merged:
        return float(merged["tau_min"]), float(merged["tau_max"])
    if "temperature" in merged:
        return float(merged["temperature"]), float(merged["temperature"])
    raise ValueError(f"{cls.__name__} has neither tau_min/tau_max nor temperature.")

"""The ``--tau-*`` flags of a set of loss classes: their names, types and help texts.

Read from the classes' signatures and docstrings (:func:`tau_core.options.class_options`), with
the standard library only, so that ``python -m openclip_tau.train --help`` can describe the
losses of :mod:`openclip_tau.registry` without importing them (through
:func:`tau_core.registry_source.loss_classes`).

Examples:
    >>> from openclip_tau import flags
    >>> flags.option_dest("lr_tau"), flags.option_dest("rho"), flags.option_flag("tau_min")
    ('tau_lr', 'tau_rho', '--tau-min')
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from tau_core.options import class_options

# Keyword -> option name where "tau_" + keyword would read badly.
_OPTION_NAMES = {"lr_tau": "tau_lr", "num_prototypes": "tau_prototypes"}

FlagTable = dict[str, tuple[str, Callable[[str], Any], str]]
"""``dest -> (keyword, type, help)``, as :func:`loss_options` gives it."""


def option_dest(keyword: str) -> str:
    """The ``--tau-*`` option of a keyword, as an argparse dest (``rho`` -> ``tau_rho``)."""
    if keyword in _OPTION_NAMES:
        return _OPTION_NAMES[keyword]
    if keyword.startswith("lr_tau_"):
        return "tau_lr_" + keyword[len("lr_tau_") :]
    return keyword if keyword.startswith("tau_") else "tau_" + keyword


def option_flag(dest: str) -> str:
    """The command-line flag of an option's ``dest``: ``tau_min`` gives ``--tau-min``."""
    return "--" + dest.replace("_", "-")


def float_or_off(text: str) -> float:
    """A float option where ``0``, ``none`` or ``off`` switch the feature off (read as 0.0)."""
    if text.strip().lower() in ("none", "off"):
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def loss_options(classes: Mapping[str, type]) -> FlagTable:
    """``dest -> (keyword, type, help)`` for every hyperparameter of ``classes`` (name -> class).

    The first class (in ``classes`` order) whose docstring describes a keyword gives its help
    text. A float that may be None (switched off) reads ``0``, ``none`` or ``off`` as off.
    """
    table: FlagTable = {}
    for cls in classes.values():
        for keyword, option in class_options(cls).items():
            dest = option_dest(keyword)
            if dest in table and table[dest][2]:
                continue
            kind: Callable[[str], Any] = option.kind
            if option.optional and option.kind is float:
                kind = float_or_off
            text = option.help
            if kind is float_or_off:
                text += " (0 or none: off)"
            table[dest] = (keyword, kind, text)
    return table


def off_at_zero(table: FlagTable) -> tuple[str, ...]:
    """Keywords of ``table`` whose option value 0 means None (the feature switched off)."""
    return tuple(kw for kw, kind, _ in table.values() if kind is float_or_off)

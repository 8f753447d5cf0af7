"""The losses of ``openclip_tau`` by name, and their ``--tau-*`` options read from the classes.

Adding a loss is one entry of :data:`LOSSES`: ``python -m openclip_tau.train --loss NAME`` and
the recipes then offer it, with one ``--tau-*`` option per hyperparameter of its constructor
(type and default from the signature, help text from the docstring's ``Attributes:``).

Examples:
    >>> from openclip_tau import registry
    >>> registry.LOSS_OPTIONS["tau_rho"][0]
    'rho'
    >>> registry.options("isogclr")["rho"].default
    6.0
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from openclip_tau.losses import (
    DySTreSSClipLoss,
    ISogCLRClipLoss,
    RGCLGClipLoss,
    SogCLRClipLoss,
    TempNetClipLoss,
)
from tau_core.options import LossOption, class_options, signature_keywords

LOSSES: dict[str, type] = {
    "sogclr": SogCLRClipLoss,
    "isogclr": ISogCLRClipLoss,
    "rgclg": RGCLGClipLoss,
    "tempnet": TempNetClipLoss,
    "dystress": DySTreSSClipLoss,
}
# Upstream's own losses, offered beside ours by openclip_tau.train.
UPSTREAM_LOSSES = ("clip", "siglip")

# Keyword -> option name where "tau_" + keyword would read badly.
_OPTION_NAMES = {"lr_tau": "tau_lr", "num_prototypes": "tau_prototypes"}

__all__ = [
    "LOSSES",
    "LossOption",
    "UPSTREAM_LOSSES",
    "float_or_off",
    "loss_choices",
    "loss_options",
    "option_dest",
    "options",
    "stateful_losses",
]


def options(name: str) -> dict[str, LossOption]:
    """The hyperparameters of loss ``name`` (keyword -> :class:`LossOption`)."""
    return class_options(LOSSES[name])


def option_dest(keyword: str) -> str:
    """The ``--tau-*`` option of a keyword, as an argparse dest (``rho`` -> ``tau_rho``)."""
    if keyword in _OPTION_NAMES:
        return _OPTION_NAMES[keyword]
    if keyword.startswith("lr_tau_"):
        return "tau_lr_" + keyword[len("lr_tau_") :]
    return keyword if keyword.startswith("tau_") else "tau_" + keyword


def float_or_off(text: str) -> float:
    """A float option where ``0``, ``none`` or ``off`` switch the feature off (read as 0.0)."""
    if text.strip().lower() in ("none", "off"):
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def loss_options() -> dict[str, tuple[str, Callable[[str], Any], str]]:
    """``dest -> (keyword, type, help)`` for every hyperparameter of the registered losses.

    The first loss (in :data:`LOSSES` order) whose docstring describes a keyword gives its help
    text. A float that may be None (switched off) reads ``0``, ``none`` or ``off`` as off.
    """
    table: dict[str, tuple[str, Callable[[str], Any], str]] = {}
    for name in LOSSES:
        for keyword, option in options(name).items():
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


def off_at_zero() -> tuple[str, ...]:
    """Keywords whose option value 0 means None (the feature switched off)."""
    return tuple(kw for kw, kind, _ in loss_options().values() if kind is float_or_off)


def stateful_losses() -> tuple[str, ...]:
    """The losses with a per-sample table indexed by the dataset index."""
    return tuple(n for n, cls in LOSSES.items() if "num_samples" in signature_keywords(cls))


def loss_choices() -> tuple[str, ...]:
    """Every ``--loss`` of ``openclip_tau.train``: upstream's and ours."""
    return (*UPSTREAM_LOSSES, *LOSSES)

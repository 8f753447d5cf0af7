"""The losses of ``lightly_tau`` by name, for command lines and configs.

Adding a loss is one entry of :data:`LOSSES`. Everything a command line needs is read from the
class: its hyperparameters with their types and defaults (the constructor's signature), their
help texts (the docstring's ``Attributes:`` section), whether it takes the dataset index
(``num_samples`` in the signature), whether it trains a temperature (``param_groups``), and the
range of its temperatures (``tau_min``/``tau_max`` or ``temperature``).

Examples:
    >>> from lightly_tau import registry
    >>> registry.options("isogclr")["rho"].default
    0.3
    >>> loss = registry.build("isogclr", num_samples=len(dataset), rho=0.4)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from lightly_tau.losses import DySTreSSLoss, ISogCLRLoss, RGCLGLoss, SogCLRLoss, TempNetLoss
from tau_core.adapter import LossOption, class_options, signature_keywords, takes_index
from tau_core.adapter import temperature_bounds as _class_bounds

LOSSES: dict[str, type] = {
    "sogclr": SogCLRLoss,
    "isogclr": ISogCLRLoss,
    "rgclg": RGCLGLoss,
    "tempnet": TempNetLoss,
    "dystress": DySTreSSLoss,
}

__all__ = [
    "LOSSES",
    "LossOption",
    "build",
    "loss_class",
    "option_users",
    "options",
    "temperature_bounds",
    "trains_temperature",
    "uses_index",
]


def loss_class(name: str) -> type:
    """The class registered as ``name`` (a clear error for an unknown name)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}.") from None


def options(name: str) -> dict[str, LossOption]:
    """The hyperparameters of loss ``name`` (keyword -> :class:`LossOption`)."""
    return class_options(loss_class(name))


def option_users(keyword: str, names: Optional[list[str]] = None) -> list[str]:
    """The losses (of ``names``, default all) that take hyperparameter ``keyword``."""
    return [n for n in (names or LOSSES) if keyword in options(n)]


def uses_index(name: str) -> bool:
    """Whether the loss keeps per-sample state (it takes ``num_samples`` and the batch's index)."""
    return takes_index(loss_class(name))


def trains_temperature(name: str) -> bool:
    """Whether the loss has temperature parameters for an optimizer (``param_groups``)."""
    return hasattr(loss_class(name), "param_groups")


def temperature_bounds(name: str, **values: Any) -> tuple[float, float]:
    """The range of the loss's temperatures with these hyperparameters (else its defaults)."""
    return _class_bounds(loss_class(name), values)


def build(
    name: str,
    num_samples: Optional[int] = None,
    *,
    dim: Optional[int] = None,
    gather_distributed: bool = False,
    state_layout: str = "replicated",
    **hyperparameters: Any,
) -> nn.Module:
    """Loss ``name`` with ``hyperparameters``; the host's settings go where the class takes them.

    Raises:
        ValueError: For an unknown name or a hyperparameter the loss does not take (naming the
            ones it takes), and for every value the class itself refuses.
    """
    cls = loss_class(name)
    unknown = sorted(set(hyperparameters) - set(options(name)))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} do not apply to loss {name!r}; it accepts "
            f"{', '.join(options(name))}."
        )
    accepted = signature_keywords(cls)
    host = {
        "num_samples": num_samples,
        "dim": dim,
        "gather_distributed": gather_distributed,
        "state_layout": state_layout,
    }
    kwargs = {k: v for k, v in host.items() if k in accepted}
    return cls(**kwargs, **hyperparameters)

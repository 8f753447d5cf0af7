"""The loss settings of the long-tailed comparison, one field per option (light: for ``--help``).

The recipe's own settings (Lightly's losses, the cosine schedule) and ``<loss>_<keyword>`` for
each hyperparameter of every loss of ``lightly_tau.registry``, with the class's default unless
:data:`RECIPE_DEFAULTS` has the recipe's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from tau_core.registry_source import loss_options

# Where the recipe's default differs from the class's: iSogCLR's rho and eta move the
# temperatures within a short run (see the report's eta note), DySTreSS the CIFAR recipe's 0.07.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "isogclr": {"rho": 0.4, "eta": 0.2},
    "dystress": {"tau_min": 0.07},
}
# Hyperparameters set by one of the recipe's shared options instead of a per-loss one.
SHARED: dict[str, dict[str, str]] = {"sogclr": {"temperature": "temperature"}}


@dataclass
class _RecipeLossSettings:
    """The recipe's own loss settings (Lightly's losses, the schedule, TempNet's input size)."""

    temperature: float = 0.1
    cosine_tau_min: float = 0.1
    cosine_tau_max: float = 1.0
    cosine_period_epochs: float = 3.0
    macl_temperature: float = 0.1
    macl_alpha: float = 0.5
    macl_a0: float = 0.0
    # Input size of TempNet's network: the projection head's output (set by the run).
    embedding_dim: int = 128

    def temperature_bounds(self, loss: str) -> tuple[float, float]:
        """The range every temperature of ``loss`` must stay in."""
        from recipes.longtail.losses import LOSS_REGISTRY

        return LOSS_REGISTRY[loss].bounds(self)  # type: ignore[arg-type]


def registry_losses() -> tuple[str, ...]:
    """The losses of ``lightly_tau.registry``, in its order (read without importing torch)."""
    return tuple(loss_options("lightly_tau"))


def registry_settings() -> dict[str, tuple[str, str, Any, Any]]:
    """``field -> (loss, keyword, option, default)`` for each hyperparameter of the registry."""
    fields = {}
    for name, options in loss_options("lightly_tau").items():
        for keyword, option in options.items():
            if keyword in SHARED.get(name, {}):
                continue
            default = RECIPE_DEFAULTS.get(name, {}).get(keyword, option.default)
            fields[f"{name}_{keyword}"] = (name, keyword, option, default)
    return fields


LossSettings = make_dataclass(
    "LossSettings",
    [
        (f, Optional[o.kind] if o.optional else o.kind, field(default=d))
        for f, (_, _, o, d) in registry_settings().items()
    ],
    bases=(_RecipeLossSettings,),
)
LossSettings.__doc__ = (
    "Settings of the losses (the report lists them with the results): the recipe's own, and "
    "``<loss>_<keyword>`` for each hyperparameter of lightly_tau's registry."
)
LossSettings.__module__ = __name__


def hyperparameters(name: str, settings: Any) -> dict[str, Any]:
    """The keywords of registry loss ``name`` from ``settings``."""
    shared = SHARED.get(name, {})
    keywords = loss_options("lightly_tau")[name]
    return {kw: getattr(settings, shared.get(kw, f"{name}_{kw}")) for kw in keywords}

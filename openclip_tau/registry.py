"""The losses of ``openclip_tau`` by name, and their ``--tau-*`` options read from the classes.

Adding a loss is one entry of :data:`LOSSES` (its class, and how the training run reads its
summary temperature): ``python -m openclip_tau.train --loss NAME`` and
the recipes then offer it, with one ``--tau-*`` option per hyperparameter of its constructor
(type and default from the signature, help text from the docstring's ``Attributes:``).

Examples:
    >>> from openclip_tau import registry
    >>> registry.loss_options()["tau_rho"][0]
    'rho'
    >>> registry.options("isogclr")["rho"].default
    6.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from torch import Tensor

from openclip_tau import flags
from openclip_tau.flags import FlagTable, float_or_off, option_dest
from openclip_tau.losses import (
    DySTreSSClipLoss,
    ISogCLRClipLoss,
    RGCLGClipLoss,
    SogCLRClipLoss,
    TempNetClipLoss,
)
from tau_core.adapter import LossOption, class_options, takes_index

Temperature = Union[float, Tensor]


def _loss_temperature(run: Any) -> Optional[Temperature]:
    return getattr(run.loss, "temperature", None)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One ``--loss`` choice of openclip_tau (an entry of :data:`LOSSES`).

    Attributes:
        cls: The loss class; built with the ``--tau-*`` keywords it accepts, ``rank``,
            ``world_size``, ``num_samples`` when stateful, and ``local_loss`` /
            ``gather_with_grad`` when its signature has them.
        temperature: ``run -> tau`` (float or 0-d tensor, or None when not known yet), with
            ``run`` the training run (``openclip_tau.train.LossTraining``): the summary
            temperature written into the model's ``logit_scale`` as ln(1/tau). Default: the
            loss's ``temperature`` attribute.
        temperature_rule: One line saying how that temperature is chosen (logged, documented).
        logit_scale: ``run -> ln(1/tau)`` as a tensor, copied into the model's ``logit_scale``
            instead of ``ln(1/temperature)`` when the loss keeps that parameter itself (RGCL-g).
    """

    cls: type
    temperature: Callable[[Any], Optional[Temperature]] = _loss_temperature
    temperature_rule: str = "1/the loss's temperature attribute"
    logit_scale: Optional[Callable[[Any], Tensor]] = None

    @property
    def stateful(self) -> bool:
        """Keeps a per-sample table indexed by the dataset index (``num_samples`` in the
        signature: needs indexed data, checkpointed state)."""
        return takes_index(self.cls)

    @property
    def trains_temperature(self) -> bool:
        """Whether the loss has temperature parameters stepped by the run's optimizer."""
        return hasattr(self.cls, "param_groups")


# Adding a loss is one entry here (its --tau-* options are its constructor's keywords).
LOSSES: dict[str, LossSpec] = {
    "sogclr": LossSpec(
        SogCLRClipLoss,
        temperature=lambda run: run.loss.temperature,
        temperature_rule="1/--tau-temperature",
    ),
    "isogclr": LossSpec(
        ISogCLRClipLoss,
        temperature=lambda run: run.table_median,
        temperature_rule="1/median of the per-sample temperatures of the visited rows, image and "
        "text tables pooled, recomputed at every epoch start and end",
    ),
    "dystress": LossSpec(
        DySTreSSClipLoss,
        # Until an epoch's first step the scale keeps its value (the last epoch's, also after a
        # resume); before the run's first step it is 1/tau_max.
        temperature=lambda run: run.stat_mean(
            "tau_positive_mean", run.option("tau_max") if run.epoch == 0 else None
        ),
        temperature_rule="1/mean temperature of the positive pairs over the epoch's steps so far "
        "(1/tau_max before the first step)",
    ),
    "rgclg": LossSpec(
        RGCLGClipLoss,
        temperature=lambda run: run.loss.temperature,
        temperature_rule="1/the learned global temperature (the loss's logit_scale, copied)",
        logit_scale=lambda run: run.loss.logit_scale.detach(),
    ),
    "tempnet": LossSpec(
        TempNetClipLoss,
        temperature=lambda run: run.table_median,
        temperature_rule="1/median of the temperatures predicted at the last visit of the "
        "visited rows, image and text tables pooled, recomputed at every epoch start and end "
        "(unchanged before the first visit)",
    ),
}
# Upstream's own losses, offered beside ours by openclip_tau.train.
UPSTREAM_LOSSES = ("clip", "siglip")

__all__ = [
    "LOSSES",
    "LossOption",
    "LossSpec",
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
    return class_options(LOSSES[name].cls)


def loss_options() -> FlagTable:
    """``dest -> (keyword, type, help)`` for every hyperparameter of the registered losses
    (:func:`openclip_tau.flags.loss_options` of their classes)."""
    return flags.loss_options({name: spec.cls for name, spec in LOSSES.items()})


def off_at_zero() -> tuple[str, ...]:
    """Keywords whose option value 0 means None (the feature switched off)."""
    return flags.off_at_zero(loss_options())


def stateful_losses() -> tuple[str, ...]:
    """The losses with a per-sample table indexed by the dataset index."""
    return tuple(n for n, spec in LOSSES.items() if spec.stateful)


def loss_choices() -> tuple[str, ...]:
    """Every ``--loss`` of ``openclip_tau.train``: upstream's and ours."""
    return (*UPSTREAM_LOSSES, *LOSSES)

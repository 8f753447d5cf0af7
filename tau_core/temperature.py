"""Temperature rules: what a global contrastive loss keeps per sample and how its temperature moves.

Every rule implements :class:`TemperatureRule`, the interface
:class:`tau_core.adapter.GlobalContrastiveLoss` asks for: which per-sample tables an anchor role
keeps, the temperature of a block's rows (``block_temperature``), and the next values of those
rows (``next_rows``). A rule whose temperature is trained by autograd (a learned global
temperature, a temperature network) sets ``trains_temperature``: the loss then adds
``mean_i tau_i * [grad_tau_i]_detached`` to the gradient (not the value), so the temperature's
parameters receive the robust objective's temperature gradient ``grad_tau_i`` pushed through
``tau_i`` by the chain rule. Tables of an anchor role are named ``<table><suffix>``: suffix ``""``
for the unimodal losses, ``"_image"`` and ``"_text"`` for the image-text ones. SogCLR and iSogCLR
differ only in their rule; the forward is written once.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from tau_core.checks import check_number, check_temperature_range
from tau_core.functional import temperature_step


class FixedTemperature:
    """SogCLR's temperature: one global value; per sample only ``log(u)`` is kept.

    Args:
        temperature: The global temperature, > 0.

    Raises:
        ValueError: If ``temperature`` is not a positive number.
    """

    learns = False
    trains_temperature = False
    rho = 0.0

    def __init__(self, temperature: float) -> None:
        self.temperature = check_number("temperature", temperature, 0.0, low_open=True)

    def initial_values(self) -> dict[str, float]:
        """Per-sample tables of an anchor role and their initial values."""
        return {"log_u": -math.inf}

    def block_temperature(
        self, rows: dict[str, Tensor], suffix: str, views: int, anchors: Optional[Tensor]
    ) -> Tensor:
        """Temperature of each row of a block (``views`` rows per sample)."""
        return torch.full_like(rows["log_u" + suffix], self.temperature).repeat(views)

    def next_rows(
        self, rows: dict[str, Tensor], log_u: Tensor, grad_tau: Tensor, suffix: str = ""
    ) -> dict[str, Tensor]:
        return {"log_u" + suffix: log_u}


class FixedTemperatureMixin:
    """The ``temperature`` of a loss whose rule (``self.settings``) is a
    :class:`FixedTemperature` (SogCLR on either host): read, and set to a new rule with the same
    checks, e.g. by a schedule between steps."""

    settings: FixedTemperature

    @property
    def temperature(self) -> float:
        """The global temperature (settable, e.g. by a schedule)."""
        return self.settings.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.settings = FixedTemperature(value)


class LearnedTemperature:
    """iSogCLR's temperature: one per sample, learned by a momentum step (validated settings).

    Same interface as :class:`FixedTemperature`; per sample it keeps ``log(u)``, ``tau`` and the
    momentum. The update is :func:`tau_core.temperature_step`.

    Args:
        rho: KL radius, >= 0.
        tau_init: Initial temperature, in ``[tau_min, tau_max]``.
        tau_min: Lower bound of the temperatures, > 0.
        tau_max: Upper bound of the temperatures, >= ``tau_min``.
        eta: Step size, >= 0.
        beta: Weight of the new gradient in the momentum, in (0, 1].
        tau_grad_clip: Bound of the temperature gradient, > 0.

    Raises:
        ValueError: If a setting lies outside its range (the message names it and the range).
    """

    learns = True
    trains_temperature = False

    def __init__(
        self,
        rho: float,
        tau_init: float,
        tau_min: float,
        tau_max: float,
        eta: float,
        beta: float,
        tau_grad_clip: float,
    ) -> None:
        self.rho = check_number("rho", rho, 0.0)
        self.tau_min, self.tau_max = check_temperature_range(tau_min, tau_max)
        self.tau_init = check_number("tau_init", tau_init, self.tau_min, self.tau_max)
        self.eta = check_number("eta", eta, 0.0)
        self.beta = check_number("beta", beta, 0.0, 1.0, low_open=True)
        self.tau_grad_clip = check_number("tau_grad_clip", tau_grad_clip, 0.0, low_open=True)

    def initial_values(self) -> dict[str, float]:
        """Per-sample tables of an anchor role and their initial values."""
        return {"log_u": -math.inf, "tau": self.tau_init, "momentum": 0.0}

    def block_temperature(
        self, rows: dict[str, Tensor], suffix: str, views: int, anchors: Optional[Tensor]
    ) -> Tensor:
        """Temperature of each row of a block: the sample's (shared by its views)."""
        tau = rows["tau" + suffix]
        return tau.repeat(views) if views > 1 else tau

    def next_rows(
        self, rows: dict[str, Tensor], log_u: Tensor, grad_tau: Tensor, suffix: str = ""
    ) -> dict[str, Tensor]:
        """The new ``log(u)``, ``tau`` and momentum rows (see :func:`temperature_step`)."""
        tau, momentum = temperature_step(
            rows["tau" + suffix],
            rows["momentum" + suffix],
            grad_tau,
            self.eta,
            self.beta,
            self.tau_grad_clip,
            self.tau_min,
            self.tau_max,
        )
        return {"log_u" + suffix: log_u, "tau" + suffix: tau, "momentum" + suffix: momentum}


@runtime_checkable
class TemperatureRule(Protocol):
    """What :class:`GlobalContrastiveLoss` asks of a temperature rule (a structural type).

    The four rules implement it: :class:`FixedTemperature` (SogCLR), :class:`LearnedTemperature`
    (iSogCLR), :class:`tau_core.GlobalLearnedTemperature` (RGCL-g) and
    :class:`tau_core.NetworkTemperature` (TempNet). A new rule needs no base class: any object
    with these attributes and methods can be passed as a loss's ``rule``. For every anchor role
    (table suffix ``""``, ``"_image"`` or ``"_text"``) and step, the loss reads the batch's rows of
    the tables :meth:`initial_values` names, asks :meth:`block_temperature` for each row's
    temperature, computes the moving average ``log_u`` and the temperature gradient ``grad_tau``
    (with ``rho``), and writes back what :meth:`next_rows` returns.

    Attributes:
        learns: Whether the rule moves a per-sample temperature itself (iSogCLR's step): the loss
            then computes ``grad_tau`` for :meth:`next_rows`.
        trains_temperature: Whether the temperature is trained by autograd (a parameter or a
            network): the loss adds the temperature term to the gradient, not to the value.
        rho: KL radius of the robust objective, >= 0 (0 for SogCLR).

    Examples:
        >>> isinstance(FixedTemperature(0.1), TemperatureRule)
        True
    """

    learns: bool
    trains_temperature: bool
    rho: float

    def initial_values(self) -> dict[str, float]:
        """Per-sample tables of an anchor role (without suffix) and their initial values."""
        ...

    def block_temperature(
        self, rows: dict[str, Tensor], suffix: str, views: int, anchors: Optional[Tensor]
    ) -> Tensor:
        """Temperature of each row of a block, shape ``(views * batch,)``.

        Args:
            rows: The batch's rows of every table (keys with their suffix).
            suffix: The anchor role's table suffix.
            views: Rows of the block per sample (2 for the unimodal losses' two views).
            anchors: The block's anchor embeddings (a network rule reads them), or None.
        """
        ...

    def next_rows(
        self, rows: dict[str, Tensor], log_u: Tensor, grad_tau: Tensor, suffix: str = ""
    ) -> dict[str, Tensor]:
        """The rows to write for the batch: the new ``log_u`` and whatever else the rule keeps.

        Args:
            rows: The rows read at the start of the step.
            log_u: The new moving average ``log(u)`` of each sample.
            grad_tau: The temperature gradient of each sample.
            suffix: The anchor role's table suffix. Default ``""``.
        """
        ...

"""RGCL-g's trained temperature: one global temperature, a parameter stepped by the optimizer.

:class:`GlobalTemperature` holds the parameter, :class:`GlobalLearnedTemperature` is the rule the
loss applies, :class:`GlobalTemperatureLoss` the losses' optimizer side (its learning-rate
schedule and the clamp to the bounds; see :mod:`tau_core.trained`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from tau_core.checks import check_number, check_temperature_range
from tau_core.trained import TrainedTemperatureMixin, average_gradient_over_ranks, check_lr_tau


class GlobalTemperature(nn.Module):
    """One learnable temperature, kept as ``logit_scale = log(1 / tau)`` as in FastCLIP.

    The parameter is ``logit_scale`` (OpenCLIP's parametrisation of the inverse temperature);
    ``tau = exp(-logit_scale)``. The range ``[tau_min, tau_max]`` is kept by projection:
    ``logit_scale`` is clamped to ``[log(1/tau_max), log(1/tau_min)]`` at the start of every
    forward and after every step of an optimizer given to ``register_optimizer`` (FastCLIP clamps
    after each step; the value is read only by the next forward, so both give the same steps).

    Args:
        tau_init: Initial temperature, in ``[tau_min, tau_max]``.
        tau_min: Lower bound of the temperature, > 0.
        tau_max: Upper bound of the temperature, >= ``tau_min``.

    Raises:
        ValueError: If a bound is not positive, ``tau_min > tau_max``, or ``tau_init`` lies
            outside ``[tau_min, tau_max]`` (the message names the argument and its range).
    """

    def __init__(self, tau_init: float, tau_min: float, tau_max: float) -> None:
        super().__init__()
        self.tau_min, self.tau_max = check_temperature_range(tau_min, tau_max)
        tau_init = check_number("tau_init", tau_init, self.tau_min, self.tau_max)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau_init)))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Projects ``logit_scale`` onto ``[log(1/tau_max), log(1/tau_min)]`` in place."""
        self.logit_scale.clamp_(math.log(1.0 / self.tau_max), math.log(1.0 / self.tau_min))

    def forward(self) -> Tensor:
        """The temperature (0-d float32) with autograd history to ``logit_scale``."""
        self.clamp_()
        return torch.exp(-average_gradient_over_ranks(self.logit_scale).float())

    @property
    def value(self) -> float:
        """The current temperature as a float, inside its bounds."""
        tau = math.exp(-float(self.logit_scale.detach()))
        return min(max(tau, self.tau_min), self.tau_max)


class GlobalLearnedTemperature:
    """RGCL-g's rule: one global temperature, a parameter trained by the optimizer.

    Per sample it keeps only ``log(u)`` (as SogCLR). Every row of every block gets the same
    temperature with autograd history, so the loss's temperature term has gradient
    ``dF/dtau = mean over rows of grad_tau_i`` (``grad_tau_i = log(u_i) + rho - mean_z w_iz *
    h_iz / tau``, averaged over the anchor roles): the gradient of FastCLIP-v3's objective.

    Args:
        rho: KL radius, >= 0.
        module: The temperature parameter (:class:`GlobalTemperature`).

    Raises:
        ValueError: If ``rho`` is negative or not a number.
    """

    learns = False
    trains_temperature = True

    def __init__(self, rho: float, module: GlobalTemperature) -> None:
        self.rho = check_number("rho", rho, 0.0)
        self.module = module

    def initial_values(self) -> dict[str, float]:
        """Per-sample tables of an anchor role and their initial values."""
        return {"log_u": -math.inf}

    def block_temperature(
        self, rows: dict[str, Tensor], suffix: str, views: int, anchors: Optional[Tensor]
    ) -> Tensor:
        """The global temperature, repeated for every row of the block (with autograd history;
        a copy, not an expanded view, which torch.compile's backward mishandles before 2.14)."""
        log_u = rows["log_u" + suffix]
        tau = self.module().to(log_u.device)
        return tau.reshape(1).repeat(log_u.numel() * views)

    def next_rows(
        self, rows: dict[str, Tensor], log_u: Tensor, grad_tau: Tensor, suffix: str = ""
    ) -> dict[str, Tensor]:
        return {"log_u" + suffix: log_u}


class GlobalTemperatureLoss(TrainedTemperatureMixin):
    """What RGCL-g's losses (unimodal and image-text) share: the temperature and its schedule.

    The learning rate of the temperature is ``lr_tau``, divided by ``1 / lr_tau_drop_factor``
    while the temperature is at or below ``lr_tau_drop_below`` (FastCLIP's ``step_thresh``
    schedule: 2e-4, divided by 3 once tau <= 0.03); no weight decay.
    """

    global_temperature: GlobalTemperature

    def _init_schedule(
        self, lr_tau: float, lr_tau_drop_below: Optional[float], lr_tau_drop_factor: float
    ) -> None:
        self.lr_tau = check_lr_tau(lr_tau)
        if lr_tau_drop_below is not None:
            lr_tau_drop_below = check_number(
                "lr_tau_drop_below", lr_tau_drop_below, 0.0, low_open=True
            )
        self.lr_tau_drop_below = lr_tau_drop_below
        self.lr_tau_drop_factor = check_number(
            "lr_tau_drop_factor", lr_tau_drop_factor, 0.0, 1.0, low_open=True
        )

    @property
    def temperature(self) -> float:
        """The current global temperature (inside ``[tau_min, tau_max]``)."""
        return self.global_temperature.value

    @property
    def logit_scale(self) -> nn.Parameter:
        """The trained parameter, ``log(1 / temperature)``."""
        return self.global_temperature.logit_scale

    def temperature_parameters(self) -> list[nn.Parameter]:
        return [self.global_temperature.logit_scale]

    def current_lr_tau(self) -> float:
        drop = self.lr_tau_drop_below
        if drop is not None and self.temperature <= drop:
            return self.lr_tau * self.lr_tau_drop_factor
        return self.lr_tau

    def clamp_temperature_(self) -> None:
        self.global_temperature.clamp_()

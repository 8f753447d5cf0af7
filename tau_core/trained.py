"""What the temperatures trained by autograd share: the gradient averaged over ranks, the seeds,
and the optimizer side. RGCL-g's global temperature is in :mod:`tau_core.global_temperature`,
TempNet's temperature network in :mod:`tau_core.temperature_network`.

Both are temperature rules (see :mod:`tau_core.temperature`) with ``trains_temperature = True``:
:class:`tau_core.adapter.GlobalContrastiveLoss` adds ``mean_i tau_i * [grad_tau_i]_detached`` to the
gradient of the loss, so the parameters behind ``tau_i`` receive the robust objective's
temperature gradient by the chain rule, and an ordinary optimizer steps them.

Distributed semantics: the parameters enter every forward through
:func:`average_gradient_over_ranks`, an identity whose backward averages the gradient over the
ranks of the default process group. Each rank's gradient of the temperature parameters is then
the global batch's, whether or not the loss sits inside a ``DistributedDataParallel`` module (DDP
averages values that are already equal), so W processes step the same temperature as one process
on the global batch.

The optimizer side (:class:`TrainedTemperatureMixin`): ``param_groups()`` gives the temperature
parameters with the published settings (own learning rate, no weight decay), and
``register_optimizer(optimizer)`` keeps that learning rate on its published schedule and the
global temperature inside its bounds after every step; ``optimizer(...)`` builds an AdamW with
both for users who do not want to write one.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Union

import torch
from torch import Tensor, nn
from torch import distributed as torch_dist

from tau_core.checks import check_number
from tau_core.distributed import is_distributed


class _AverageGradientOverRanks(torch.autograd.Function):
    """Identity in forward; in backward, the mean of the gradient over all ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad)
        return grad.div_(torch_dist.get_world_size())


def average_gradient_over_ranks(x: Tensor) -> Tensor:
    """``x`` itself, whose gradient is averaged over the ranks of the default process group.

    Without a process group of several ranks (or without autograd history) it returns ``x``.
    The average is a collective in backward: every rank must run the backward pass, as it must
    for DDP. Averaging is idempotent, so a parameter that DDP also averages keeps the same value.
    """
    if is_distributed() and torch.is_grad_enabled() and x.requires_grad:
        return _AverageGradientOverRanks.apply(x)
    return x


MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (SplitMix64 over the sequence).

    Distinct sequences give unrelated seeds: ``(s, epoch + 1)`` and ``(s + 1, epoch)`` do not
    collide as ``seed + epoch`` would.
    """
    h = _splitmix64(len(parts))
    for part in parts:
        h = _splitmix64(h ^ (int(part) & MASK64))
    return h & ((1 << 63) - 1)


ParamsLike = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


class TrainedTemperatureMixin:
    """Optimizer helpers of a loss whose temperature is trained by autograd.

    A subclass sets ``lr_tau`` and implements :meth:`temperature_parameters`,
    :meth:`current_lr_tau` and (optionally) :meth:`clamp_temperature_` and
    :meth:`group_settings`.
    """

    lr_tau: float

    def temperature_parameters(self) -> list[nn.Parameter]:
        """The parameters behind the temperature (trained with :meth:`param_groups`)."""
        raise NotImplementedError

    def current_lr_tau(self) -> float:
        """The temperature's learning rate now (its published schedule)."""
        raise NotImplementedError

    def clamp_temperature_(self) -> None:
        """Keeps the temperature inside its bounds (called after each optimizer step)."""

    def group_settings(self) -> dict[str, Any]:
        """Optimizer settings of the temperature group besides lr (weight decay 0)."""
        return {"weight_decay": 0.0}

    def param_groups(self) -> list[dict[str, Any]]:
        """The temperature's parameter group with its published settings.

        One group: ``{"params": ..., "lr": current_lr_tau(), "weight_decay": 0.0, ...}`` (and, for
        TempNet, Adam's betas and eps). Add it to the model's groups of one optimizer and call
        :meth:`register_optimizer` on that optimizer, or use :meth:`optimizer`.
        """
        return [
            {
                "params": self.temperature_parameters(),
                "lr": self.current_lr_tau(),
                "name": "temperature",
                **self.group_settings(),
            }
        ]

    def _own_groups(self, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
        own = {id(p) for p in self.temperature_parameters()}
        groups = [g for g in optimizer.param_groups if any(id(p) in own for p in g["params"])]
        for g in groups:
            if any(id(p) not in own for p in g["params"]):
                raise ValueError(
                    "the optimizer has a parameter group that mixes the loss's temperature "
                    "parameters with others; give them their own group (loss.param_groups())."
                )
        if not groups:
            raise ValueError(
                "the optimizer does not hold the loss's temperature parameters; add "
                "loss.param_groups() to its parameter groups."
            )
        return groups

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        """Puts the temperature group of ``optimizer`` on its schedule and bounds.

        Before every ``optimizer.step()`` the group's ``lr`` is set to :meth:`current_lr_tau`
        (so an LR scheduler of the model's groups does not move it); after every step the
        temperature is clamped to its bounds. Returns the hooks' handles (``.remove()``).
        The group is found again at every step (by its parameters), so the schedule survives
        ``optimizer.load_state_dict``, which replaces the group dictionaries (a resumed run).
        The registered optimizer is the temperature's own: a loss whose temperature
        parameters are changed by anything else, or by nothing, warns (see
        :meth:`optimizer`). The published settings are Adam(W)'s; another kind warns.
        """
        self._own_groups(optimizer)  # the checks, now
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            warnings.warn(
                f"{type(self).__name__}.register_optimizer: the temperature's settings (lr_tau "
                f"{self.lr_tau:g}) are Adam(W)'s, and this optimizer is "
                f"{type(optimizer).__name__}, whose step of the same gradient is much smaller "
                "or larger. Give the temperature its own AdamW: loss.optimizer().",
                UserWarning,
                stacklevel=2,
            )

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            lr = self.current_lr_tau()
            for group in self._own_groups(opt):
                group["lr"] = lr

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.clamp_temperature_()
            self._own_steps = getattr(self, "_own_steps", 0) + 1

        return [
            optimizer.register_step_pre_hook(before_step),
            optimizer.register_step_post_hook(after_step),
        ]

    def optimizer(
        self,
        params: ParamsLike = (),
        lr: float = 0.0,
        weight_decay: float = 0.0,
        **adamw_kwargs: Any,
    ) -> torch.optim.AdamW:
        """The temperature's own AdamW (:meth:`param_groups`), registered.

        ``loss.optimizer()`` is the temperature's optimizer alone: keep the model's optimizer
        as it is (SGD, LARS, ...) and step this one beside it::

            tau_optimizer = loss_fn.optimizer()
            ...
            loss.backward()
            optimizer.step(); tau_optimizer.step()
            optimizer.zero_grad(); tau_optimizer.zero_grad()

        (In Lightning, ``lightly_tau.TrainedTemperature()`` in the Trainer's callbacks does this.)
        With ``params`` and ``lr`` it is one AdamW over the model's parameters too (a CLIP
        model trained by AdamW anyway); the loss's own parameters are removed from ``params``
        (a LightningModule's ``self.parameters()`` holds them when the loss is its attribute),
        so they are stepped only in their own group.

        Examples:
            >>> tau_optimizer = loss_fn.optimizer()
            >>> optimizer = loss_fn.optimizer(clip_model.parameters(), lr=1e-3, weight_decay=0.1)
        """
        own = {id(p) for p in self.temperature_parameters()}
        params = list(params)
        if params and isinstance(params[0], dict):
            model_groups = [
                {**g, "params": [p for p in g["params"] if id(p) not in own]} for g in params
            ]
        else:
            model_groups = [{"params": [p for p in params if id(p) not in own]}]
        model_groups = [g for g in model_groups if g["params"]]
        opt = torch.optim.AdamW(
            model_groups + self.param_groups(), lr=lr, weight_decay=weight_decay, **adamw_kwargs
        )
        self.register_optimizer(opt)
        return opt

    # ------------------------------------------------ is the temperature trained at all?
    def _temperature_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.temperature_parameters())

    @torch.compiler.disable  # host counters: traced, each new value would recompile
    def _temperature_forward_started(self) -> None:
        """At a training call: counts the calls since the own optimizer last stepped."""
        if getattr(self, "_steps_warned", False) or self.lr_tau == 0.0:
            return
        record = getattr(self, "_step_record", None)
        steps = getattr(self, "_own_steps", 0)
        if record is not None:
            last_steps, last_versions = record
            if steps != last_steps:
                self._calls_unstepped, self._changed_elsewhere = 0, False
            else:
                self._calls_unstepped = getattr(self, "_calls_unstepped", 0) + 1
                if self._temperature_versions() != last_versions:
                    self._changed_elsewhere = True
        calls = getattr(self, "_calls_unstepped", 0)
        limit = UNSTEPPED_CALLS_WARNING // (2 if getattr(self, "_changed_elsewhere", False) else 1)
        if calls >= limit:
            self._warned_after = calls
            self._steps_warned = True
            warnings.warn(self._unstepped_message(), UserWarning, stacklevel=5)

    @torch.compiler.disable  # host counters: traced, each new value would recompile
    def _temperature_forward_done(self) -> None:
        self._step_record = (getattr(self, "_own_steps", 0), self._temperature_versions())

    def _unstepped_message(self) -> str:
        name, n = type(self).__name__, self._warned_after
        if getattr(self, "_changed_elsewhere", False):
            what = (
                "they were changed by another optimizer, one that holds them in its parameter "
                "groups (e.g. SGD(model.parameters()) of a module that has the loss as an "
                "attribute), at the model's settings instead of the temperature's"
            )
        else:
            what = "nothing steps them, so the temperature does not learn"
        return (
            f"{name}: the trained temperature's parameters were not stepped by their own "
            f"optimizer over the last {n} training calls: {what}. Give the temperature its own "
            "optimizer: in Lightning, Trainer(callbacks=[lightly_tau.TrainedTemperature()]); in "
            "a plain loop, tau_optimizer = criterion.optimizer(), stepped and zeroed beside the "
            "model's optimizer (which keeps the loss's parameters out). An optimizer you build "
            "from criterion.param_groups() needs criterion.register_optimizer(opt)."
        )


#: Training calls without a step of the temperature's own optimizer before the warning (half as
#: many when something else changed the parameters); a few optimizer steps of gradient
#: accumulation stay below it.
UNSTEPPED_CALLS_WARNING = 8


def check_lr_tau(lr_tau: float) -> float:
    return check_number("lr_tau", lr_tau, 0.0)

"""Temperatures trained by autograd: RGCL-g's global temperature and TempNet's temperature network.

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

import math
import warnings
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as torch_dist

from tau_core import device as device_runtime
from tau_core.checks import check_number, check_temperature_range
from tau_core.distributed import is_distributed, rank


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
DROPOUT_STREAM = 0x7E3D  # tags TempNet's dropout stream in derive_seed


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


# ------------------------------------------------------------------------ RGCL-g


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


# ------------------------------------------------------------------------ TempNet


class TemperatureNetwork(nn.Module):
    """TempNet's temperature generator: an anchor's temperature from its own embedding.

    For a (detached, L2-normalised) embedding ``z`` of dimension ``d``::

        x       = Dropout(p)( sigmoid( Linear(d, d)(z) ) )
        P       = L2-normalise(prototypes)                 M prototypes of dimension d
        prods   = x @ P^T
        weights = softmax(prods / exp(s))                  s learnable, initialised to log(0.01)
        t       = Linear(M, 1)( (weights - 1/M) * sigmoid(prods) )   weight 1, bias 0 at start
        tau     = tau_min + (tau_max - tau_min) * sigmoid(t)

    The prototypes start as standard normal draws and the projection with ``nn.Linear``'s own
    initialisation, both from a generator seeded with ``seed`` so that every rank builds the same
    network. The math runs in float32 (autocast is switched off inside).

    Reference: Qiu et al., "To Cool or not to Cool? Temperature Network Meets Large Foundation
    Models via DRO", ICML 2024, https://arxiv.org/abs/2404.04575 (``TempGenerator``).

    Args:
        dim: Embedding dimension ``d``, an integer >= 1.
        tau_min: Lowest predicted temperature, > 0. Default 0.005.
        tau_max: Highest predicted temperature, >= ``tau_min``. Default 0.05.
        num_prototypes: ``M``, an integer >= 1. Default 256.
        dropout: Dropout rate after the projection (active in training mode), in [0, 1).
            Default 0.5.
        seed: Seed of the initialisation (any integer). Default 0.

    Raises:
        ValueError: If an argument lies outside its range (the message names it and the range).

    Examples:
        >>> net = TemperatureNetwork(256)
        >>> tau = net(torch.nn.functional.normalize(torch.randn(8, 256), dim=1))  # shape (8,)
    """

    def __init__(
        self,
        dim: int,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        num_prototypes: int = 256,
        dropout: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.tau_min, self.tau_max = check_temperature_range(tau_min, tau_max)
        self.dropout = check_number("dropout", dropout, 0.0, 1.0, high_open=True)
        self.dim, self.num_prototypes = dim, num_prototypes
        self.seed = seed
        #: Seed of the dropout stream (``build_networks`` hashes the loss's seed and the role).
        self.dropout_seed = seed
        self.dropout_calls = 0  # training forwards that drew a dropout mask (checkpointed)
        self._generators: dict[torch.device, torch.Generator] = {}
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default: U(-1/sqrt(d), 1/sqrt(d))
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.uniform_(-bound, bound, generator=generator)
            self.proj.bias.uniform_(-bound, bound, generator=generator)
        self.log_scale = nn.Parameter(torch.tensor(math.log(0.01)))
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim, generator=generator))
        self.head = nn.Linear(num_prototypes, 1)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.fill_(0.0)

    def forward(self, z: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Temperature of each row of ``z`` (shape (n, dim)), shape (n,), float32.

        The gradient of every parameter is averaged over the ranks of the default process group
        in backward (see :func:`average_gradient_over_ranks`).

        Args:
            z: L2-normalised embeddings, shape (n, dim).
            mask: The dropout mask of this forward (0/1, shape (n, dim)), drawn beforehand by
                :meth:`draw_mask`; None (the default) draws it here in training mode.

        Returns:
            Temperatures in ``[tau_min, tau_max]``, shape (n,).

        Raises:
            ValueError: If ``z`` does not have shape (n, dim).
        """
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {tuple(z.shape)}.")
        p = {name: average_gradient_over_ranks(t) for name, t in self.named_parameters()}
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.to(p["proj.weight"].dtype)  # float32 unless the network was cast
            x = torch.sigmoid(F.linear(z, p["proj.weight"], p["proj.bias"]))
            x = self._dropout(x, mask)
            prods = x @ F.normalize(p["prototypes"], dim=1).T
            weights = torch.softmax(prods / p["log_scale"].exp(), dim=1)
            features = (weights - 1.0 / self.num_prototypes) * torch.sigmoid(prods)
            t = F.linear(features, p["head.weight"], p["head.bias"]).squeeze(1)
            return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(t)

    @property
    def draws_dropout(self) -> bool:
        """Whether a forward applies dropout now (training mode and a rate above 0)."""
        return self.training and self.dropout > 0.0

    def _dropout(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``F.dropout`` of ``x`` with ``mask`` (0/1), or with one :meth:`draw_mask` draws."""
        if not self.draws_dropout:
            return x
        if mask is None:
            mask = self.draw_mask(x.shape[0], x.device, x.dtype)
        return x * mask / (1.0 - self.dropout)

    @torch.compiler.disable  # its own seeded generator and call counter: host side
    def draw_mask(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The 0/1 dropout mask (rows, dim) of the next training forward, from the own generator.

        The mask of the k-th training forward on rank r comes from a generator seeded with a hash
        of (dropout_seed, r, k): it does not depend on what else draws random numbers, and only the
        counter k is state, the same on every rank, checkpointed with the loss (``dropout_calls``
        in its state dict), so a resumed run draws the masks of the uninterrupted one. It runs
        outside ``torch.compile``'s graph (a seeded generator and a host counter), so a compiled
        step draws the masks of an eager one.
        """
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = device_runtime.generator(device)
        seed = derive_seed(self.dropout_seed, DROPOUT_STREAM, rank(), self.dropout_calls)
        generator.manual_seed(seed)
        self.dropout_calls += 1
        keep = torch.rand((rows, self.dim), generator=generator, device=device, dtype=dtype)
        return (keep >= self.dropout).to(dtype)

    def get_extra_state(self) -> dict[str, int]:
        return {"dropout_calls": self.dropout_calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.dropout_calls = int(state.get("dropout_calls", 0))


@torch.compiler.disable  # the networks' own generators and counters: host side
def _draw_masks(
    networks: dict[str, TemperatureNetwork], rows: dict[str, int], device: torch.device
) -> dict[str, Tensor]:
    return {s: net.draw_mask(rows[s], device, net.proj.weight.dtype) for s, net in networks.items()}


class NetworkTemperature:
    """TempNet's rule: each anchor's temperature predicted by a network of its anchor role.

    Per sample it keeps ``log(u)`` (the moving average, as in iSogCLR) and ``tau``, the
    temperature predicted at the sample's last visit (``nan`` before the first; for analysis
    only, the forward always predicts afresh). The anchors' embeddings are detached: the model
    is trained by the surrogate only, the network by the temperature term only. Unimodal (two
    views per sample): both views share the mean of their two predictions, as iSogCLR's views
    share ``tau_i`` and ``u_i``.

    Args:
        rho: KL radius, >= 0.
        networks: The network of each anchor role, keyed by table suffix (``""`` for one role,
            ``"_image"`` and ``"_text"`` for image-text).

    Raises:
        ValueError: If ``rho`` is negative or not a number.
    """

    learns = False
    trains_temperature = True

    def __init__(self, rho: float, networks: dict[str, TemperatureNetwork]) -> None:
        self.rho = check_number("rho", rho, 0.0)
        self.networks = networks
        self._predicted: dict[str, Tensor] = {}
        self._masks: dict[str, Tensor] = {}

    def draw_masks(self, rows: dict[str, int], device: torch.device) -> None:
        """Draws the dropout mask of every role's next forward (``rows``: anchors per role).

        Called once per step before the roles' forwards, so that the host-side draws
        (:meth:`TemperatureNetwork.draw_mask`) leave one break in a compiled step, not one in the
        loop over roles (which would run the rest of the step outside the graph).
        """
        nets = {s: self.networks[s] for s in rows if self.networks[s].draws_dropout}
        self._masks = _draw_masks(nets, rows, device) if nets else {}

    def initial_values(self) -> dict[str, float]:
        """Per-sample tables of an anchor role and their initial values."""
        return {"log_u": -math.inf, "tau": math.nan}

    def block_temperature(
        self, rows: dict[str, Tensor], suffix: str, views: int, anchors: Optional[Tensor]
    ) -> Tensor:
        """Each row's predicted temperature (with autograd history to the network)."""
        if anchors is None:
            raise ValueError("the temperature network needs the anchors' embeddings.")
        tau = self.networks[suffix](anchors.detach(), self._masks.pop(suffix, None))
        if views > 1:
            tau = tau.view(views, -1).mean(dim=0)
        self._predicted[suffix] = tau.detach()
        return tau.repeat(views) if views > 1 else tau

    def next_rows(
        self, rows: dict[str, Tensor], log_u: Tensor, grad_tau: Tensor, suffix: str = ""
    ) -> dict[str, Tensor]:
        """The new ``log(u)`` and the temperature just predicted for each sample."""
        return {"log_u" + suffix: log_u, "tau" + suffix: self._predicted.pop(suffix)}


# ------------------------------------------------------------------------ optimizer side

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


class TemperatureNetworkLoss(TrainedTemperatureMixin):
    """What TempNet's losses share: the networks, their schedule and ``temperature_of``.

    The networks are trained by Adam in their own group: ``lr_tau`` (3e-5 published) times
    ``lr_tau_decay ** epoch`` (0.9 published; the epoch is the one given to ``set_epoch``),
    betas (0.9, 0.999), eps 1e-8, no weight decay.
    """

    temperature_networks: nn.ModuleDict
    epoch: int

    def _init_schedule(self, lr_tau: float, lr_tau_decay: float) -> None:
        self.lr_tau = check_lr_tau(lr_tau)
        self.lr_tau_decay = check_number("lr_tau_decay", lr_tau_decay, 0.0, 1.0, low_open=True)

    def temperature_parameters(self) -> list[nn.Parameter]:
        return list(self.temperature_networks.parameters())

    def current_lr_tau(self) -> float:
        return self.lr_tau * self.lr_tau_decay**self.epoch

    def group_settings(self) -> dict[str, Any]:
        return {"weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}

    def anchor_blocks(self, z0: Tensor, z1: Tensor) -> list[Any]:
        """The adapter's blocks; the networks' dropout masks of this step are drawn here."""
        blocks = super().anchor_blocks(z0, z1)  # type: ignore[misc]
        rows = {k.suffix: k.anchors.shape[0] for k in blocks if k.anchors is not None}
        self.settings.draw_masks(rows, blocks[0].device)  # type: ignore[attr-defined]
        return blocks

    @torch.no_grad()
    def _predict(self, embeddings: Tensor, role: str) -> Tensor:
        if role not in self.temperature_networks:
            raise ValueError(
                f"role must be one of {sorted(self.temperature_networks)}, got {role!r}."
            )
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D tensor (n, dim).")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or Inf values.")
        net = self.temperature_networks[role]
        was_training = net.training
        net.eval()
        try:
            return net(F.normalize(embeddings.float(), dim=1))
        finally:
            net.train(was_training)


def build_networks(
    roles: Iterable[str],
    dim: int,
    tau_min: float,
    tau_max: float,
    num_prototypes: int,
    dropout: float,
    seed: int,
    loss_name: str,
) -> nn.ModuleDict:
    """One :class:`TemperatureNetwork` per role (seeds ``seed``, ``seed + 1``, ...)."""
    if dim is None:
        raise ValueError(
            f"{loss_name} needs dim=, the dimension of the embeddings its temperature networks "
            "read (e.g. the model's embed_dim)."
        )
    networks = nn.ModuleDict(
        {
            role: TemperatureNetwork(dim, tau_min, tau_max, num_prototypes, dropout, seed + k)
            for k, role in enumerate(roles)
        }
    )
    for k, net in enumerate(networks.values()):
        net.dropout_seed = derive_seed(seed, k)  # (seed, role): no overlap between seeds
    return networks

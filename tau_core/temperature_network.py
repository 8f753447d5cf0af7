"""TempNet's trained temperature: each anchor's temperature predicted by a small network.

:class:`TemperatureNetwork` is the network, :class:`NetworkTemperature` the rule the loss applies,
:class:`TemperatureNetworkLoss` the losses' optimizer side (its learning-rate schedule; see
:mod:`tau_core.trained`), :func:`build_networks` one network per anchor role.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tau_core import device as device_runtime
from tau_core.checks import check_number, check_temperature_range
from tau_core.distributed import rank
from tau_core.trained import (
    TrainedTemperatureMixin,
    average_gradient_over_ranks,
    check_lr_tau,
    derive_seed,
)

DROPOUT_STREAM = 0x7E3D  # tags TempNet's dropout stream in derive_seed


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

"""TempNet for Lightly's SimCLR pipeline: :class:`TempNetLoss`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightly_tau.losses.unimodal import _UnimodalGlobalLoss
from tau_core import NetworkTemperature
from tau_core.adapter import TemperatureNetworkLoss, build_networks, check_chunk_size


class TempNetLoss(TemperatureNetworkLoss, _UnimodalGlobalLoss):
    """iSogCLR with each sample's temperature predicted by a network (TempNet).

    iSogCLR's robust loss (see :class:`ISogCLRLoss`) where ``tau_i = f_theta(z_i)`` comes from a
    small network (:class:`tau_core.TemperatureNetwork`) of the anchor's own detached,
    L2-normalised embedding, instead of a per-sample table: it exists for samples never seen in
    training (``temperature_of``). The two views of a sample share the mean of their two
    predictions. Per step (h as in :class:`SogCLRLoss`)::

        u_i   <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau_i)
        grad_i = log(u_i) + rho - mean_z w_iz * h_iz / tau_i,      w_iz = exp(h_iz / tau_i) / u_i
        loss   = mean_i mean_z w_iz * h_iz   +   mean_i tau_i * [grad_i]_detached (gradient only)

    The model gets iSogCLR's surrogate at the predicted (detached) temperatures; the network gets
    ``grad_i`` pushed through ``tau_i = f_theta(z_i)`` by the chain rule. Train the network with
    ``param_groups()`` in your optimizer and ``register_optimizer(optimizer)``, or with
    ``optimizer(...)``: Adam, ``lr_tau`` decayed by ``lr_tau_decay`` each epoch (``set_epoch``),
    no weight decay. In a process group the network's gradients are averaged over ranks in
    backward. The state keeps ``log_u`` and ``tau`` (the temperature predicted at a sample's last
    visit, NaN before it). The defaults are this package's choice for SimCLR (the published
    settings are image-text ones, see :class:`openclip_tau.TempNetClipLoss`).

    - [0] Qiu et al., "To Cool or not to Cool? Temperature Network Meets Large Foundation Models
      via DRO", ICML 2024, https://arxiv.org/abs/2404.04575

    Args:
        num_samples: Number of samples in the training set (rows of the per-sample state), an
            integer >= 1, e.g. ``len(dataset)``. Required.
        dim: Dimension of the embeddings (the network's input), an integer >= 1. Required.
        rho: KL radius, >= 0. Default 0.4.
        tau_min: Lowest predicted temperature, > 0. Default 0.05.
        tau_max: Highest predicted temperature, >= ``tau_min``. Default 0.5.
        lr_tau: Adam learning rate of the network, >= 0. Default 3e-5.
        lr_tau_decay: Factor per epoch of that learning rate, in (0, 1]. Default 0.9.
        num_prototypes: Prototypes of the network, an integer >= 1. Default 256.
        dropout: Dropout rate of the network in training mode, in [0, 1). Default 0.5.
        seed: Seed of the network's initialisation (the same on every rank). Default 0.
        gamma: Moving-average weight, in (0, 1]. Default 0.8.
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch by a cosine (call ``set_epoch`` every epoch). Default None
            (constant gamma).
        gather_distributed: If True, the negatives are gathered from all processes, as in
            ``NTXentLoss``. The state is synchronised across processes in any case. Default False.
        state_layout: Where the per-sample tables live: ``"replicated"`` (every rank holds every
            row) or ``"sharded"`` (rank r holds the rows ``i % world_size == r``; needs a process
            group before the first forward). Default ``"replicated"``.
        chunk_size: Anchor rows per tile of the similarity block: the block is computed and
            differentiated a tile at a time, so the loss's memory is O(batch * (dim + chunk_size))
            instead of O(batch ** 2), with the same values and gradients. Default 0 (one block).

    Raises:
        TypeError: If ``num_samples`` or ``dim`` is not given.
        ValueError: If ``num_samples`` or ``dim`` is not a positive integer (None, 0, negative, a
            float), a setting is passed positionally, a setting lies outside its range (the message
            names the argument and the range), or ``state_layout`` is unknown; raised before
            anything is built.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(16, 16)
        >>> loss_fn = TempNetLoss(100, dim=16)
        >>> optimizer = loss_fn.optimizer(model.parameters(), lr=1e-3)
        >>> loss = loss_fn(model(torch.randn(8, 16)), model(torch.randn(8, 16)), torch.arange(8))
        >>> loss.backward(); optimizer.step()
        >>> loss_fn.temperature_of(model(torch.randn(3, 16))).shape  # also for unseen samples
        torch.Size([3])
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dim: int,
        rho: float = 0.4,
        tau_min: float = 0.05,
        tau_max: float = 0.5,
        lr_tau: float = 3e-5,
        lr_tau_decay: float = 0.9,
        num_prototypes: int = 256,
        dropout: float = 0.5,
        seed: int = 0,
        gamma: float = 0.8,
        gamma_decay_epochs: Optional[int] = None,
        gather_distributed: bool = False,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        networks = build_networks(
            ("sample",), dim, tau_min, tau_max, num_prototypes, dropout, seed, "TempNetLoss"
        )
        super().__init__(
            num_samples,
            NetworkTemperature(rho, {"": networks["sample"]}),
            gamma,
            gamma_decay_epochs,
            gather_distributed,
            state_layout=state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)
        self.temperature_networks = networks
        self._init_schedule(lr_tau, lr_tau_decay)

    def temperature_of(self, embeddings: Tensor) -> Tensor:
        """The network's temperature for each row of ``embeddings`` (n, dim), without dropout.

        The embeddings are L2-normalised first, as in training. Returns shape (n,).
        """
        return self._predict(embeddings, "sample")

    @property
    def tau(self) -> Tensor:
        """Temperature predicted at each sample's last visit (NaN if never), (num_samples,)."""
        return self.state.table("tau")

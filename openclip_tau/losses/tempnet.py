"""Image-text TempNet with ``ClipLoss``'s call: :class:`TempNetClipLoss`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from openclip_tau.losses.image_text import ROLES, _GlobalContrastiveClipLoss, _RoleTemperatureTables
from tau_core import NetworkTemperature
from tau_core.adapter import TemperatureNetworkLoss, build_networks, check_chunk_size


class TempNetClipLoss(_RoleTemperatureTables, TemperatureNetworkLoss, _GlobalContrastiveClipLoss):
    """Image-text iSogCLR with temperatures predicted by an image and a text network (TempNet).

    :class:`ISogCLRClipLoss` where image anchor ``i`` gets ``tau_i = f_image(z_i)`` and text
    anchor ``i`` gets ``f_text(t_i)`` from its own detached, L2-normalised embedding
    (:class:`tau_core.TemperatureNetwork`, ``TempGenerator`` of the reference code), so any new
    image or caption has a temperature (``temperature_of``). Per anchor and role::

        u_i   <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau_i)
        grad_i = log(u_i) + rho - mean_z w_iz * h_iz / tau_i,      w_iz = exp(h_iz / tau_i) / u_i
        loss   = 1/2 * sum_roles [ mean_i mean_z w_iz * h_iz  +  mean_i tau_i * [grad_i]_detached ]

    where the second term enters the gradient only: the model gets iSogCLR's surrogate at the
    predicted (detached) temperatures, each network its role's ``grad_i`` pushed through
    ``tau_i = f(z_i)``. The networks train with Adam in their own group (``param_groups()``,
    ``register_optimizer`` or ``optimizer(...)``): lr 3e-5 times 0.9 per epoch (``set_epoch``),
    no weight decay; under DDP their gradients are averaged over ranks in backward. The state
    keeps ``log_u_image``, ``log_u_text`` and the temperatures predicted at each pair's last
    visit (``tau_image``, ``tau_text``; NaN before it). The positive is left out of the
    negatives (as in :class:`ISogCLRClipLoss`).

    Defaults: the CC3M script of the reference code (ResNet-50 + DistilBERT, 30 epochs): rho 7.0,
    gamma 0.8, temperatures in [0.005, 0.05], 256 prototypes, dropout 0.5.

    - [0] Qiu et al., "To Cool or not to Cool? Temperature Network Meets Large Foundation Models
      via DRO", ICML 2024, https://arxiv.org/abs/2404.04575

    Args:
        num_samples: Number of image-text pairs in the training set (rows of each role's
            table), an integer >= 1. Required.
        dim: Embedding dimension (the model config's ``embed_dim``), an integer >= 1. Required.
        rho: KL radius, >= 0. Default 7.0.
        tau_min: Lowest predicted temperature, > 0. Default 0.005.
        tau_max: Highest predicted temperature, >= ``tau_min``. Default 0.05.
        lr_tau: Adam learning rate of the networks, >= 0. Default 3e-5.
        lr_tau_decay: Factor per epoch of that learning rate, in (0, 1]. Default 0.9.
        num_prototypes: Prototypes per network, an integer >= 1. Default 256.
        dropout: Dropout rate of the networks in training mode, in [0, 1). Default 0.5.
        seed: Seed of the image network's initialisation (text: seed + 1). Default 0.
        gamma: Moving-average weight, in (0, 1]. Default 0.8.
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch by a cosine (call ``set_epoch`` every epoch). Default None.
        local_loss: As in ``open_clip.ClipLoss``. The loss always computes the exact gradient of
            the global batch; ``local_loss=True`` with ``gather_with_grad=False`` is refused.
            Default False.
        gather_with_grad: As in ``open_clip.ClipLoss``. Default False.
        rank: This process's rank, as in ``open_clip.ClipLoss``, an integer in
            ``[0, world_size)``. Default 0.
        world_size: Number of processes, an integer >= 1; features are gathered when
            ``world_size > 1``. The state is synchronised across processes in any case.
            Default 1.
        state_layout: Where the per-sample tables live: ``"replicated"`` (every rank holds every
            row) or ``"sharded"`` (rank r holds the rows ``i % world_size == r``; needs a process
            group before the first forward). Default ``"replicated"``.
        chunk_size: Anchor rows per tile of the similarity blocks: they are computed and
            differentiated a tile at a time, so the loss's memory is O(batch * (dim + chunk_size))
            instead of O(batch ** 2), with the same values and gradients (``SigLipLoss``'s name
            for its chunking). Default 0 (one block per role).

    Raises:
        TypeError: If ``num_samples`` or ``dim`` is not given.
        ValueError: If ``num_samples`` or ``dim`` is not a positive integer (None, 0, negative, a
            float), a setting is passed positionally or lies outside its range (the message names
            the argument and the range), ``rank`` / ``world_size`` do not fit, ``local_loss=True``
            comes with ``gather_with_grad=False``, or ``state_layout`` is unknown.

    Examples:
        >>> import torch
        >>> loss_fn = TempNetClipLoss(100, dim=32)
        >>> optimizer = loss_fn.optimizer([], lr=2e-4)  # the model's parameters go first
        >>> image = torch.randn(8, 32, requires_grad=True)
        >>> text = torch.randn(8, 32, requires_grad=True)
        >>> logit_scale = torch.tensor(1 / 0.07).log()  # the model's; unused by the loss
        >>> loss = loss_fn(image, text, logit_scale, index=torch.arange(8))
        >>> loss.backward()
        >>> loss_fn.temperature_of(torch.randn(3, 32), role="text").shape  # any new caption
        torch.Size([3])
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dim: int,
        rho: float = 7.0,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        lr_tau: float = 3e-5,
        lr_tau_decay: float = 0.9,
        num_prototypes: int = 256,
        dropout: float = 0.5,
        seed: int = 0,
        gamma: float = 0.8,
        gamma_decay_epochs: Optional[int] = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        networks = build_networks(
            ROLES, dim, tau_min, tau_max, num_prototypes, dropout, seed, "TempNetClipLoss"
        )
        super().__init__(
            num_samples,
            NetworkTemperature(rho, {f"_{role}": networks[role] for role in ROLES}),
            gamma,
            gamma_decay_epochs,
            local_loss,
            gather_with_grad,
            rank,
            world_size,
            state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)
        self.temperature_networks = networks
        self._init_schedule(lr_tau, lr_tau_decay)

    def temperature_of(self, embeddings: Tensor, role: str = "image") -> Tensor:
        """The ``role`` network's temperature for each row of ``embeddings`` (n, dim).

        Without dropout; the embeddings are L2-normalised first, as in training. Shape (n,).
        """
        return self._predict(embeddings, role)

"""RGCL-g for Lightly's SimCLR pipeline: :class:`RGCLGLoss`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightly_tau.losses.unimodal import _UnimodalGlobalLoss
from tau_core import GlobalLearnedTemperature, GlobalTemperature
from tau_core.adapter import GlobalTemperatureLoss, check_chunk_size


class RGCLGLoss(GlobalTemperatureLoss, _UnimodalGlobalLoss):
    """Global contrastive loss with one global temperature learned by DRO (RGCL-g, FastCLIP-v3).

    SogCLR's loss (see :class:`SogCLRLoss`) whose single temperature is a parameter trained on
    the robust objective over the dataset's anchors ``i`` (each view of each sample)::

        F(w, tau) = tau * mean_i log(mean_z exp(h_iz / tau)) + tau * rho
        dF/dtau   = rho + mean_i [log(u_i) - mean_z w_iz * h_iz / tau],   w_iz = exp(h_iz / tau) / u_i

    with ``u_i`` SogCLR's moving average of ``mean_z exp(h_iz / tau)``. The model's gradient is
    SogCLR's at the current temperature; the temperature's gradient is ``dF/dtau`` (added to the
    gradient, not to the value). The temperature is kept as ``logit_scale = log(1 / tau)`` (as in
    FastCLIP) and stepped by the optimizer: put ``param_groups()`` in your optimizer and call
    ``register_optimizer(optimizer)`` once, or build one with ``optimizer(...)``. Its own
    learning rate ``lr_tau``, no weight decay; ``tau`` is clamped to ``[tau_min, tau_max]`` at
    every forward and after every registered step. With ``lr_tau = 0`` it is exactly
    :class:`SogCLRLoss` at ``temperature = tau_init``. In a process group the temperature's
    gradient is averaged over ranks in backward, so every rank steps the global batch's.

    The returned value is the objective estimate ``mean_i tau * (log(u_i) + rho)``; ``stats``
    holds it and the temperature (``tau_mean``, ``tau_p50``, ...). The defaults are this
    package's choice for SimCLR (no unimodal setting was published): iSogCLR's unimodal rho and
    bounds, SogCLR's gamma.

    - [0] Wei et al., "FastCLIP: A Suite of Optimization Techniques to Accelerate CLIP Training
      with Limited Resources", 2024, https://arxiv.org/abs/2407.01445
    - [1] Qiu et al., iSogCLR (the robust objective), ICML 2023, https://arxiv.org/abs/2305.11965

    Args:
        num_samples: Number of samples in the training set (rows of the per-sample state), an
            integer >= 1, e.g. ``len(dataset)``. Required.
        rho: KL radius, >= 0; larger rho gives a smaller temperature. Default 0.4.
        tau_init: Initial temperature, in ``[tau_min, tau_max]``. Default 0.1.
        tau_min: Lower bound of the temperature, > 0. Default 0.05.
        tau_max: Upper bound of the temperature, >= ``tau_min``. Default 1.0.
        lr_tau: Learning rate of the temperature's group, >= 0. Default 2e-4.
        lr_tau_drop_below: If set (> 0), ``lr_tau`` is multiplied by ``lr_tau_drop_factor``
            while the temperature is at or below it (FastCLIP: 0.03). Default None (no drop).
        lr_tau_drop_factor: That factor, in (0, 1]. Default 1/3.
        gamma: Weight of the batch estimate in the moving average, in (0, 1]. Default 0.9.
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
        TypeError: If ``num_samples`` is not given.
        ValueError: If ``num_samples`` is not a positive integer (None, 0, negative, a float), a
            setting is passed positionally, a setting lies outside its range (the message names the
            argument and the range), or ``state_layout`` is unknown; raised before anything is
            built.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(16, 16)
        >>> loss_fn = RGCLGLoss(100, rho=0.4)
        >>> optimizer = loss_fn.optimizer(model.parameters(), lr=1e-3)  # or param_groups()
        >>> x0, x1 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = loss_fn(model(x0), model(x1), torch.arange(8))
        >>> loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> round(loss_fn.temperature, 3)  # the learned global temperature, one small step away
        0.1
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rho: float = 0.4,
        tau_init: float = 0.1,
        tau_min: float = 0.05,
        tau_max: float = 1.0,
        lr_tau: float = 2e-4,
        lr_tau_drop_below: Optional[float] = None,
        lr_tau_drop_factor: float = 1.0 / 3.0,
        gamma: float = 0.9,
        gamma_decay_epochs: Optional[int] = None,
        gather_distributed: bool = False,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        temperature = GlobalTemperature(tau_init, tau_min, tau_max)
        super().__init__(
            num_samples,
            GlobalLearnedTemperature(rho, temperature),
            gamma,
            gamma_decay_epochs,
            gather_distributed,
            state_layout=state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)
        self.global_temperature = temperature
        self._init_schedule(lr_tau, lr_tau_drop_below, lr_tau_drop_factor)

    @property
    def tau(self) -> Tensor:
        """The temperature of every sample (all the global one), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)

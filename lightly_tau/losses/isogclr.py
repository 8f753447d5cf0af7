"""iSogCLR for Lightly's SimCLR pipeline: :class:`ISogCLRLoss`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightly_tau.losses.unimodal import _UnimodalGlobalLoss
from tau_core import LearnedTemperature
from tau_core.adapter import check_chunk_size


class ISogCLRLoss(_UnimodalGlobalLoss):
    """Contrastive loss with a learned temperature per sample (iSogCLR).

    Each anchor's negatives are re-weighted adversarially within a KL ball of radius ``rho``;
    by duality that is a temperature ``tau_i`` per sample, learned by a momentum step on::

        RGCL_i = tau_i * log(mean_z exp(h_iz / tau_i)) + tau_i * rho

    Per step, for each sample in the batch (h as in :class:`SogCLRLoss`, all detached)::

        u_i   <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau_i)
        w_iz   = exp(h_iz / tau_i) / u_i
        grad_i = clamp(log(u_i) + rho - mean_z w_iz * h_iz / tau_i, -c, c)
        m_i   <- (1 - beta) * m_i + beta * grad_i
        tau_i <- clamp(tau_i - eta * m_i, tau_min, tau_max)
        loss   = mean_i mean_z w_iz * h_iz     (gradient through h only)

    The two views share ``tau_i`` and ``u_i`` (means of the two views' updates). Frequent
    semantics end with large temperatures, rare ones with small. The returned value is the
    objective estimate ``mean_i tau_i * (log(u_i) + rho)``, the gradient the surrogate's;
    ``stats`` adds the batch's temperature statistics. ``tau`` is a copy of all temperatures.
    With ``eta = 0`` it equals :class:`SogCLRLoss` at ``temperature = tau_init``.

    - [0] Qiu et al., "Not All Semantics are Created Equal: Contrastive Self-supervised Learning
      with Automatic Temperature Individualization", ICML 2023, https://arxiv.org/abs/2305.11965

    Args:
        num_samples: Number of samples in the training set (rows of the per-sample state), an
            integer >= 1, e.g. ``len(dataset)``. Required.
        rho: KL radius, >= 0; larger rho gives smaller temperatures. Default 0.3.
        tau_init: Initial temperature of every sample, in ``[tau_min, tau_max]``. Default 0.1.
        tau_min: Lower bound of the temperatures, > 0. Default 0.05.
        tau_max: Upper bound of the temperatures, >= ``tau_min``. Default 1.0.
        eta: Step size of the temperature update, >= 0. Default 0.03.
        beta: Weight of the new gradient in the temperature momentum, in (0, 1]. Default 0.5.
        gamma: Weight of the batch estimate in the moving average, in (0, 1]. Default 0.8.
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch by a cosine (call ``set_epoch`` every epoch). Default None
            (constant gamma).
        tau_grad_clip: Bound c of the temperature gradient, > 0. Default 3.0 (unimodal recipe).
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
        >>> loss_fn = ISogCLRLoss(100, rho=0.4)
        >>> import torch
        >>> z0 = torch.randn(8, 16, requires_grad=True)
        >>> z1 = torch.randn(8, 16, requires_grad=True)
        >>> loss = loss_fn(z0, z1, torch.arange(8))  # index: each sample's row in the dataset
        >>> loss.backward()
        >>> loss_fn.tau.shape  # the learned temperature of every sample
        torch.Size([100])
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rho: float = 0.3,
        tau_init: float = 0.1,
        tau_min: float = 0.05,
        tau_max: float = 1.0,
        eta: float = 0.03,
        beta: float = 0.5,
        gamma: float = 0.8,
        gamma_decay_epochs: Optional[int] = None,
        tau_grad_clip: float = 3.0,
        gather_distributed: bool = False,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        super().__init__(
            num_samples,
            LearnedTemperature(rho, tau_init, tau_min, tau_max, eta, beta, tau_grad_clip),
            gamma,
            gamma_decay_epochs,
            gather_distributed,
            state_layout=state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)

    @property
    def tau(self) -> Tensor:
        """The current temperature of every sample, shape (num_samples,) (a copy)."""
        return self.state.table("tau")

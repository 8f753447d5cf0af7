"""SogCLR for Lightly's SimCLR pipeline: :class:`SogCLRLoss`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightly_tau.losses.unimodal import _UnimodalGlobalLoss
from tau_core import FixedTemperature
from tau_core.adapter import FixedTemperatureMixin, check_chunk_size


class SogCLRLoss(FixedTemperatureMixin, _UnimodalGlobalLoss):
    """Global contrastive loss with a per-sample moving average (SogCLR).

    The negatives' normaliser of every anchor is estimated over the whole dataset by a moving
    average ``u_i`` kept per sample, so a small batch does not bias the gradient. For anchor ``i``
    (each view of each sample) with positive ``p`` and the ``2B-2`` other embeddings ``z`` of the
    (gathered) batch as negatives, ``h_iz = s(i, z) - s(i, p)`` with cosine similarity ``s``::

        u_i <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau)   (gamma = 1 on a first visit)
        loss = mean_i mean_z [exp(h_iz / tau) / u_i]_detached * h_iz

    The two views of a sample share one ``u_i`` (the mean of their updates). With gamma = 1 the
    gradient is ``temperature`` times that of the decoupled contrastive loss (``DCLLoss``): the
    positive is not among the negatives.

    The returned value is the objective estimate ``mean_i tau * log(u_i)`` (the surrogate's own
    value means nothing); the gradient is the surrogate's. ``stats`` holds both values after each
    call. The state is written only in training mode with gradients enabled (features that
    require grad); a validation pass reads it.

    - [0] Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning: Small
      Batch Does Not Harm Performance", ICML 2022, https://arxiv.org/abs/2202.12387
    - [1] Wei et al., FastCLIP (cosine gamma decay), 2024, https://arxiv.org/abs/2407.01445

    Args:
        num_samples: Number of samples in the training set (rows of the per-sample state), an
            integer >= 1, e.g. ``len(dataset)``. Required.
        temperature: The global temperature tau, > 0. Default 0.1.
        gamma: Weight of the batch estimate in the moving average, in (0, 1]. Default 0.9. With
            ``gamma_decay_epochs`` it is the final value of a cosine decay from 1.0.
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
        >>> loss_fn = SogCLRLoss(100, temperature=0.1)
        >>> import torch
        >>> z0 = torch.randn(8, 16, requires_grad=True)
        >>> z1 = torch.randn(8, 16, requires_grad=True)
        >>> loss = loss_fn(z0, z1, torch.arange(8))  # index: each sample's row in the dataset
        >>> loss.backward()
        >>> loss_fn.state.table("log_u").isfinite().sum().item()  # the 8 rows visited
        8
    """

    def __init__(
        self,
        num_samples: int,
        *,
        temperature: float = 0.1,
        gamma: float = 0.9,
        gamma_decay_epochs: Optional[int] = None,
        gather_distributed: bool = False,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        super().__init__(
            num_samples,
            FixedTemperature(temperature),
            gamma,
            gamma_decay_epochs,
            gather_distributed,
            state_layout=state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)

    @property
    def tau(self) -> Tensor:
        """The temperature of every sample (all equal to ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)

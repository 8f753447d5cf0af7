"""DySTreSS for Lightly's SimCLR pipeline: :class:`DySTreSSLoss`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from lightly_tau.losses.unimodal import FEATURE_NAMES, IndexLike, _UnimodalMixin
from tau_core.adapter import DySTreSSBase, check_chunk_size


class DySTreSSLoss(_UnimodalMixin, DySTreSSBase):
    """NT-Xent with a temperature that is a cosine function of each pair's similarity (DySTreSS).

    Every logit, positive and negative alike, gets its own temperature from its detached cosine
    similarity (see :func:`tau_core.dystress_temperature`)::

        tau(s) = tau_min + (tau_max - tau_min) * sin(pi * s / 2) ** 2
        logit_ij = s_ij / tau(s_ij)

    followed by SimCLR's cross-entropy over the ``2B-1`` other embeddings of the (gathered) batch.
    With ``tau_min == tau_max == t`` it is exactly ``NTXentLoss(temperature=t)``. ``s / tau(s)``
    stays increasing in ``s`` only while ``tau_max / tau_min`` is below about 4.5, so wider ranges
    raise a warning. ``stats`` holds the mean temperature of all, positive and negative pairs.
    It keeps no state: ``index`` is accepted and ignored, and ``set_epoch`` only records the epoch,
    so it is interchangeable with the stateful losses in a training loop.

    - [0] Manna et al., "Dynamically Scaled Temperature in Self-Supervised Contrastive Learning",
      IEEE TAI 2025, https://arxiv.org/abs/2308.01140

    Args:
        tau_min: Temperature at similarity 0, > 0. Default 0.1 (0.07 in the CIFAR recipe).
        tau_max: Temperature at similarity +-1, >= ``tau_min``. Default 0.2. A ratio
            ``tau_max / tau_min`` above about 4.5 raises a warning (see above).
        gather_distributed: If True, the negatives are gathered from all processes, as in
            ``NTXentLoss``. Default False.
        chunk_size: Anchor rows per tile of the similarity block: the block is computed and
            differentiated a tile at a time, so the loss's memory is O(batch * (dim + chunk_size))
            instead of O(batch ** 2), with the same values and gradients. Default 0 (one block).

    Raises:
        ValueError: If a temperature is not positive or ``tau_min > tau_max``.

    Examples:
        >>> import torch
        >>> loss_fn = DySTreSSLoss(0.1, tau_max=0.2)
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))  # no index needed
        >>> loss.dim()
        0
    """

    def __init__(
        self,
        tau_min: float = 0.1,
        *,
        tau_max: float = 0.2,
        gather_distributed: bool = False,
        chunk_size: int = 0,
    ) -> None:
        super().__init__(tau_min, tau_max, gather_distributed)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, out0: Tensor, out1: Tensor, index: Optional[IndexLike] = None) -> Tensor:
        """NT-Xent loss with similarity-dependent temperatures (``index`` is not used).

        Args:
            out0: Output projections of the first views. Shape: (batch_size, embedding_size).
            out1: Output projections of the second views. Shape: (batch_size, embedding_size).
            index: Accepted for interchangeability with the stateful losses; ignored.

        Returns:
            Mean cross-entropy over the ``2 * batch_size`` anchors.
        Raises:
            ValueError: If a feature tensor is not 2-D floating point, the two shapes differ, or
                the features hold NaN or Inf (raised on every rank).
        """
        return self.dystress_loss(FEATURE_NAMES, out0, out1, index)

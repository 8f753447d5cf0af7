"""Image-text DySTreSS with ``ClipLoss``'s call: :class:`DySTreSSClipLoss`."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from openclip_tau.losses.image_text import FEATURE_NAMES, IndexLike, _ClipMixin
from tau_core.adapter import DySTreSSBase, check_chunk_size


class DySTreSSClipLoss(_ClipMixin, DySTreSSBase):
    """CLIP loss with a temperature that is a cosine function of each pair's similarity.

    Every image-text logit gets ``s / tau(s)`` with ``tau`` from
    :func:`tau_core.dystress_temperature`; the loss is ``ClipLoss``'s mean of the image-to-text
    and text-to-image cross-entropies. With ``tau_min == tau_max == t`` it equals
    ``open_clip.ClipLoss`` with ``logit_scale = 1 / t``. No public image-text version existed;
    this one carries the unimodal rule over unchanged. The model's ``logit_scale`` is not used.
    It keeps no state: ``index=`` is accepted and ignored.

    - [0] Manna et al., DySTreSS, IEEE TAI 2025, https://arxiv.org/abs/2308.01140

    Args:
        tau_min: Temperature at similarity 0, > 0. Default 0.01.
        tau_max: Temperature at similarity +-1, >= ``tau_min``. Default 0.04.
        local_loss: As in ``open_clip.ClipLoss``. The loss always computes the exact gradient of
            the global batch; ``local_loss=True`` with ``gather_with_grad=False`` is refused.
            Default False.
        gather_with_grad: As in ``open_clip.ClipLoss``. Default False.
        rank: This process's rank, as in ``open_clip.ClipLoss``, an integer in
            ``[0, world_size)``. Default 0.
        world_size: Number of processes, an integer >= 1; features are gathered when
            ``world_size > 1``. The state is synchronised across processes in any case.
            Default 1.
        chunk_size: Anchor rows per tile of the similarity blocks: they are computed and
            differentiated a tile at a time, so the loss's memory is O(batch * (dim + chunk_size))
            instead of O(batch ** 2), with the same values and gradients (``SigLipLoss``'s name
            for its chunking). Default 0 (one block per role).

    Raises:
        ValueError: If a temperature is not positive, ``tau_min > tau_max``, ``rank`` /
            ``world_size`` do not fit, or ``local_loss=True`` comes with
            ``gather_with_grad=False``.

    Examples:
        >>> import torch
        >>> loss_fn = DySTreSSClipLoss(0.01, tau_max=0.04)
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32), None)  # no index needed
        >>> loss.dim()
        0
    """

    def __init__(
        self,
        tau_min: float = 0.01,
        *,
        tau_max: float = 0.04,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = 0,
    ) -> None:
        self._init_distributed(rank, world_size, local_loss, gather_with_grad)
        super().__init__(tau_min, tau_max, world_size > 1)
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Optional[Tensor] = None,
        *,
        index: Optional[IndexLike] = None,
        logit_bias: Optional[Tensor] = None,
        output_dict: bool = False,
    ) -> Union[Tensor, dict[str, Tensor]]:
        """Mean of the image-to-text and text-to-image cross-entropies (``index`` is unused).

        Args:
            image_features: (batch_size, dim) image embeddings.
            text_features: (batch_size, dim) text embeddings.
            logit_scale: The model's learned scale; unused, kept in the graph with weight 0.
            index: Accepted for interchangeability with the stateful losses; ignored.
            logit_bias: Unused, as ``logit_scale``.
            output_dict: Return ``{"contrastive_loss": loss}`` as OpenCLIP's losses do.

        Returns:
            The loss (a scalar), or ``{"contrastive_loss": loss}`` with ``output_dict``.

        Raises:
            ValueError: If a feature tensor is not 2-D floating point, the two shapes differ, or
                the features hold NaN or Inf (raised on every rank).
        """
        loss = self.dystress_loss(FEATURE_NAMES, image_features, text_features, index)
        return self._clip_output(loss, logit_scale, logit_bias, output_dict)

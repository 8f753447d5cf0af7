"""Image-text SogCLR with ``ClipLoss``'s call: :class:`SogCLRClipLoss`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from openclip_tau.losses.image_text import _GlobalContrastiveClipLoss
from tau_core import FixedTemperature
from tau_core.adapter import FixedTemperatureMixin, check_chunk_size


class SogCLRClipLoss(FixedTemperatureMixin, _GlobalContrastiveClipLoss):
    """Image-text global contrastive loss with per-sample moving averages (SogCLR).

    For image anchor ``i`` (text anchors alike, against images), with its own caption as the
    positive and the other ``B-1`` captions of the gathered batch as negatives (the positive is
    left out of the negatives, as in LibAUC and FastCLIP), ``h_iz = s(i, z) - s(i, i)``::

        u_i <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau)    (separate u for each role)
        loss = 1/2 * (mean_i mean_z [exp(h_iz / tau) / u_i]_detached * h_iz  + text term)

    The returned value is the objective estimate ``tau * log(u)`` averaged over anchors and roles;
    the gradient is the surrogate's. The model's ``logit_scale`` is not used (``1 / temperature``
    is the scale this loss trains with).

    - [0] Yuan et al., SogCLR, ICML 2022, https://arxiv.org/abs/2202.12387
    - [1] Wei et al., FastCLIP, 2024, https://arxiv.org/abs/2407.01445

    Args:
        num_samples: Number of image-text pairs in the training set (rows of each role's
            table), an integer >= 1. Required.
        temperature: Global temperature, > 0. Default 0.01 (CC3M recipe).
        gamma: Moving-average weight, in (0, 1]. Default 0.9.
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
        TypeError: If ``num_samples`` is not given.
        ValueError: If ``num_samples`` is not a positive integer (None, 0, negative, a float), a
            setting is passed positionally or lies outside its range (the message names the argument
            and the range), ``rank`` / ``world_size`` do not fit, ``local_loss=True`` comes with
            ``gather_with_grad=False``, or ``state_layout`` is unknown.

    Examples:
        >>> import torch
        >>> loss_fn = SogCLRClipLoss(100, temperature=0.01)
        >>> image = torch.randn(8, 32, requires_grad=True)
        >>> text = torch.randn(8, 32, requires_grad=True)
        >>> logit_scale = torch.tensor(1 / 0.07).log()  # the model's; unused by the loss
        >>> loss = loss_fn(image, text, logit_scale, index=torch.arange(8))
        >>> loss.backward()
        >>> loss_fn.state.table("log_u_image").isfinite().sum().item()  # the 8 pairs visited
        8
    """

    def __init__(
        self,
        num_samples: int,
        *,
        temperature: float = 0.01,
        gamma: float = 0.9,
        gamma_decay_epochs: Optional[int] = None,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        super().__init__(
            num_samples,
            FixedTemperature(temperature),
            gamma,
            gamma_decay_epochs,
            local_loss,
            gather_with_grad,
            rank,
            world_size,
            state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)

    @property
    def tau_image(self) -> Tensor:
        """The image anchors' temperature (all ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)

    @property
    def tau_text(self) -> Tensor:
        """The text anchors' temperature (all ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)

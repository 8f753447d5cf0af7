"""Image-text iSogCLR with ``ClipLoss``'s call: :class:`ISogCLRClipLoss`."""

from __future__ import annotations

from typing import Optional

from openclip_tau.losses.image_text import _GlobalContrastiveClipLoss, _RoleTemperatureTables
from tau_core import LearnedTemperature
from tau_core.adapter import check_chunk_size


class ISogCLRClipLoss(_RoleTemperatureTables, _GlobalContrastiveClipLoss):
    """Image-text contrastive loss with a learned temperature per image and per caption (iSogCLR).

    Each pair ``i`` has an image temperature ``tau_image[i]`` (its image as anchor against the
    gathered captions) and a text temperature ``tau_text[i]`` (its caption against the images),
    each with its own moving average and momentum, updated as in
    :class:`lightly_tau.ISogCLRLoss`::

        u_i   <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau_i)
        grad_i = clamp(log(u_i) + rho - mean_z w_iz * h_iz / tau_i, -c, c),  w_iz = exp(h_iz / tau_i) / u_i
        m_i   <- (1 - beta) * m_i + beta * grad_i;   tau_i <- clamp(tau_i - eta * m_i, tau_min, tau_max)
        loss   = 1/2 * (mean_i mean_z w_iz * h_iz  over image anchors + the same over text anchors)

    The positive pair is left out of the negatives (LibAUC and FastCLIP's convention; the original
    code keeps it in the normaliser). Stable in float32 down to tau 0.005: ``u`` is stored as
    ``log(u)``. With ``eta = 0`` it equals :class:`SogCLRClipLoss` at ``tau_init`` (the value
    shifted by ``tau_init * rho``). The published CC3M settings (rho 6, eta 0.03) assume a global
    batch of 512 or more; see docs/openclip.md for small batches.

    - [0] Qiu et al., iSogCLR, ICML 2023, https://arxiv.org/abs/2305.11965

    Args:
        num_samples: Number of image-text pairs in the training set (rows of each role's
            table), an integer >= 1. Required.
        rho: KL radius, >= 0. Default 6.0 (CC3M recipe; keep it well below log(B - 1) for a
            global batch B).
        tau_init: Initial temperature, in ``[tau_min, tau_max]``. Default 0.01.
        tau_min: Lower bound of the temperatures, > 0. Default 0.005.
        tau_max: Upper bound of the temperatures, >= ``tau_min``. Default 1.0.
        eta: Temperature step size, >= 0. Default 0.03.
        beta: Weight of the new gradient in the momentum, in (0, 1]. Default 0.9.
        gamma: Moving-average weight, in (0, 1]. Default 0.8.
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch by a cosine (call ``set_epoch`` every epoch). Default None.
        tau_grad_clip: Bound of the temperature gradient, > 0. Default 5.0 (bimodal recipe).
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
        >>> loss_fn = ISogCLRClipLoss(100, rho=1.0)
        >>> image = torch.randn(8, 32, requires_grad=True)
        >>> text = torch.randn(8, 32, requires_grad=True)
        >>> logit_scale = torch.tensor(1 / 0.07).log()  # the model's; unused by the loss
        >>> loss = loss_fn(image, text, logit_scale, index=torch.arange(8))
        >>> loss.backward()
        >>> loss_fn.tau_image.shape, loss_fn.tau_text.shape  # the learned temperatures
        (torch.Size([100]), torch.Size([100]))
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rho: float = 6.0,
        tau_init: float = 0.01,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
        eta: float = 0.03,
        beta: float = 0.9,
        gamma: float = 0.8,
        gamma_decay_epochs: Optional[int] = None,
        tau_grad_clip: float = 5.0,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        super().__init__(
            num_samples,
            LearnedTemperature(rho, tau_init, tau_min, tau_max, eta, beta, tau_grad_clip),
            gamma,
            gamma_decay_epochs,
            local_loss,
            gather_with_grad,
            rank,
            world_size,
            state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)

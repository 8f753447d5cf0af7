"""Image-text RGCL-g (FastCLIP-v3) with ``ClipLoss``'s call: :class:`RGCLGClipLoss`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from openclip_tau.losses.image_text import ROLES, _GlobalContrastiveClipLoss
from tau_core import GlobalLearnedTemperature, GlobalTemperature
from tau_core.adapter import GlobalTemperatureLoss, check_chunk_size


class RGCLGClipLoss(GlobalTemperatureLoss, _GlobalContrastiveClipLoss):
    """Image-text global contrastive loss with one global temperature learned by DRO (FastCLIP-v3).

    :class:`SogCLRClipLoss` whose temperature is a parameter trained on the robust objective
    (Wei et al., FastCLIP, ``FastCLIPLoss`` with ``multiply_tau``, temperature scheme
    ``global_learnable``)::

        F(w, tau) = tau / |S| * sum_i [log(g_img_i) + log(g_txt_i)] + 2 * rho * tau
        dF/dtau   = rho + 1/2 * mean_i [log u_img_i + log u_txt_i]
                    - (1 / tau) * 1/2 * mean_i [mean_z w_iz h_iz  (both roles)]

    with ``u`` SogCLR's moving averages and ``w_iz = exp(h_iz / tau) / u_i``. The model's gradient
    is SogCLR's at the current temperature (and the value is the objective estimate, half of
    ``F``'s batch estimate); the temperature gets ``dF/dtau``. It is kept as
    ``logit_scale = log(1 / tau)`` in this loss (not the model's ``logit_scale``, which is unused
    and kept in the graph with weight 0), stepped by the optimizer in its own group
    (``param_groups()``: lr ``lr_tau``, weight decay 0; FastCLIP uses AdamW with the model's
    betas) and clamped to ``[tau_min, tau_max]`` at every forward and after every step of an
    optimizer given to ``register_optimizer``. ``lr_tau`` is divided by 3 while tau <= 0.03
    (FastCLIP's ``step_thresh``). Under DDP the temperature's gradient is averaged over ranks in
    backward: every rank steps the global batch's gradient. With ``lr_tau = 0`` it is exactly
    :class:`SogCLRClipLoss` at ``temperature = tau_init`` (the value shifted by ``tau * rho``).

    Defaults: FastCLIP's published CC3M setting (ResNet-50, global batch 1024, 37 epochs):
    tau_init 0.07, [0.01, 1.0], rho 6.5, lr_tau 2e-4, gamma 0.2 with a cosine decay from 1.0
    over 18 epochs (call ``set_epoch``). CC12M: rho 8.5, lr_tau 1e-4, 16 decay epochs.

    - [0] Wei et al., FastCLIP, 2024, https://arxiv.org/abs/2407.01445

    Args:
        num_samples: Number of image-text pairs in the training set (rows of each role's
            table), an integer >= 1. Required.
        rho: KL radius, >= 0. Default 6.5.
        tau_init: Initial temperature, in ``[tau_min, tau_max]``. Default 0.07.
        tau_min: Lower bound of the temperature, > 0. Default 0.01.
        tau_max: Upper bound of the temperature, >= ``tau_min``. Default 1.0.
        lr_tau: Learning rate of the temperature, >= 0. Default 2e-4.
        lr_tau_drop_below: ``lr_tau`` is multiplied by ``lr_tau_drop_factor`` while tau is at or
            below this threshold (> 0). Default 0.03; None switches the drop off.
        lr_tau_drop_factor: That factor, in (0, 1]. Default 1/3.
        gamma: Final moving-average weight, in (0, 1]. Default 0.2.
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch by a cosine (call ``set_epoch`` every epoch). Default 18.
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
        >>> model = torch.nn.Linear(32, 32)
        >>> loss_fn = RGCLGClipLoss(100)
        >>> optimizer = loss_fn.optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
        >>> image, text = model(torch.randn(8, 32)), model(torch.randn(8, 32))
        >>> loss = loss_fn(image, text, None, index=torch.arange(8))
        >>> loss.backward(); optimizer.step()
        >>> round(loss_fn.temperature, 2)  # the learned global temperature
        0.07
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rho: float = 6.5,
        tau_init: float = 0.07,
        tau_min: float = 0.01,
        tau_max: float = 1.0,
        lr_tau: float = 2e-4,
        lr_tau_drop_below: Optional[float] = 0.03,
        lr_tau_drop_factor: float = 1.0 / 3.0,
        gamma: float = 0.2,
        gamma_decay_epochs: Optional[int] = 18,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        temperature = GlobalTemperature(tau_init, tau_min, tau_max)
        super().__init__(
            num_samples,
            GlobalLearnedTemperature(rho, temperature),
            gamma,
            gamma_decay_epochs,
            local_loss,
            gather_with_grad,
            rank,
            world_size,
            state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)
        self.global_temperature = temperature
        self._init_schedule(lr_tau, lr_tau_drop_below, lr_tau_drop_factor)

    def temperature_of(self, embeddings: Tensor, role: str = "image") -> Tensor:
        """The temperature of each row of ``embeddings`` (n, dim): the global one, shape (n,)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}.")
        return torch.full((embeddings.shape[0],), self.temperature, device=embeddings.device)

"""Image-text SogCLR, iSogCLR and DySTreSS with OpenCLIP's ``ClipLoss`` call signature.

The per-sample state, the block math, the temperature rules and the forward are ``tau_core``'s;
this module only builds the two image-text blocks (image anchors against the gathered texts, text
anchors against the gathered images, one state per anchor role) and speaks ``ClipLoss``'s
arguments. It needs neither Lightly nor anything of OpenCLIP.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from tau_core import (
    FixedTemperature,
    GlobalLearnedTemperature,
    GlobalTemperature,
    LearnedTemperature,
    NetworkTemperature,
)
from tau_core.adapter import (
    AnchorBlock,
    DySTreSSBase,
    GlobalContrastiveLoss,
    GlobalTemperatureLoss,
    TemperatureNetworkLoss,
    build_networks,
    check_chunk_size,
    check_flag,
    gather_with_grad,
    is_distributed,
)
from tau_core.adapter import rank as process_rank
from tau_core.adapter import world_size as process_world_size

IndexLike = Union[Tensor, Sequence[int]]
ROLES = ("image", "text")
FEATURE_NAMES = ("image_features", "text_features")


def image_text_blocks(
    zi: Tensor, zt: Tensor, gather: bool, tiled: bool = False
) -> list[AnchorBlock]:
    """Local image anchors against gathered texts, and local text anchors against gathered images.

    Features are gathered (one all-gather) with a gradient that sums over ranks in backward, so
    after DDP's averaging the parameter gradient equals one process's on the global batch. Each
    block has shape (b, b * world_size) in float32; the positive is the pair's own column.
    ``zi`` and ``zt`` are the L2-normalised float32 image and text features. ``tiled``: the blocks
    carry the candidates instead of the similarities (the loss computes them a tile at a time).
    """
    b = zi.shape[0]
    with torch.autocast(device_type=zi.device.type, enabled=False):
        if gather:
            pairs = gather_with_grad(torch.stack([zi, zt], dim=1))
            zi_all, zt_all = pairs[:, 0], pairs[:, 1]
            offset = process_rank() * b
        else:
            zi_all, zt_all, offset = zi, zt, 0
    pos_col = torch.arange(b, device=zi.device) + offset
    if tiled:
        return [
            AnchorBlock(None, pos_col, None, suffix="_image", anchors=zi, candidates=zt_all),
            AnchorBlock(
                None,
                pos_col,
                None,
                "_text",
                anchors=zt,
                candidates=zi_all,
                transpose_of=None if gather else 0,
            ),
        ]
    with torch.autocast(device_type=zi.device.type, enabled=False):
        sim_image = zi @ zt_all.T
        # One process: the text anchors' block is the image block transposed (as in ClipLoss),
        # one matrix product instead of two, forward and backward.
        sim_text = sim_image.T if not gather else zt @ zi_all.T
    return [
        AnchorBlock(sim_image, pos_col, None, suffix="_image", anchors=zi),
        AnchorBlock(
            sim_text, pos_col, None, suffix="_text", anchors=zt, transpose_of=None if gather else 0
        ),
    ]


def unused_parameters_term(
    logit_scale: Optional[Tensor], logit_bias: Optional[Tensor]
) -> Union[Tensor, float]:
    """``0 * logit_scale (+ 0 * logit_bias)``: keeps DDP from failing on parameters without grad."""
    term: Union[Tensor, float] = 0.0  # a Python number: nothing made on the host
    for p in (logit_scale, logit_bias):
        if isinstance(p, Tensor):
            term = term + 0.0 * p.sum()
    return term


class _ClipMixin:
    """``ClipLoss``'s distributed arguments, their checks, and its image-text blocks.

    Our losses compute the local anchors against every rank's candidates with the gradient
    through the gather: the exact gradient of the global batch, which is what upstream's
    ``local_loss=True, gather_with_grad=True`` computes (and, with redundant work, its default).
    ``local_loss=True`` with ``gather_with_grad=False`` drops the gradient through the other
    ranks' features upstream; that is a different gradient, so it is refused, not ignored.
    """

    def _init_distributed(
        self, rank: int, world_size: int, local_loss: bool, gather_with_grad: bool
    ) -> None:
        check_flag("local_loss", local_loss)
        check_flag("gather_with_grad", gather_with_grad)
        if local_loss and not gather_with_grad:
            raise ValueError(
                f"{type(self).__name__} always computes the exact gradient of the global batch "
                "(local anchors against gathered candidates, gradient through the gather, as "
                "local_loss=True with gather_with_grad=True). local_loss=True with "
                "gather_with_grad=False would drop the gradient through other ranks' features: "
                "set gather_with_grad=True or local_loss=False."
            )
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if world_size < 1 or rank >= world_size:
            raise ValueError(
                f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}."
            )
        self.rank = rank
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def gathers(self) -> bool:
        if self.world_size <= 1:
            return False
        if not is_distributed() or process_world_size() != self.world_size:
            raise ValueError(
                f"world_size={self.world_size} but the default process group has "
                f"{process_world_size()} rank(s); build the loss after "
                "torch.distributed.init_process_group with its world size."
            )
        if process_rank() != self.rank:
            raise ValueError(f"rank={self.rank} but this process has rank {process_rank()}.")
        return True

    def anchor_blocks(self, zi: Tensor, zt: Tensor) -> list[AnchorBlock]:
        return image_text_blocks(zi, zt, self.gathers(), self.chunk_size > 0)

    def _clip_output(
        self,
        loss: Tensor,
        logit_scale: Optional[Tensor],
        logit_bias: Optional[Tensor],
        output_dict: bool,
    ) -> Union[Tensor, dict[str, Tensor]]:
        loss = loss + unused_parameters_term(logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class _GlobalContrastiveClipLoss(_ClipMixin, GlobalContrastiveLoss):
    """Image-text forward of SogCLR and iSogCLR: one state per anchor role."""

    def __init__(
        self,
        num_samples: int,
        rule: FixedTemperature | LearnedTemperature | GlobalLearnedTemperature | NetworkTemperature,
        gamma: float,
        gamma_decay_epochs: Optional[int],
        local_loss: bool,
        gather_with_grad: bool,
        rank: int,
        world_size: int,
        state_layout: str,
    ) -> None:
        self._init_distributed(rank, world_size, local_loss, gather_with_grad)
        suffixes = tuple(f"_{role}" for role in ROLES)
        super().__init__(
            num_samples, rule, gamma, gamma_decay_epochs, world_size > 1, suffixes, state_layout
        )

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
        """Loss of a batch of image-text pairs with the dataset index of each pair.

        Args:
            image_features: (batch_size, dim) image embeddings.
            text_features: (batch_size, dim) text embeddings.
            logit_scale: The model's learned scale; unused (the temperatures are the loss's),
                but kept in the graph with weight 0 so DDP sees it used.
            index: (batch_size,) dataset index of each pair, integers in [0, num_samples).
                Required (keyword only).
            logit_bias: Unused, as ``logit_scale``.
            output_dict: Return ``{"contrastive_loss": loss}`` as OpenCLIP's losses do.

        Returns:
            The mean of the image-anchor and text-anchor losses: its value is the objective
            estimate, its gradient the surrogate's. Statistics go to ``stats``, not to the
            returned dict (OpenCLIP sums every value of that dict into the total loss).

        Raises:
            ValueError: If ``index`` is missing, a feature tensor is not 2-D floating point or
                the two shapes differ, ``index`` does not hold one integer in
                ``[0, num_samples)`` per pair, or the features hold NaN or Inf. Raised on every
                rank and before the state changes; on an accelerator at a later call (see
                ``raise_deferred_error``) unless ``sync_checks`` is True.
            RuntimeError: With ``state_layout="sharded"`` when no process group exists.
        """
        loss = self.global_contrastive_loss(FEATURE_NAMES, image_features, text_features, index)
        return self._clip_output(loss, logit_scale, logit_bias, output_dict)


class _RoleTemperatureTables:
    """``tau_image`` and ``tau_text``: the per-sample temperature tables of the two anchor roles
    (iSogCLR's learned ones; TempNet's as predicted at each pair's last visit, NaN before)."""

    @property
    def tau_image(self) -> Tensor:
        """Temperature of each pair's image anchor, shape (num_samples,) (a copy)."""
        return self.state.table("tau_image")  # type: ignore[attr-defined]

    @property
    def tau_text(self) -> Tensor:
        """Temperature of each pair's text anchor, shape (num_samples,) (a copy)."""
        return self.state.table("tau_text")  # type: ignore[attr-defined]


class SogCLRClipLoss(_GlobalContrastiveClipLoss):
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
    def temperature(self) -> float:
        """The global temperature (settable, e.g. by a schedule)."""
        return self.settings.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.settings = FixedTemperature(value)

    @property
    def tau_image(self) -> Tensor:
        """The image anchors' temperature (all ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)

    @property
    def tau_text(self) -> Tensor:
        """The text anchors' temperature (all ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)


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

"""Temperature-aware contrastive losses for Lightly's SimCLR pipeline.

This module only builds SimCLR's similarity block (both local views as anchors against both
gathered views) and states each loss's arguments; the math, the state and the checks are
``tau_core``'s.
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
    gather_with_grad,
    rank,
)

IndexLike = Union[Tensor, Sequence[int]]
FEATURE_NAMES = ("out0", "out1")


def unimodal_blocks(z0: Tensor, z1: Tensor, gather: bool, tiled: bool = False) -> list[AnchorBlock]:
    """SimCLR's block: both local views as anchors against both (gathered) views as candidates.

    Rows are ``[view0; view1]`` of the local batch, columns ``[view0; view1]`` of the global
    batch; each row's positive is the other view and its own column is left out. Features are
    gathered (one all-gather) with a gradient that sums over ranks in backward, so after DDP's
    averaging the parameter gradient equals one process's on the global batch. ``z0`` and
    ``z1`` are the two views' L2-normalised float32 features. ``tiled``: the block carries the
    candidates instead of the similarities (the loss computes them a tile at a time).
    """
    b = z0.shape[0]
    with torch.autocast(device_type=z0.device.type, enabled=False):
        anchors = torch.cat([z0, z1])
        if gather:
            pairs = gather_with_grad(torch.stack([z0, z1], dim=1))
            candidates = torch.cat([pairs[:, 0], pairs[:, 1]])
            offset = rank() * b
        else:
            candidates, offset = anchors, 0
        sim = None if tiled else anchors @ candidates.T
    m = candidates.shape[0] // 2
    local = torch.arange(b, device=z0.device) + offset
    self_col = torch.cat([local, local + m])
    pos_col = torch.cat([local + m, local])
    return [
        AnchorBlock(
            sim,
            pos_col,
            self_col,
            views=2,
            anchors=anchors,
            candidates=candidates if tiled else None,
        )
    ]


class _UnimodalMixin:
    """SimCLR's blocks and Lightly's ``forward(out0, out1)`` (plus the index)."""

    def anchor_blocks(self, z0: Tensor, z1: Tensor) -> list[AnchorBlock]:
        return unimodal_blocks(z0, z1, self.gathers(), self.chunk_size > 0)


class _UnimodalGlobalLoss(_UnimodalMixin, GlobalContrastiveLoss):
    def forward(self, out0: Tensor, out1: Tensor, index: Optional[IndexLike] = None) -> Tensor:
        """Loss of a batch of two views with the dataset index of each sample.

        Args:
            out0: Output projections of the first views. Shape: (batch_size, embedding_size).
            out1: Output projections of the second views. Shape: (batch_size, embedding_size).
            index: Dataset index of each sample, integers in [0, num_samples).
                Shape: (batch_size,). Required.

        Returns:
            A scalar whose value is the objective estimate (mean over anchors) and whose gradient
            is the surrogate's. The samples' state is updated in training mode when the features
            require gradients; otherwise it is only read.

        Raises:
            ValueError: If ``index`` is missing (stateful losses), a feature tensor is not 2-D
                floating point or the two shapes differ, ``index`` does not hold one integer in
                ``[0, num_samples)`` per sample, or the features hold NaN or Inf. Raised on
                every rank and before the state changes; on an accelerator at a later call
                (see ``raise_deferred_error``) unless ``sync_checks`` is True.
            RuntimeError: With ``state_layout="sharded"`` when no process group exists.
        """
        return self.global_contrastive_loss(FEATURE_NAMES, out0, out1, index)


class SogCLRLoss(_UnimodalGlobalLoss):
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
    def temperature(self) -> float:
        """The global temperature (settable, e.g. by a schedule)."""
        return self.settings.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.settings = FixedTemperature(value)

    @property
    def tau(self) -> Tensor:
        """The temperature of every sample (all equal to ``temperature``), shape (num_samples,)."""
        return torch.full((self.num_samples,), self.temperature)


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


class TempNetLoss(TemperatureNetworkLoss, _UnimodalGlobalLoss):
    """iSogCLR with each sample's temperature predicted by a network (TempNet).

    iSogCLR's robust loss (see :class:`ISogCLRLoss`) where ``tau_i = f_theta(z_i)`` comes from a
    small network (:class:`tau_core.TemperatureNetwork`) of the anchor's own detached,
    L2-normalised embedding, instead of a per-sample table: it exists for samples never seen in
    training (``temperature_of``). The two views of a sample share the mean of their two
    predictions. Per step (h as in :class:`SogCLRLoss`)::

        u_i   <- (1 - gamma) * u_i + gamma * mean_z exp(h_iz / tau_i)
        grad_i = log(u_i) + rho - mean_z w_iz * h_iz / tau_i,      w_iz = exp(h_iz / tau_i) / u_i
        loss   = mean_i mean_z w_iz * h_iz   +   mean_i tau_i * [grad_i]_detached (gradient only)

    The model gets iSogCLR's surrogate at the predicted (detached) temperatures; the network gets
    ``grad_i`` pushed through ``tau_i = f_theta(z_i)`` by the chain rule. Train the network with
    ``param_groups()`` in your optimizer and ``register_optimizer(optimizer)``, or with
    ``optimizer(...)``: Adam, ``lr_tau`` decayed by ``lr_tau_decay`` each epoch (``set_epoch``),
    no weight decay. In a process group the network's gradients are averaged over ranks in
    backward. The state keeps ``log_u`` and ``tau`` (the temperature predicted at a sample's last
    visit, NaN before it). The defaults are this package's choice for SimCLR (the published
    settings are image-text ones, see :class:`openclip_tau.TempNetClipLoss`).

    - [0] Qiu et al., "To Cool or not to Cool? Temperature Network Meets Large Foundation Models
      via DRO", ICML 2024, https://arxiv.org/abs/2404.04575

    Args:
        num_samples: Number of samples in the training set (rows of the per-sample state), an
            integer >= 1, e.g. ``len(dataset)``. Required.
        dim: Dimension of the embeddings (the network's input), an integer >= 1. Required.
        rho: KL radius, >= 0. Default 0.4.
        tau_min: Lowest predicted temperature, > 0. Default 0.05.
        tau_max: Highest predicted temperature, >= ``tau_min``. Default 0.5.
        lr_tau: Adam learning rate of the network, >= 0. Default 3e-5.
        lr_tau_decay: Factor per epoch of that learning rate, in (0, 1]. Default 0.9.
        num_prototypes: Prototypes of the network, an integer >= 1. Default 256.
        dropout: Dropout rate of the network in training mode, in [0, 1). Default 0.5.
        seed: Seed of the network's initialisation (the same on every rank). Default 0.
        gamma: Moving-average weight, in (0, 1]. Default 0.8.
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
        TypeError: If ``num_samples`` or ``dim`` is not given.
        ValueError: If ``num_samples`` or ``dim`` is not a positive integer (None, 0, negative, a
            float), a setting is passed positionally, a setting lies outside its range (the message
            names the argument and the range), or ``state_layout`` is unknown; raised before
            anything is built.

    Examples:
        >>> model = torch.nn.Linear(16, 16)
        >>> loss_fn = TempNetLoss(100, dim=16)
        >>> optimizer = loss_fn.optimizer(model.parameters(), lr=1e-3)
        >>> loss = loss_fn(model(torch.randn(8, 16)), model(torch.randn(8, 16)), torch.arange(8))
        >>> loss.backward(); optimizer.step()
        >>> loss_fn.temperature_of(model(torch.randn(3, 16))).shape  # also for unseen samples
        torch.Size([3])
    """

    def __init__(
        self,
        num_samples: int,
        *,
        dim: int,
        rho: float = 0.4,
        tau_min: float = 0.05,
        tau_max: float = 0.5,
        lr_tau: float = 3e-5,
        lr_tau_decay: float = 0.9,
        num_prototypes: int = 256,
        dropout: float = 0.5,
        seed: int = 0,
        gamma: float = 0.8,
        gamma_decay_epochs: Optional[int] = None,
        gather_distributed: bool = False,
        state_layout: str = "replicated",
        chunk_size: int = 0,
    ) -> None:
        networks = build_networks(
            ("sample",), dim, tau_min, tau_max, num_prototypes, dropout, seed, "TempNetLoss"
        )
        super().__init__(
            num_samples,
            NetworkTemperature(rho, {"": networks["sample"]}),
            gamma,
            gamma_decay_epochs,
            gather_distributed,
            state_layout=state_layout,
        )
        self.chunk_size = check_chunk_size(chunk_size)
        self.temperature_networks = networks
        self._init_schedule(lr_tau, lr_tau_decay)

    def temperature_of(self, embeddings: Tensor) -> Tensor:
        """The network's temperature for each row of ``embeddings`` (n, dim), without dropout.

        The embeddings are L2-normalised first, as in training. Returns shape (n,).
        """
        return self._predict(embeddings, "sample")

    @property
    def tau(self) -> Tensor:
        """Temperature predicted at each sample's last visit (NaN if never), (num_samples,)."""
        return self.state.table("tau")


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

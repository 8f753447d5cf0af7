"""The two image-text blocks, ``ClipLoss``'s arguments and call, and the per-role temperature
tables, shared by the losses of :mod:`openclip_tau.losses`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from tau_core import (
    FixedTemperature,
    GlobalLearnedTemperature,
    LearnedTemperature,
    NetworkTemperature,
)
from tau_core.adapter import (
    AnchorBlock,
    GlobalContrastiveLoss,
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

"""SimCLR's similarity block and the forward of Lightly's ``loss(out0, out1, index)`` call,
shared by the losses of :mod:`lightly_tau.losses`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from tau_core.adapter import AnchorBlock, GlobalContrastiveLoss, gather_with_grad, rank

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

"""How an adapter describes its similarity blocks, and the surrogate summed over them.

An adapter (``lightly_tau``, ``openclip_tau``) says only how its features become similarity blocks
(:class:`AnchorBlock`: anchors against candidates); the losses
(:class:`tau_core.global_contrastive.GlobalContrastiveLoss`, :class:`tau_core.dystress.DySTreSSBase`)
compute each block's rows and sum the surrogate with :class:`SurrogateSum`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from tau_core.functional import weighted_similarity_sum


@dataclass
class AnchorBlock:
    """One block of anchors against candidates, as an adapter builds it.

    Attributes:
        sim: (rows, cols) cosine similarities, float32, with autograd history; None for a tiled
            block (the loss computes ``anchors @ candidates.T`` a tile of rows at a time).
        pos_col: (rows,) column of each row's positive.
        self_col: (rows,) the row's own column (left out of its negatives), or None.
        suffix: Table suffix of this anchor role ("" unimodal, "_image", "_text").
        views: Rows per sample: ``rows = views * batch_size`` and rows ``k * b + i`` belong to
            sample ``i`` of the local batch for every view ``k`` (SimCLR's two views: 2).
        anchors: (rows, dim) the anchors' normalised features (for rules that read them), or None.
        transpose_of: Position of an earlier block whose ``sim`` this block's is the transpose
            of (image-text in one process), or None. Its surrogate coefficients are then folded
            into that block's, so autograd keeps one block and no transposed copy.
        candidates: (cols, dim) the candidates' normalised features of a tiled block, or None.
    """

    sim: Optional[Tensor]
    pos_col: Tensor
    self_col: Optional[Tensor]
    suffix: str = ""
    views: int = 1
    anchors: Optional[Tensor] = None
    transpose_of: Optional[int] = None
    candidates: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return (self.sim if self.sim is not None else self.anchors).device


class SurrogateSum:
    """``sum over blocks of sum(coef * sim) / scale``, the surrogate whose gradient is ``coef``.

    A block that is the transpose of an earlier one adds ``coef.T`` (rescaled) to that block's
    coefficients instead of a term of its own: ``sum(c_t * S.T) = sum(c_t.T * S)``.
    """

    def __init__(self, blocks: Sequence[AnchorBlock]) -> None:
        self.blocks = blocks
        self.terms: dict[int, tuple[Tensor, float]] = {}
        self.tiled: list[Tensor] = []  # tiled blocks' sums, already scaled

    def add(self, position: int, coef: Tensor, scale: float) -> None:
        primary = self.blocks[position].transpose_of
        if primary is None:
            self.terms[position] = (coef, scale)
            return
        primary_coef, primary_scale = self.terms[primary]
        primary_coef.add_(coef.T, alpha=primary_scale / scale)

    def total(self) -> Tensor:
        out = sum(self.tiled, torch.zeros((), device=self.blocks[0].device))
        for position, (coef, scale) in self.terms.items():
            out = out + weighted_similarity_sum(self.blocks[position].sim, coef) / scale
        return out

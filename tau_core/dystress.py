"""DySTreSS: the cross-entropy of ``sim / tau(sim)``, a temperature that depends on each pair's
similarity (stateless).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from tau_core.blocks import AnchorBlock, SurrogateSum
from tau_core.checks import check_temperature_range
from tau_core.distributed import is_distributed
from tau_core.functional import dystress_rows, dystress_temperature, with_value
from tau_core.losses import ContrastiveLoss, IndexLike, warn_caller
from tau_core.tiled import tiled_dystress

# tau_max / tau_min above which s / tau(s) stops increasing in s (about 4.5), and above which a
# negative near s = 0.23 outranks a perfect positive (about 8.2); see docs/methods.md.
DYSTRESS_MONOTONE_RATIO = 4.5
DYSTRESS_RANKING_RATIO = 8.2

# Pairs whose temperatures DySTreSS's stats summarise (a subsample of rows beyond it).
STATS_PAIRS = 1 << 20


class DySTreSSBase(ContrastiveLoss):
    """Cross-entropy of ``sim / tau(sim)`` over an adapter's blocks (stateless).

    ``tau(s) = tau_min + (tau_max - tau_min) * sin(pi * s / 2) ** 2`` (see
    :func:`tau_core.dystress_temperature`); a ratio ``tau_max / tau_min`` above
    ``DYSTRESS_MONOTONE_RATIO`` warns.

    Args:
        tau_min: Temperature at similarity 0, > 0.
        tau_max: Temperature at similarity +-1, >= ``tau_min``.
        gather_distributed: If True, negatives are gathered from all processes.

    Raises:
        ValueError: If a temperature is not positive or ``tau_min > tau_max``.
    """

    def __init__(self, tau_min: float, tau_max: float, gather_distributed: bool) -> None:
        super().__init__(gather_distributed)
        if isinstance(tau_min, int) and not isinstance(tau_min, bool) and tau_min > 1:
            raise ValueError(
                f"{type(self).__name__}'s first argument is a temperature, tau_min (default "
                f"0.1), not num_samples: got {tau_min}. DySTreSS keeps no per-sample state and "
                f"needs no dataset size: {type(self).__name__}() or "
                f"{type(self).__name__}(tau_min=0.1, tau_max=0.2)."
            )
        self.tau_min, self.tau_max = check_temperature_range(tau_min, tau_max)
        warn_wide_dystress_range(self.tau_min, self.tau_max)

    def dystress_loss(
        self, names: tuple[str, str], out0: Tensor, out1: Tensor, index: Optional[IndexLike]
    ) -> Tensor:
        """Mean over blocks of the mean cross-entropy of each block's rows (``index`` unused)."""
        batch = self.check_batch(names, (out0, out1), None, is_distributed() and self.gathers())
        blocks = self.anchor_blocks(batch.z0, batch.z1)
        surrogate_sum = SurrogateSum(blocks)
        value = torch.zeros((), device=blocks[0].device)
        tau_pos = tau_neg = tau_all = 0.0
        for position, block in enumerate(blocks):
            args = (block.pos_col, block.self_col, self.tau_min, self.tau_max)
            if block.sim is None:  # tiled: no (rows, cols) block is ever held
                rows = block.anchors.shape[0]
                term, result = tiled_dystress(
                    block.anchors, block.candidates, *args, self.chunk_size
                )
                surrogate_sum.tiled.append(term / (rows * len(blocks)))
            else:
                rows = block.sim.shape[0]
                result = dystress_rows(block.sim.detach(), *args)
                surrogate_sum.add(position, result.coef, rows * len(blocks))
            value = value + result.loss.mean() / len(blocks)
            pos_sum = result.tau_positive.sum()
            neg_sum = result.tau_negative_sum.sum()
            tau_pos = tau_pos + pos_sum / (rows * len(blocks))
            tau_neg = tau_neg + neg_sum / (rows * max(result.num_negatives, 1) * len(blocks))
            tau_all = tau_all + (pos_sum + neg_sum) / (
                rows * (result.num_negatives + 1) * len(blocks)
            )
        loss = with_value(surrogate_sum.total(), value)
        self.set_stats(
            {
                "objective": loss,
                "tau_mean": tau_all,
                "tau_positive_mean": tau_pos,
                "tau_negative_mean": tau_neg,
            },
            {"tau": self._pair_temperatures(blocks)},
        )
        return loss

    def _pair_temperatures(self, blocks: Sequence[AnchorBlock]) -> Tensor:
        """The temperatures of the pairs (positives and negatives) behind ``stats``' quantiles:
        every pair, or evenly spaced rows' pairs beyond ``STATS_PAIRS`` of them."""
        parts = []
        for block in blocks:
            tiled = block.sim is None
            rows, cols = (
                (block.anchors.shape[0], block.candidates.shape[0]) if tiled else block.sim.shape
            )
            step = max(1, math.ceil(rows * cols / (STATS_PAIRS // len(blocks))))
            picked = torch.arange(0, rows, step, device=block.device)
            if tiled:  # the picked rows' similarities only
                with torch.no_grad(), torch.autocast(block.device.type, enabled=False):
                    sim = block.anchors.detach()[picked] @ block.candidates.detach().T
            else:
                sim = block.sim.detach()[picked]
            if block.self_col is not None:
                # Every column but the row's own, in order (a gather of a known shape, where a
                # boolean mask would wait for the device to learn its size).
                others = torch.arange(cols - 1, device=sim.device)[None, :]
                others = others + (others >= block.self_col[picked][:, None])
                sim = sim.gather(1, others)
            parts.append(dystress_temperature(sim.flatten(), self.tau_min, self.tau_max))
        return torch.cat(parts)


def warn_wide_dystress_range(tau_min: float, tau_max: float) -> None:
    """Warns when ``tau_max / tau_min`` lets some negatives outrank closer pairs."""
    ratio = tau_max / tau_min
    if ratio > DYSTRESS_MONOTONE_RATIO:
        severity = (
            "a negative at similarity near 0.23 now outranks a perfect positive"
            if ratio > DYSTRESS_RANKING_RATIO
            else "s / tau(s) is no longer increasing in s, so some negatives outrank closer ones"
        )
        warn_caller(
            f"DySTreSS temperature range tau_max / tau_min = {ratio:.2f} exceeds "
            f"{DYSTRESS_MONOTONE_RATIO}: {severity}. Keep tau_max / tau_min below "
            f"{DYSTRESS_MONOTONE_RATIO}."
        )

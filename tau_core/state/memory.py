"""The memory arithmetic of the per-sample state: bytes per rank and the start-up line."""

from __future__ import annotations

from typing import Any, Optional

from tau_core.distributed import world_size as current_world_size
from tau_core.state.base import PerSampleStateBase


def state_of(loss_or_state: Any) -> tuple[PerSampleStateBase, Optional[str]]:
    """The state of a loss (or the state itself) and the loss's class name (None for a state)."""
    if isinstance(loss_or_state, PerSampleStateBase):
        return loss_or_state, None
    state = getattr(loss_or_state, "state", None)
    if not isinstance(state, PerSampleStateBase):
        raise ValueError(
            f"{type(loss_or_state).__name__} keeps no per-sample state (a stateful loss or a "
            "PerSampleState is needed)."
        )
    return state, type(loss_or_state).__name__


def format_bytes(n: float) -> str:
    """Decimal units, as disks and the issue's arithmetic count them: 4.97 GB, 120.00 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _world(state: PerSampleStateBase, world_size: Optional[int]) -> int:
    """``world_size``, else the state's own, else the current process group's."""
    return world_size or getattr(state, "world_size", None) or current_world_size()


def state_bytes_per_rank(loss_or_state: Any, world_size: Optional[int] = None) -> int:
    """Bytes of per-sample tables one rank holds: ``4 * tables * rows`` where rows is
    ``num_samples`` (replicated) or ``ceil(num_samples / world_size)`` (sharded, the largest
    shard). ``world_size`` defaults to the state's own, else the current process group's."""
    state, _ = state_of(loss_or_state)
    return 4 * len(state.names) * state.rows_per_rank(_world(state, world_size))


def describe_state_memory(loss_or_state: Any, world_size: Optional[int] = None) -> str:
    """The start-up line on the per-sample state's memory per rank, for the chosen layout.

    Args:
        loss_or_state: A stateful loss (its ``state``) or a per-sample state.
        world_size: Ranks to count for, an integer >= 1. Default None: the state's own, else the
            current process group's.

    Raises:
        ValueError: If ``loss_or_state`` keeps no per-sample state.

    Examples:
        >>> describe_state_memory(ISogCLRClipLoss(414_080_000, state_layout="sharded"), 8)
        'per-sample state: 6 tables x 414,080,000 samples, 1.24 GB per rank (sharded over 8)'
        >>> describe_state_memory(SogCLRClipLoss(2_800_000), 4)
        'per-sample state: 2 tables x 2,800,000 samples, 22.40 MB per rank (replicated on each of 4 ranks)'
    """
    state, _ = state_of(loss_or_state)
    world = _world(state, world_size)
    size = format_bytes(state_bytes_per_rank(state, world))
    if state.layout == "sharded":
        where = f"sharded over {world}"
    elif world > 1:
        where = f"replicated on each of {world} ranks"
    else:
        where = "replicated, one process"
    return (
        f"per-sample state: {len(state.names)} tables x {state.num_samples:,} samples, "
        f"{size} per rank ({where})"
    )

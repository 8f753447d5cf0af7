"""The choice of layout: :data:`STATE_LAYOUTS` and :func:`make_state`."""

from __future__ import annotations

from typing import Mapping

from tau_core.options import STATE_LAYOUTS
from tau_core.state.base import PerSampleStateBase
from tau_core.state.replicated import PerSampleState
from tau_core.state.sharded import ShardedPerSampleState

__all__ = ["STATE_LAYOUTS", "make_state"]


def make_state(
    layout: str, num_samples: int, initial_values: Mapping[str, float]
) -> PerSampleStateBase:
    """The per-sample state of a loss in the chosen layout.

    ``"replicated"`` (the default of every loss): every rank holds every row
    (:class:`PerSampleState`); 4 bytes x tables x num_samples per rank, no communication to
    read, the global batch gathered to write. ``"sharded"``: rank ``r`` holds the rows
    ``i % world_size == r`` (:class:`ShardedPerSampleState`), 1/world_size of that memory, rows
    exchanged with their owners at every read and write (so every rank must run the loss's
    forward together, also in evaluation). Both give bit-identical losses, gradients and tables.

    Args:
        layout: ``"replicated"`` or ``"sharded"`` (:data:`STATE_LAYOUTS`).
        num_samples: Rows of each table, an integer >= 1.
        initial_values: Name and initial value of each table (at least one).

    Raises:
        ValueError: If ``layout`` is unknown, ``num_samples`` is not a positive integer or
            ``initial_values`` is empty.
    """
    if layout == "replicated":
        return PerSampleState(num_samples, initial_values)
    if layout == "sharded":
        return ShardedPerSampleState(num_samples, initial_values)
    raise ValueError(f"state_layout must be one of {list(STATE_LAYOUTS)}, got {layout!r}.")

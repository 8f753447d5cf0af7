"""The replicated layout: every rank holds every row of every table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from tau_core.distributed import concat_all_gather, is_distributed
from tau_core.state.base import (
    SHARD_INFO,
    SHARD_PREFIX,
    PerSampleStateBase,
    full_tables,
    keep_last_occurrence,
)


class PerSampleState(PerSampleStateBase):
    """Named per-sample tables (one float32 per sample each) shared by the stateful losses.

    The tables hold what SogCLR and iSogCLR remember about each sample between its visits: the
    moving average ``log_u``, the temperature ``tau`` and its momentum. Only the rows of the batch
    are read and written, so a step costs the same for 10^4 and 10^8 samples, and memory is 4 bytes
    per table per sample.

    The tables are declared once, like torchmetrics' ``Metric.add_state``:

    - they are part of ``state_dict()`` (``<prefix><name>``) and restored by ``load_state_dict``;
      loading a table of another length raises a ``ValueError`` naming both lengths and leaves the
      tables unchanged;
    - ``module.to(device)`` moves them, but a dtype cast (``.half()``, Lightning's "bf16-true")
      does not touch them: the temperature math stays in float32;
    - they are plain tensors, not buffers, so DDP never broadcasts them from rank 0 (that would
      drop the other ranks' updates and cost a full-table broadcast per step). Instead ``write``
      gathers every rank's indices and rows whenever a process group of several ranks exists, so
      all ranks apply the same update for the whole global batch and stay identical.

    Duplicates: when an index occurs more than once in one (global) batch, every occurrence was
    computed from the same stored rows, and the last occurrence (in rank order, then batch order)
    is the one written. The write is deterministic, so ranks cannot drift apart.

    Layout: every rank holds the whole table (4 bytes x tables x samples).
    :class:`ShardedPerSampleState` implements the same interface
    (:class:`PerSampleStateBase`) and holds 1/world_size of it per rank; :func:`make_state`
    chooses between them.

    Args:
        num_samples: Number of samples in the dataset, an integer >= 1; valid indices are
            [0, num_samples).
        initial_values: Name and initial value of each table (at least one).

    Raises:
        ValueError: If ``num_samples`` is not a positive integer or ``initial_values`` is empty.

    Examples:
        >>> state = PerSampleState(1000, {"log_u": float("-inf"), "tau": 0.1})
        >>> rows = state.read(torch.tensor([3, 7]))
        >>> state.write(torch.tensor([3, 7]), {"log_u": rows["log_u"] + 1, "tau": rows["tau"]})
    """

    layout = "replicated"
    collective_read = False

    def __init__(self, num_samples: int, initial_values: Mapping[str, float]) -> None:
        super().__init__(num_samples, initial_values)
        self._tables: dict[str, Tensor] = {
            name: torch.full((self.num_samples,), float(value), dtype=torch.float32)
            for name, value in self.initial_values.items()
        }

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        return list(self._tables)

    @property
    def device(self) -> torch.device:
        return next(iter(self._tables.values())).device

    def table(self, name: str) -> Tensor:
        """The whole table ``name`` (a copy: writing to it does not change the state)."""
        return self._tables[name].clone()

    def reset(self) -> None:
        """Sets every table back to its initial value."""
        for name, table in self._tables.items():
            table.fill_(self.initial_values[name])

    def held_layout(self) -> tuple[int, int]:
        return 1, 0

    def rows_per_rank(self, world_size: int) -> int:
        return self.num_samples

    def split_rows(self, world_size: int, rank: int) -> dict[str, Tensor]:
        return {name: t[rank::world_size].cpu().clone() for name, t in self._tables.items()}

    # ------------------------------------------------------------------ read / write
    def read(self, index: Tensor, device: Optional[torch.device] = None) -> dict[str, Tensor]:
        """Rows ``index`` of every table, as float32 tensors on ``device`` (default: index's)."""
        device = index.device if device is None else device
        local = index.to(self.device)
        return {name: table[local].to(device) for name, table in self._tables.items()}

    @torch.no_grad()
    def prepare_write(
        self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True
    ) -> Callable[[], None]:
        """Does every collective of :meth:`write` now and returns the local part, not yet applied.

        With ``synchronize`` and several ranks, the indices and rows of all ranks are gathered, so
        every rank writes the whole global batch and the tables stay identical. The returned
        function writes the gathered rows into this rank's tables, with no communication,
        whenever it is called (a loss calls it when the backward pass reaches it, so a forward
        that is never backpropagated writes nothing while every rank still takes part in the same
        collectives).
        """
        packed = self._stacked_rows(rows)
        names = self.names
        index = index.to(packed.device)
        if synchronize and is_distributed():
            index = concat_all_gather(index)
            packed = concat_all_gather(packed)
        index, packed = keep_last_occurrence(index, packed)
        index = index.to(self.device)
        packed = packed.to(self.device)

        def apply() -> None:
            with torch.no_grad():  # a context, not a decorator: torch.compile traces it
                for k, name in enumerate(names):
                    self._tables[name][index] = packed[:, k].to(self._tables[name].device)

        return apply

    # ------------------------------------------------------------------ checkpoints
    def check_loadable(self, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
        """The tables found in ``state_dict`` under ``prefix``, checked against ``num_samples``.

        Raises a ``ValueError`` naming both sizes for a table of another length, and for the
        state dict of one shard of a sharded state (it lacks the other ranks' rows). A module
        that holds this state calls it before loading its own entries, so that a failed load
        changes nothing (``nn.Module`` loads a parent's entries before its children's).
        """
        if prefix + SHARD_INFO in state_dict:
            total, world, part = (int(v) for v in state_dict[prefix + SHARD_INFO].tolist())
            if world != 1:
                raise ValueError(
                    f"Cannot load '{prefix}{SHARD_INFO}': the state dict holds shard {part} of "
                    f"{world} of a sharded per-sample state (its own rows only), and a replicated "
                    "state needs every row. Save the sharded state with save_state_shards and "
                    "load every shard with load_state_shards."
                )
            state_dict = {
                prefix + name: state_dict[prefix + SHARD_PREFIX + name]
                for name in self._tables
                if prefix + SHARD_PREFIX + name in state_dict
            }
        return full_tables(state_dict, prefix, list(self._tables), self.num_samples)

    def _saved_rows(self, prefix: str, keep_vars: bool) -> dict[str, Tensor]:
        return {
            prefix + name: table if keep_vars else table.detach().clone()
            for name, table in self._tables.items()
        }

    def _missing_keys(self, prefix: str, incoming: Mapping[str, Tensor]) -> list[str]:
        return [prefix + name for name in self._tables if name not in incoming]

    def _copy_in(self, incoming: Mapping[str, Tensor]) -> None:
        for name, value in incoming.items():
            self._tables[name].copy_(value.to(self.device, torch.float32))

    def _move_to(self, device: torch.device) -> None:
        self._tables = {name: t.to(device) for name, t in self._tables.items()}

    def _put_rows(self, rows: Tensor) -> None:
        """Replaces every table by a column of ``rows`` (num_samples, tables), already checked."""
        self._tables = {
            name: rows[:, k].to(self.device, torch.float32).contiguous()
            for k, name in enumerate(self._tables)
        }

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, tables={self.names}"

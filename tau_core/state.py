"""Per-sample state: named float32 tables indexed by dataset index, synchronised across ranks.

Two layouts with one interface (``read``, ``write``, ``table``, ``state_dict``), chosen by
:func:`make_state`: :class:`PerSampleState` (every rank holds every row) and
:class:`ShardedPerSampleState` (rank r holds the rows ``i % world_size == r``). Checkpoints that
re-shard to any world size: :func:`save_state_shards`, :func:`load_state_shards`. The start-up
line on memory per rank: :func:`describe_state_memory`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch import distributed as torch_dist

from tau_core.distributed import (
    all_gather_known_sizes,
    all_gather_sizes,
    all_gather_variable,
    all_to_all_counts,
    all_to_all_equal,
    all_to_all_variable,
    backend_has_all_to_all,
    barrier,
    concat_all_gather,
    is_distributed,
)
from tau_core.distributed import rank as current_rank
from tau_core.distributed import world_size as current_world_size

IndexLike = Union[Tensor, Sequence[int]]

#: State-dict keys of a sharded state: ``<prefix>shard.<name>`` (this rank's rows of each table)
#: and ``<prefix>shard_info`` (int64: num_samples, world_size, rank).
SHARD_PREFIX = "shard."
SHARD_INFO = "shard_info"


def checked_tables(
    num_samples: Any, initial_values: Mapping[str, float]
) -> tuple[int, dict[str, float]]:
    """``(num_samples, initial_values)`` checked: a positive integer and at least one table."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if int(num_samples) <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if not initial_values:
        raise ValueError("initial_values must name at least one table.")
    return int(num_samples), dict(initial_values)


class PerSampleState(nn.Module):
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
    :class:`ShardedPerSampleState` has the same interface and holds 1/world_size of it per rank;
    :func:`make_state` chooses between them.

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

    #: Whether ``read`` is a collective (every rank must call it together): False here.
    collective_read = False

    def __init__(self, num_samples: int, initial_values: Mapping[str, float]) -> None:
        super().__init__()
        self.num_samples, self.initial_values = checked_tables(num_samples, initial_values)
        self._tables: dict[str, Tensor] = {
            name: torch.full((num_samples,), float(value), dtype=torch.float32)
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

    def index_problem(
        self, index: IndexLike, batch_size: Optional[int] = None
    ) -> tuple[Optional[Tensor], Optional[str]]:
        """``(index as int64, None)``, or ``(None, message)`` naming what is wrong with its form.

        Checks what needs no look at the values: integer dtype, one dimension, length
        ``batch_size`` (when given), not empty. The range of the values is :meth:`range_problem`'s,
        so that a loss can check every rank's values with one collective.
        """
        if not isinstance(index, Tensor):
            try:
                index = torch.as_tensor(index)
            except (TypeError, ValueError, RuntimeError):
                return None, f"index must be a tensor of integers, got {type(index)}."
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            return None, f"index must hold integers (dataset indices), got dtype {index.dtype}."
        if index.dim() != 1:
            return None, f"index must be 1-D, got shape {tuple(index.shape)}."
        if batch_size is not None and index.numel() != batch_size:
            return None, (
                f"index has {index.numel()} entries but the batch has {batch_size} samples; "
                "pass one dataset index per sample."
            )
        if index.numel() == 0:
            return None, "index is empty: the batch needs at least one sample."
        return index.long(), None

    def range_problem(self, low: int, high: int) -> Optional[str]:
        """The message for index values outside [0, num_samples), given their min and max."""
        if low < 0 or high >= self.num_samples:
            bad = low if low < 0 else high
            return (
                f"index {bad} is out of range: indices must lie in [0, {self.num_samples}) "
                f"(num_samples={self.num_samples})."
            )
        return None

    def check_index(
        self,
        index: IndexLike,
        batch_size: Optional[int] = None,
        features: Mapping[str, Tensor] = {},
    ) -> Tensor:
        """Returns ``index`` as an int64 tensor, or raises a ``ValueError`` that names the problem.

        Checks its form (:meth:`index_problem`), values in [0, num_samples), and that every tensor
        in ``features`` (name to tensor) is finite. All value checks share one device-to-host copy.
        """
        checked, problem = self.index_problem(index, batch_size)
        if problem:
            raise ValueError(problem)
        flags = [checked.min(), checked.max()]
        flags += [torch.isfinite(f).all().to(checked.device, torch.long) for f in features.values()]
        low, high, *finite = torch.stack(flags).tolist()
        for name, ok in zip(features, finite):
            if not ok:
                raise ValueError(f"{name} contains NaN or Inf values; the state was not changed.")
        problem = self.range_problem(low, high)
        if problem:
            raise ValueError(problem)
        return checked

    def read(self, index: Tensor, device: Optional[torch.device] = None) -> dict[str, Tensor]:
        """Rows ``index`` of every table, as float32 tensors on ``device`` (default: index's)."""
        device = index.device if device is None else device
        local = index.to(self.device)
        return {name: table[local].to(device) for name, table in self._tables.items()}

    def write(self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True) -> None:
        """Writes ``rows[name][k]`` to ``table[name][index[k]]`` for every table.

        With ``synchronize`` (the default) and a process group of several ranks, the indices and
        rows of all ranks are gathered first, so every rank writes the whole global batch and the
        tables stay identical (a collective: every rank must call it). All tables must be given.
        The same as ``prepare_write(index, rows, synchronize)()``.
        """
        self.prepare_write(index, rows, synchronize)()

    @torch.no_grad()
    def prepare_write(
        self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True
    ) -> Callable[[], None]:
        """Does every collective of :meth:`write` now and returns the local part, not yet applied.

        The returned function writes the already gathered rows into this rank's tables, with no
        communication, whenever it is called (a loss calls it when the backward pass reaches it,
        so a forward that is never backpropagated writes nothing while every rank still takes
        part in the same collectives).
        """
        if set(rows) != set(self._tables):
            raise ValueError(f"write needs rows for {sorted(self._tables)}, got {sorted(rows)}.")
        names = list(self._tables)
        packed = torch.stack([rows[name].detach().float() for name in names], dim=1)
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

    # ------------------------------------------------- nn.Module integration
    def _apply(self, fn: Any, recurse: bool = True) -> PerSampleState:  # type: ignore[override]
        # Follow device moves only: apply fn to an empty probe to learn the target device.
        target = fn(torch.empty(0, device=self.device)).device
        if target != self.device:
            self._tables = {name: t.to(target) for name, t in self._tables.items()}
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, table in self._tables.items():
            destination[prefix + name] = table if keep_vars else table.detach().clone()

    def check_loadable(self, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
        """The tables found in ``state_dict`` under ``prefix``, checked against ``num_samples``.

        Raises a ``ValueError`` naming both sizes for a table of another length. A module that
        holds this state calls it before loading its own entries, so that a failed load
        changes nothing (``nn.Module`` loads a parent's entries before its children's).
        """
        incoming: dict[str, Tensor] = {}
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
        incoming.update(full_tables(state_dict, prefix, list(self._tables), self.num_samples))
        return incoming

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Check every table before copying any, so a bad checkpoint leaves the state untouched.
        incoming = self.check_loadable(state_dict, prefix)
        missing_keys.extend(prefix + name for name in self._tables if name not in incoming)
        for name, value in incoming.items():
            self._tables[name].copy_(value.to(self.device, torch.float32))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # nn.Module knows only parameters and buffers and reports the tables as unexpected,
        # which makes a strict load_state_dict of the module's own state_dict fail.
        tables = {prefix + name for name in self._tables}
        tables |= {prefix + SHARD_PREFIX + name for name in self._tables} | {prefix + SHARD_INFO}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in tables]

    def _put_rows(self, rows: Tensor) -> None:
        """Replaces every table by a column of ``rows`` (num_samples, tables), already checked."""
        self._tables = {
            name: rows[:, k].to(self.device, torch.float32).contiguous()
            for k, name in enumerate(self._tables)
        }

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, tables={self.names}"


def full_tables(
    state_dict: Mapping[str, Any], prefix: str, names: Sequence[str], num_samples: int
) -> dict[str, Tensor]:
    """The whole tables ``<prefix><name>`` found in ``state_dict``, each checked to hold
    ``num_samples`` rows (a ``ValueError`` naming both sizes otherwise)."""
    incoming: dict[str, Tensor] = {}
    for name in names:
        key = prefix + name
        if key not in state_dict:
            continue
        value = state_dict[key]
        if value.dim() != 1 or value.shape[0] != num_samples:
            raise ValueError(
                f"Cannot load per-sample state '{key}' of shape {tuple(value.shape)} into a "
                f"loss with num_samples={num_samples}: the checkpoint was made for "
                f"{value.shape[0] if value.dim() == 1 else 'another'} samples. Build the loss "
                "with the num_samples of the checkpoint's dataset."
            )
        incoming[name] = value
    return incoming


def keep_last_occurrence(index: Tensor, packed: Tensor) -> tuple[Tensor, Tensor]:
    """Makes every occurrence of a repeated index carry the rows of its last occurrence.

    After this, a scatter with duplicate indices writes identical values whatever order the
    device applies them in. No host synchronisation (unlike ``torch.unique``).
    """
    n = index.numel()
    if n <= 1:
        return index, packed
    sorted_index, order = torch.sort(index, stable=True)
    new_run = torch.ones(n, dtype=torch.bool, device=index.device)
    new_run[1:] = sorted_index[1:] != sorted_index[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    position = torch.arange(n, device=index.device)
    last_in_run = torch.zeros(n, dtype=torch.long, device=index.device).scatter_reduce_(
        0, run_id, position, reduce="amax", include_self=False
    )
    return sorted_index, packed[order[last_in_run[run_id]]]


# ====================================================================== the sharded layout


def shard_rows(num_samples: int, world_size: int, rank: int) -> int:
    """Rows owned by ``rank``: the indices ``i`` in [0, num_samples) with ``i % world_size == rank``."""
    return max(0, (num_samples - rank + world_size - 1) // world_size)


NO_GROUP = (
    "state_layout='sharded' splits the per-sample tables over the ranks of a torch.distributed "
    "process group, and none is initialized. Call torch.distributed.init_process_group (torchrun "
    "and Lightning's DDP strategy do) before the loss's first forward, or use "
    "state_layout='replicated' for a single process."
)

EXCHANGES = ("auto", "all_to_all", "padded_all_to_all", "all_gather")


def pack_rows(index: Tensor, rows: Tensor) -> Tensor:
    """``(n, 2 + tables)`` int32: each int64 index and its float32 rows, bit for bit, so that one
    collective carries both."""
    return torch.cat([index.contiguous().view(torch.int32).view(-1, 2), rows.view(torch.int32)], 1)


def unpack_rows(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack_rows`: ``(index int64, rows float32)``."""
    # reshape(-1) gives a dense copy (or view) whatever the strides of a one-row slice are.
    index = packed[:, :2].reshape(-1).view(torch.int64)
    tables = packed.shape[1] - 2
    return index, packed[:, 2:].reshape(-1).view(torch.float32).view(packed.shape[0], tables)


class ShardedPerSampleState(PerSampleState):
    """Per-sample tables split over the ranks: rank ``r`` holds the rows ``i % world_size == r``.

    The interface of :class:`PerSampleState` (``read``, ``write``, ``table``, ``state_dict``,
    ``check_loadable``) with 1/world_size of its memory per rank: row ``i`` lives on rank
    ``i % W`` at position ``i // W`` (the modulo spreads every contiguous index range, and so
    every rank's share of a batch, evenly over the owners).

    - ``read(index)``: this rank's batch indices go to their owners, which answer with the rows.
      Three exchanges, chosen by ``exchange`` (``"auto"``: the first that fits):
      ``"padded_all_to_all"`` (CUDA tensors on NCCL or MPI): two ``all_to_all_single`` of
      ``world_size x batch`` entries (indices, then rows; padding where an owner gets fewer),
      with no host synchronisation, so a GPU step never waits for the host; it needs the same
      local batch size on every rank (as the losses' gathers do). ``"all_to_all"`` (CPU tensors
      on Gloo or MPI): the counts per owner first, then exactly the entries (three
      ``all_to_all_single``; batch sizes may differ). ``"all_gather"`` (Gloo with CUDA tensors,
      which has no all_to_all): every rank's indices are gathered, each owner fills the rows it
      holds, and a second ``all_gather`` brings each rank its rows.
    - ``write(index, rows)``: each rank sends each (index, rows) entry to the entry's owner (the
      index and the rows travel bit for bit in one int32 tensor); the owner receives them in
      rank order, then batch order, and keeps the last occurrence of a repeated index, exactly as
      the replicated write does over the gathered global batch. The tables are therefore
      bit-identical to the replicated layout's after any number of steps.
    - Both are collectives: **every rank must call them together**, also in evaluation (a loss
      with this state reads in every forward, so all ranks must run the forward together; a
      validation pass on rank 0 only would wait forever). Ranks may hold batches of different
      sizes.
    - ``table(name)`` gathers the whole table on every rank (a collective; for inspection and
      tests: it allocates ``4 * num_samples`` bytes). ``shard(name)`` and :meth:`owned_index` give
      this rank's rows without communication.

    The shard is allocated when the state first meets a process group (at construction if one
    exists, else at the first access): a loss built before ``init_process_group`` (a
    LightningModule's ``__init__``) works, and an access with no group raises a ``RuntimeError``.
    ``module.to(device)`` moves the shard (NCCL needs it on the GPU); dtype casts do not touch it.

    Checkpoints: ``state_dict()`` holds this rank's rows (``<prefix>shard.<name>``) and
    ``<prefix>shard_info`` (num_samples, world_size, rank); it loads back into the same rank of
    the same world size. ``load_state_dict`` also accepts a replicated state dict (every row; each
    rank keeps its own). To resume with another world size, save with :func:`save_state_shards`
    (one file per rank and an ``index.json``) and load with :func:`load_state_shards`, which
    re-shards to any world size and either layout.

    Args:
        num_samples: Number of samples in the dataset; valid indices are [0, num_samples).
        initial_values: Name and initial value of each table.
        exchange: ``"auto"`` (padded_all_to_all for accelerator tensors and all_to_all for CPU
            tensors where the backend has all_to_all, else all_gather), ``"padded_all_to_all"``,
            ``"all_to_all"`` or ``"all_gather"``. Default ``"auto"``.

    Raises:
        ValueError: If ``num_samples`` is not a positive integer, ``initial_values`` is empty,
            or ``exchange`` is unknown.
        RuntimeError: When the tables are first used and no process group exists (building
            the state before the group, e.g. in a LightningModule's ``__init__``, works).

    Examples:
        >>> # in every rank of a process group (torchrun):
        >>> state = ShardedPerSampleState(414_080_000, {"log_u": float("-inf"), "tau": 0.03})
        >>> rows = state.read(index)  # index: this rank's batch
        >>> state.write(index, {"log_u": new_log_u, "tau": new_tau})
    """

    #: ``read`` exchanges rows with their owners: every rank must call it together, so a loss
    #: should agree its batch checks across ranks in every forward, not only when it writes.
    collective_read = True

    #: Whether ``load_state_dict`` takes this rank's rows from the state dict. Set it to False
    #: where the rows come from a shard folder instead (:func:`load_state_shards`), e.g. when
    #: Lightning loads rank 0's checkpoint into every rank: the state dict's rows are then
    #: ignored, whichever rank wrote them.
    rows_from_state_dict: bool = True

    def __init__(
        self, num_samples: int, initial_values: Mapping[str, float], exchange: str = "auto"
    ) -> None:
        nn.Module.__init__(self)
        self.num_samples, self.initial_values = checked_tables(num_samples, initial_values)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {list(EXCHANGES)}, got {exchange!r}.")
        self.exchange = exchange
        self._names = list(self.initial_values)
        self._target_device = torch.device("cpu")
        self._storage: Optional[Tensor] = None  # (owned rows, tables) float32
        self.world_size: Optional[int] = None
        self.rank: Optional[int] = None
        if torch_dist.is_available() and torch_dist.is_initialized():
            self._shard()

    # ------------------------------------------------------------------ the shard
    def _shard(self) -> Tensor:
        """This rank's rows, allocated at the first call with a process group."""
        group = torch_dist.is_available() and torch_dist.is_initialized()
        if self._storage is not None:
            now = torch_dist.get_world_size() if group else None
            if now != self.world_size:
                raise RuntimeError(
                    f"This sharded per-sample state was split over {self.world_size} ranks, but "
                    f"the process group now has {now or 'no'} ranks. Save it with "
                    "save_state_shards and load it into a state built in the new group."
                )
            return self._storage
        if not group:
            raise RuntimeError(NO_GROUP)
        self.world_size, self.rank = torch_dist.get_world_size(), torch_dist.get_rank()
        rows = shard_rows(self.num_samples, self.world_size, self.rank)
        self._storage = torch.empty((rows, len(self._names)), device=self._target_device)
        self.reset()
        return self._storage

    def _exchange(self, device: torch.device) -> str:
        """The exchange used for tensors on ``device`` (``exchange``, or auto's choice)."""
        if self.exchange != "auto":
            return self.exchange
        if not backend_has_all_to_all(device):
            return "all_gather"
        return "all_to_all" if device.type == "cpu" else "padded_all_to_all"

    def _padded_route(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(order, slot)``: entry ``order[j]`` of the batch goes to position ``slot[j]`` of a
        ``world_size x batch`` send buffer, whose block ``d`` holds owner ``d``'s entries in batch
        order, then padding. Computed on the device, without a host synchronisation."""
        world, b = self.world_size, index.numel()
        owner = index % world
        order = torch.argsort(owner, stable=True)
        counts = torch.zeros(world, dtype=torch.long, device=index.device)
        counts.scatter_add_(0, owner, torch.ones_like(owner))
        starts = torch.cumsum(counts, 0) - counts
        sorted_owner = owner[order]
        slot = sorted_owner * b + torch.arange(b, device=index.device) - starts[sorted_owner]
        return order, slot

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def device(self) -> torch.device:
        return self._target_device if self._storage is None else self._storage.device

    def owned_index(self) -> Tensor:
        """The dataset indices of this rank's rows, in storage order (``rank::world_size``)."""
        self._shard()
        return torch.arange(self.rank, self.num_samples, self.world_size)

    def shard(self, name: str) -> Tensor:
        """This rank's rows of table ``name`` (a copy), in :meth:`owned_index` order."""
        return self._shard()[:, self._column(name)].clone()

    def _column(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(f"no per-sample table {name!r}; the tables are {self._names}.")
        return self._names.index(name)

    def table(self, name: str) -> Tensor:
        """The whole table ``name``, gathered from every rank (a collective; a new tensor)."""
        storage = self._shard()
        column = storage[:, self._column(name)].contiguous()
        world = self.world_size
        if world == 1:
            return column.clone()
        sizes = [shard_rows(self.num_samples, world, r) for r in range(world)]
        full = column.new_empty(self.num_samples)
        for r, part in enumerate(all_gather_known_sizes(column, sizes)):
            full[r::world] = part
        return full

    def reset(self) -> None:
        """Sets this rank's rows back to their initial values (no communication)."""
        storage = self._shard()
        values = torch.tensor([self.initial_values[n] for n in self._names], device=storage.device)
        storage.copy_(values.expand_as(storage))

    # ------------------------------------------------------------------ read / write
    def read(self, index: Tensor, device: Optional[torch.device] = None) -> dict[str, Tensor]:
        """Rows ``index`` (this rank's batch) of every table, as float32 tensors on ``device``
        (default: index's). A collective: every rank must call it."""
        device = index.device if device is None else device
        storage = self._shard()
        index = index.to(storage.device, torch.long)
        world = self.world_size
        if world == 1:
            packed = storage[index]
        elif self._exchange(storage.device) == "padded_all_to_all":
            order, slot = self._padded_route(index)
            send = torch.full((world * index.numel(),), -1, dtype=torch.long, device=index.device)
            send[slot] = index[order]
            asked = all_to_all_equal(send)
            # Padding (-1) asks for row 0, and its answer is never used; an empty shard answers 0.
            if storage.shape[0]:
                answers = storage[asked.clamp(min=0) // world]
            else:
                answers = storage.new_zeros((asked.numel(), storage.shape[1]))
            answered = all_to_all_equal(answers)
            packed = torch.empty_like(answered[: index.numel()])
            packed[order] = answered[slot]
        elif self._exchange(storage.device) == "all_to_all":
            owner = index % world
            order = torch.argsort(owner, stable=True)
            send = torch.bincount(owner, minlength=world)
            counts = torch.cat([send, all_to_all_counts(send)]).tolist()
            sent, received = counts[:world], counts[world:]
            asked = all_to_all_variable(index[order], sent, received)
            answered = all_to_all_variable(storage[asked // world], received, sent)
            packed = torch.empty_like(answered)
            packed[order] = answered
        else:
            sizes = all_gather_sizes(index.numel(), storage.device)
            every = torch.cat(all_gather_known_sizes(index, sizes))
            owner = every % world
            order = torch.argsort(owner, stable=True)
            per_owner = torch.bincount(owner, minlength=world).tolist()
            start = sum(per_owner[: self.rank])
            mine = every[order][start : start + per_owner[self.rank]]
            answers = all_gather_known_sizes(storage[mine // world], per_owner)
            full = storage.new_empty((every.numel(), storage.shape[1]))
            full[order] = torch.cat(answers)
            offset = sum(sizes[: self.rank])
            packed = full[offset : offset + index.numel()]
        return {name: packed[:, k].to(device).contiguous() for k, name in enumerate(self._names)}

    def write(self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True) -> None:
        """Writes ``rows[name][k]`` to row ``index[k]`` of every table, on the row's owner.

        ``index`` and ``rows`` are this rank's batch; every rank's entries reach their owners, and
        a repeated index keeps its last occurrence in rank order, then batch order (as the
        replicated write). A collective: every rank must call it. ``synchronize=False`` is
        refused with several ranks (the rows of other owners would be lost). All tables must be
        given. The same as ``prepare_write(index, rows, synchronize)()``.
        """
        self.prepare_write(index, rows, synchronize)()

    @torch.no_grad()
    def prepare_write(
        self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True
    ) -> Callable[[], None]:
        """Every exchange of :meth:`write` now; returns the local write of the received rows."""
        if set(rows) != set(self._names):
            raise ValueError(f"write needs rows for {sorted(self._names)}, got {sorted(rows)}.")
        storage = self._shard()
        world = self.world_size
        if not synchronize and world > 1:
            raise ValueError(
                "synchronize=False is not possible with a sharded state: the rows of other "
                "ranks' samples live on those ranks."
            )
        packed = torch.stack([rows[n].detach().float() for n in self._names], dim=1)
        packed = packed.to(storage.device)
        index = index.to(storage.device, torch.long)
        if index.numel() != packed.shape[0]:
            raise ValueError(
                f"write got {index.numel()} indices and {packed.shape[0]} rows; one row per index."
            )
        if world > 1 and self._exchange(storage.device) == "padded_all_to_all":
            return self._padded_write(index, packed)
        if world > 1:
            message = pack_rows(index, packed)
            if self._exchange(storage.device) == "all_to_all":
                owner = index % world
                order = torch.argsort(owner, stable=True)
                send = torch.bincount(owner, minlength=world)
                counts = torch.cat([send, all_to_all_counts(send)]).tolist()
                message = all_to_all_variable(message[order], counts[:world], counts[world:])
                index, packed = unpack_rows(message)
            else:
                index, packed = unpack_rows(torch.cat(all_gather_variable(message)))
                mine = index % world == self.rank
                index, packed = index[mine], packed[mine]
        index, packed = keep_last_occurrence(index, packed)

        def apply() -> None:
            with torch.no_grad():  # a context, not a decorator: torch.compile traces it
                self._shard()[index // world] = packed

        return apply

    def _padded_write(self, index: Tensor, packed: Tensor) -> Callable[[], None]:
        """The write through one ``world_size x batch`` all_to_all, with no host synchronisation.

        Padding entries (index -1) become writes of row 0's current value to row 0, placed before
        every real entry, so that a real write of row 0 is the last occurrence and wins.
        """
        world = self.world_size
        order, slot = self._padded_route(index)
        every_index = torch.full(
            (world * index.numel(),), -1, dtype=torch.long, device=index.device
        )
        every_rows = packed.new_zeros((world * index.numel(), packed.shape[1]))
        every_index[slot] = index[order]
        every_rows[slot] = packed[order]
        received = all_to_all_equal(pack_rows(every_index, every_rows))

        def apply() -> None:
            with torch.no_grad():  # a context, not a decorator: torch.compile traces it
                storage = self._shard()
                if not storage.shape[0]:
                    return  # no rows here (num_samples < world_size): only padding arrived
                index, rows = unpack_rows(received)
                real = index >= 0
                index = torch.where(real, index, self.rank)  # row 0 of this shard
                rows = torch.where(real[:, None], rows, storage[0])
                first = torch.argsort(
                    real.to(torch.uint8), stable=True
                )  # padding first, order kept
                index, rows = keep_last_occurrence(index[first], rows[first])
                storage[index // world] = rows

        return apply

    # ------------------------------------------------- nn.Module integration
    def _apply(self, fn: Any, recurse: bool = True) -> ShardedPerSampleState:  # type: ignore[override]
        target = fn(torch.empty(0, device=self.device)).device
        if target != self.device:
            self._target_device = target
            if self._storage is not None:
                self._storage = self._storage.to(target)
        return nn.Module._apply(self, fn, recurse)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        storage = self._shard()
        destination[prefix + SHARD_INFO] = torch.tensor(
            [self.num_samples, self.world_size, self.rank], dtype=torch.long
        )
        for k, name in enumerate(self._names):
            destination[prefix + SHARD_PREFIX + name] = storage[:, k].clone()

    def check_loadable(self, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
        """This rank's rows of each table found in ``state_dict`` under ``prefix``, checked.

        Accepts whole tables (a replicated state dict: ``<prefix><name>`` of ``num_samples``
        rows; each rank keeps its own) and this state's own format (``<prefix>shard.<name>`` with
        ``<prefix>shard_info`` of the same num_samples, world size and rank). Anything else
        raises a ``ValueError`` naming the sizes, before anything is loaded.
        """
        self._shard()
        world, me = self.world_size, self.rank
        incoming: dict[str, Tensor] = {}
        if not self.rows_from_state_dict:
            return incoming
        if any(prefix + name in state_dict for name in self._names):
            whole = full_tables(state_dict, prefix, self._names, self.num_samples)
            return {name: value[me::world] for name, value in whole.items()}
        if prefix + SHARD_INFO not in state_dict:
            return incoming
        total, saved_world, saved_rank = (int(v) for v in state_dict[prefix + SHARD_INFO].tolist())
        if total != self.num_samples:
            raise ValueError(
                f"Cannot load the sharded per-sample state '{prefix}{SHARD_INFO}' into a loss "
                f"with num_samples={self.num_samples}: the checkpoint was made for {total} "
                "samples. Build the loss with the num_samples of the checkpoint's dataset."
            )
        if (saved_world, saved_rank) != (world, me):
            raise ValueError(
                f"Cannot load '{prefix}{SHARD_INFO}': the state dict holds shard {saved_rank} of "
                f"{saved_world}, and this process is rank {me} of {world}. A state dict holds "
                "one rank's rows only; save with save_state_shards and load with "
                "load_state_shards to resume with another world size or rank."
            )
        rows = shard_rows(self.num_samples, world, me)
        for name in self._names:
            key = prefix + SHARD_PREFIX + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.dim() != 1 or value.shape[0] != rows:
                raise ValueError(
                    f"Cannot load '{key}' of shape {tuple(value.shape)}: shard {me} of {world} "
                    f"of num_samples={self.num_samples} has {rows} rows."
                )
            incoming[name] = value
        return incoming

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        incoming = self.check_loadable(state_dict, prefix)
        if self.rows_from_state_dict:
            missing_keys.extend(
                prefix + SHARD_PREFIX + name for name in self._names if name not in incoming
            )
        storage = self._shard()
        for name, value in incoming.items():
            storage[:, self._column(name)].copy_(value.to(storage.device, torch.float32))
        nn.Module._load_from_state_dict(
            self,
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        ours = {prefix + name for name in self._names} | {prefix + SHARD_INFO}
        ours |= {prefix + SHARD_PREFIX + name for name in self._names}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in ours]

    def _put_rows(self, rows: Tensor) -> None:
        """Replaces this rank's rows by ``rows`` (owned rows, tables), already checked."""
        self._storage = rows.to(self.device, torch.float32).contiguous()

    def extra_repr(self) -> str:
        where = (
            "not yet sharded (no process group seen)"
            if self._storage is None
            else f"rank {self.rank} of {self.world_size}, {self._storage.shape[0]} rows"
        )
        return f"num_samples={self.num_samples}, tables={self.names}, {where}"


# ====================================================================== layouts


STATE_LAYOUTS = ("replicated", "sharded")


def make_state(
    layout: str, num_samples: int, initial_values: Mapping[str, float]
) -> PerSampleState:
    """The per-sample state of a loss in the chosen layout.

    ``"replicated"`` (the default of every loss): every rank holds every row
    (:class:`PerSampleState`); 4 bytes x tables x num_samples per rank, no communication to
    read, the global batch gathered to write. ``"sharded"``: rank ``r`` holds the rows
    ``i % world_size == r`` (:class:`ShardedPerSampleState`), 1/world_size of that memory, rows
    exchanged with their owners at every read and write (so every rank must run the loss's
    forward together, also in evaluation). Both give bit-identical losses, gradients and tables.
    """
    if layout == "replicated":
        return PerSampleState(num_samples, initial_values)
    if layout == "sharded":
        return ShardedPerSampleState(num_samples, initial_values)
    raise ValueError(f"state_layout must be one of {list(STATE_LAYOUTS)}, got {layout!r}.")


def _state_of(loss_or_state: Any) -> tuple[PerSampleState, Optional[str]]:
    """The state of a loss (or the state itself) and the loss's class name (None for a state)."""
    if isinstance(loss_or_state, PerSampleState):
        return loss_or_state, None
    state = getattr(loss_or_state, "state", None)
    if not isinstance(state, PerSampleState):
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


def state_bytes_per_rank(loss_or_state: Any, world_size: Optional[int] = None) -> int:
    """Bytes of per-sample tables one rank holds: ``4 * tables * rows`` where rows is
    ``num_samples`` (replicated) or ``ceil(num_samples / world_size)`` (sharded, the largest
    shard). ``world_size`` defaults to the state's own, else the current process group's."""
    state, _ = _state_of(loss_or_state)
    world = world_size or getattr(state, "world_size", None) or current_world_size()
    rows = state.num_samples
    if isinstance(state, ShardedPerSampleState):
        rows = shard_rows(state.num_samples, world, 0)
    return 4 * len(state.names) * rows


def describe_state_memory(loss_or_state: Any, world_size: Optional[int] = None) -> str:
    """The start-up line on the per-sample state's memory per rank, for the chosen layout.

    Examples:
        >>> describe_state_memory(ISogCLRClipLoss(414_080_000, state_layout="sharded"), 8)
        'per-sample state: 6 tables x 414,080,000 samples, 1.24 GB per rank (sharded over 8)'
        >>> describe_state_memory(SogCLRClipLoss(2_800_000), 4)
        'per-sample state: 2 tables x 2,800,000 samples, 22.40 MB per rank (replicated on each of 4 ranks)'
    """
    state, _ = _state_of(loss_or_state)
    world = world_size or getattr(state, "world_size", None) or current_world_size()
    size = format_bytes(state_bytes_per_rank(state, world))
    if isinstance(state, ShardedPerSampleState):
        where = f"sharded over {world}"
    elif world > 1:
        where = f"replicated on each of {world} ranks"
    else:
        where = "replicated, one process"
    return (
        f"per-sample state: {len(state.names)} tables x {state.num_samples:,} samples, "
        f"{size} per rank ({where})"
    )


# ====================================================================== checkpoints


SHARD_FORMAT = "tau_core.per_sample_state.shards/1"
INDEX_FILE = "index.json"
OWNER_RULE = "row i is in shard i % world_size, at position i // world_size"


def shard_file_name(rank: int, world_size: int) -> str:
    """``shard-00003-of-00008.pt``: the file of one rank's rows."""
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def _layout_of(state: PerSampleState) -> tuple[int, int]:
    """(world size, rank) of the rows a state holds: a sharded state's own, or (1, 0)."""
    if isinstance(state, ShardedPerSampleState):
        state._shard()
        return state.world_size, state.rank
    return 1, 0


def save_state_shards(loss_or_state: Any, directory: Union[str, os.PathLike]) -> Path:
    """Writes the per-sample state as one file per rank plus ``index.json``; returns the folder.

    A collective: every rank calls it with the same ``directory`` (a shared file system). Rank
    ``r`` of ``W`` writes ``shard-<r>-of-<W>.pt`` with the rows ``i % W == r`` of every table
    (a replicated state writes the same split, so the saving is parallel in both layouts);
    rank 0 writes ``index.json`` last, once every shard is complete, so a folder without it is
    an unfinished save. The files hold plain tensors (``torch.load(weights_only=True)``).

    Why shards and not one gathered table: a LAION-400M iSogCLR state is 9.9 GB; gathering it
    would need that much memory on one rank and a write by one process, while the shards are
    written in parallel, each 1/W of it, and :func:`load_state_shards` reads any set of them
    into any world size.
    """
    state, tag = _state_of(loss_or_state)
    directory = Path(directory)
    world, me = current_world_size(), current_rank()
    if isinstance(state, ShardedPerSampleState):
        state._shard()
        rows = {name: state.shard(name) for name in state.names}
    else:
        rows = {name: state._tables[name][me::world].cpu().clone() for name in state.names}
    index_path = directory / INDEX_FILE
    if me == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if index_path.exists():
            index_path.unlink()  # the folder is incomplete until the new index is written
    barrier()
    payload = {
        "format": SHARD_FORMAT,
        "num_samples": state.num_samples,
        "world_size": world,
        "rank": me,
        "tables": state.names,
        "loss": tag,
        "rows": {name: value.cpu() for name, value in rows.items()},
    }
    path = directory / shard_file_name(me, world)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    barrier()
    if me == 0:
        index = {
            "format": SHARD_FORMAT,
            "num_samples": state.num_samples,
            "world_size": world,
            "tables": state.names,
            "loss": tag,
            "owner": OWNER_RULE,
            "shards": [shard_file_name(r, world) for r in range(world)],
            "rows_per_shard": [shard_rows(state.num_samples, world, r) for r in range(world)],
        }
        partial = index_path.with_name(INDEX_FILE + ".partial")
        partial.write_text(json.dumps(index, indent=1))
        os.replace(partial, index_path)
    barrier()
    return directory


def load_state_shards(loss_or_state: Any, directory: Union[str, os.PathLike]) -> None:
    """Loads a folder written by :func:`save_state_shards` into this state, whatever the world
    size of the save and of this run, and either layout (a sharded state takes its own rows, a
    replicated one every row).

    Everything is checked before anything is copied, and the new rows are assembled apart and
    put in place at the end, so an error leaves the state unchanged: a missing ``index.json`` or
    shard file, a shard of another ``num_samples``, other tables (another loss) or another loss
    class raise a ``ValueError`` (``FileNotFoundError`` for missing files) naming the file and
    the sizes. Each rank reads only the shards that hold some of its rows, memory-mapped.
    """
    state, tag = _state_of(loss_or_state)
    world, me = _layout_of(state)  # a sharded state without a process group stops here
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} is missing: {directory} is not a complete per-sample state checkpoint "
            "(written by save_state_shards; a save that did not finish has no index)."
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{index_path} is not a per-sample state index: {err}") from err
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise ValueError(f"{index_path} is not a per-sample state index (format {SHARD_FORMAT}).")
    _check_header(index_path, index, state, tag)
    saved_world = int(index["world_size"])
    shards = [directory / shard_file_name(r, saved_world) for r in range(saved_world)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_path} lists {saved_world} shards, and {len(missing)} of them are missing: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. Nothing was loaded."
        )
    # Shard s holds rows i = s (mod saved_world); this rank needs i = me (mod world): some exist
    # only if s = me (mod gcd).
    step = math.gcd(saved_world, world)
    needed = [s for s in range(saved_world) if s % step == me % step]
    payloads = []
    for s in needed:
        try:
            payload = torch.load(shards[s], map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"Cannot read the per-sample state shard {shards[s]}: {err}") from err
        _check_shard(shards[s], payload, index, s, state, tag)
        payloads.append((s, payload))
    rows = shard_rows(state.num_samples, world, me)
    names = state.names
    new = torch.empty((rows, len(names)), dtype=torch.float32)
    filled = 0
    chunk = 1 << 24
    for s, payload in payloads:
        count = shard_rows(state.num_samples, saved_world, s)
        for begin in range(0, count, chunk):
            k = torch.arange(begin, min(begin + chunk, count))
            g = s + saved_world * k
            mine = g % world == me
            k, target = k[mine], g[mine] // world
            for c, name in enumerate(names):
                new[target, c] = payload["rows"][name][k]
            filled += int(k.numel())
    if filled != rows:  # the ownership arithmetic guarantees it; a wrong result is never silent
        raise RuntimeError(f"re-sharding filled {filled} of {rows} rows from {directory}.")
    state._put_rows(new)


def _check_header(path: Path, header: Mapping[str, Any], state: PerSampleState, tag: Any) -> None:
    if int(header.get("num_samples", -1)) != state.num_samples:
        raise ValueError(
            f"{path} holds a per-sample state of {header.get('num_samples')} samples; this loss "
            f"has num_samples={state.num_samples}. Build the loss with the num_samples of the "
            "checkpoint's dataset."
        )
    if list(header.get("tables", [])) != state.names:
        raise ValueError(
            f"{path} holds the tables {header.get('tables')} (another loss); this loss keeps "
            f"{state.names}."
        )
    if tag is not None and header.get("loss") not in (None, tag):
        raise ValueError(f"{path} holds the state of a {header.get('loss')}; this loss is a {tag}.")


def _check_shard(
    path: Path,
    payload: Any,
    index: Mapping[str, Any],
    shard: int,
    state: PerSampleState,
    tag: Any,
) -> None:
    if not isinstance(payload, dict) or payload.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a per-sample state shard (format {SHARD_FORMAT}).")
    _check_header(path, payload, state, tag)
    world = int(index["world_size"])
    if (payload.get("world_size"), payload.get("rank")) != (world, shard):
        raise ValueError(
            f"{path} is shard {payload.get('rank')} of {payload.get('world_size')}, but "
            f"{INDEX_FILE} expects shard {shard} of {world} there."
        )
    if payload.get("loss") != index.get("loss"):
        raise ValueError(
            f"{path} holds the state of a {payload.get('loss')}; {INDEX_FILE} was written for a "
            f"{index.get('loss')}."
        )
    expected = shard_rows(state.num_samples, world, shard)
    for name in state.names:
        value = payload["rows"].get(name)
        if not isinstance(value, Tensor) or value.shape != (expected,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else None
            raise ValueError(
                f"{path}: table {name!r} has shape {shape}; shard {shard} of {world} of "
                f"{state.num_samples} samples has {expected} rows."
            )

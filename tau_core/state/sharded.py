"""The sharded layout: rank r holds the rows ``i % world_size == r`` of every table."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor
from torch import distributed as torch_dist

from tau_core.distributed import all_gather_known_sizes
from tau_core.state.base import (
    SHARD_INFO,
    SHARD_PREFIX,
    PerSampleStateBase,
    full_tables,
    keep_last_occurrence,
    shard_rows,
)
from tau_core.state.exchange import (
    check_exchange,
    choose_exchange,
    read_rows,
    received_padded,
    send_padded,
    send_to_owners,
)

NO_GROUP = (
    "state_layout='sharded' splits the per-sample tables over the ranks of a torch.distributed "
    "process group, and none is initialized. Call torch.distributed.init_process_group (torchrun "
    "and Lightning's DDP strategy do) before the loss's first forward, or use "
    "state_layout='replicated' for a single process."
)


class ShardedPerSampleState(PerSampleStateBase):
    """Per-sample tables split over the ranks: rank ``r`` holds the rows ``i % world_size == r``.

    The interface of :class:`PerSampleStateBase` (``read``, ``write``, ``table``,
    ``state_dict``, ``check_loadable``), as :class:`PerSampleState`, with 1/world_size of its
    memory per rank: row ``i`` lives on rank ``i % W`` at position ``i // W`` (the modulo spreads
    every contiguous index range, and so every rank's share of a batch, evenly over the owners).

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
        num_samples: Number of samples in the dataset, an integer >= 1; valid indices are
            [0, num_samples).
        initial_values: Name and initial value of each table (at least one).
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

    layout = "sharded"
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
        super().__init__(num_samples, initial_values)
        self.exchange = check_exchange(exchange)
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
        return choose_exchange(self.exchange, device)

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

    def held_layout(self) -> tuple[int, int]:
        self._shard()  # a sharded state without a process group stops here
        return self.world_size, self.rank

    def rows_per_rank(self, world_size: int) -> int:
        return shard_rows(self.num_samples, world_size, 0)

    def split_rows(self, world_size: int, rank: int) -> dict[str, Tensor]:
        held = self.held_layout()
        if held != (world_size, rank):
            raise RuntimeError(f"this state holds shard {held[1]} of {held[0]}, not {rank}.")
        return {name: self.shard(name).cpu() for name in self._names}

    # ------------------------------------------------------------------ read / write
    def read(self, index: Tensor, device: Optional[torch.device] = None) -> dict[str, Tensor]:
        """Rows ``index`` (this rank's batch) of every table, as float32 tensors on ``device``
        (default: index's). A collective: every rank must call it."""
        device = index.device if device is None else device
        storage = self._shard()
        index = index.to(storage.device, torch.long)
        exchange = self._exchange(storage.device)
        packed = read_rows(exchange, storage, index, self.world_size, self.rank)
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
        packed = self._stacked_rows(rows).to(storage.device)
        index = index.to(storage.device, torch.long)
        if index.numel() != packed.shape[0]:
            raise ValueError(
                f"write got {index.numel()} indices and {packed.shape[0]} rows; one row per index."
            )
        exchange = self._exchange(storage.device)
        if world > 1 and exchange == "padded_all_to_all":
            return self._apply_padded(send_padded(index, packed, world))
        if world > 1:
            index, packed = send_to_owners(exchange, index, packed, world, self.rank)
        index, packed = keep_last_occurrence(index, packed)

        def apply() -> None:
            with torch.no_grad():  # a context, not a decorator: torch.compile traces it
                self._shard()[index // world] = packed

        return apply

    def _apply_padded(self, received: Tensor) -> Callable[[], None]:
        """The local write of a padded exchange's received buffer (no host synchronisation)."""
        world = self.world_size

        def apply() -> None:
            with torch.no_grad():  # a context, not a decorator: torch.compile traces it
                storage = self._shard()
                if not storage.shape[0]:
                    return  # no rows here (num_samples < world_size): only padding arrived
                index, rows = received_padded(received, storage, self.rank)
                index, rows = keep_last_occurrence(index, rows)
                storage[index // world] = rows

        return apply

    # ------------------------------------------------------------------ checkpoints
    def check_loadable(self, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
        """This rank's rows of each table found in ``state_dict`` under ``prefix``, checked.

        Accepts whole tables (a replicated state dict: ``<prefix><name>`` of ``num_samples``
        rows; each rank keeps its own) and this state's own format (``<prefix>shard.<name>`` with
        ``<prefix>shard_info`` of the same num_samples, world size and rank). Anything else
        raises a ``ValueError`` naming the sizes, before anything is loaded.
        """
        self._shard()
        world, me = self.world_size, self.rank
        if not self.rows_from_state_dict:
            return {}
        if any(prefix + name in state_dict for name in self._names):
            whole = full_tables(state_dict, prefix, self._names, self.num_samples)
            return {name: value[me::world] for name, value in whole.items()}
        if prefix + SHARD_INFO not in state_dict:
            return {}
        self._check_shard_info(state_dict[prefix + SHARD_INFO], prefix)
        rows = shard_rows(self.num_samples, world, me)
        incoming: dict[str, Tensor] = {}
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

    def _check_shard_info(self, info: Tensor, prefix: str) -> None:
        """A ``ValueError`` unless ``info`` (num_samples, world size, rank) is this shard's."""
        total, saved_world, saved_rank = (int(v) for v in info.tolist())
        if total != self.num_samples:
            raise ValueError(
                f"Cannot load the sharded per-sample state '{prefix}{SHARD_INFO}' into a loss "
                f"with num_samples={self.num_samples}: the checkpoint was made for {total} "
                "samples. Build the loss with the num_samples of the checkpoint's dataset."
            )
        if (saved_world, saved_rank) != (self.world_size, self.rank):
            raise ValueError(
                f"Cannot load '{prefix}{SHARD_INFO}': the state dict holds shard {saved_rank} of "
                f"{saved_world}, and this process is rank {self.rank} of {self.world_size}. A "
                "state dict holds one rank's rows only; save with save_state_shards and load "
                "with load_state_shards to resume with another world size or rank."
            )

    def _saved_rows(self, prefix: str, keep_vars: bool) -> dict[str, Tensor]:
        storage = self._shard()
        saved = {
            prefix + SHARD_INFO: torch.tensor(
                [self.num_samples, self.world_size, self.rank], dtype=torch.long
            )
        }
        for k, name in enumerate(self._names):
            saved[prefix + SHARD_PREFIX + name] = storage[:, k].clone()
        return saved

    def _missing_keys(self, prefix: str, incoming: Mapping[str, Tensor]) -> list[str]:
        if not self.rows_from_state_dict:
            return []
        return [prefix + SHARD_PREFIX + name for name in self._names if name not in incoming]

    def _copy_in(self, incoming: Mapping[str, Tensor]) -> None:
        storage = self._shard()
        for name, value in incoming.items():
            storage[:, self._column(name)].copy_(value.to(storage.device, torch.float32))

    def _move_to(self, device: torch.device) -> None:
        self._target_device = device
        if self._storage is not None:
            self._storage = self._storage.to(device)

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

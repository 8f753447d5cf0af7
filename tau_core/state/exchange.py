"""How a sharded state's rows travel between the ranks and their owners (row i on rank i % W).

Three exchanges, each a pair of plain functions (a read: rows to the asking ranks; a send: rows
to their owners), used by :class:`tau_core.ShardedPerSampleState`:

- ``"padded_all_to_all"`` (CUDA tensors on NCCL or MPI): ``all_to_all_single`` of
  ``world_size x batch`` entries, padded where an owner gets fewer; no host synchronisation, the
  same local batch size on every rank.
- ``"all_to_all"`` (CPU tensors on Gloo or MPI): the counts per owner first, then exactly the
  entries; batch sizes may differ.
- ``"all_gather"`` (Gloo with CUDA tensors, which has no all_to_all): every rank's entries are
  gathered and each owner keeps or answers its own.

A send carries each int64 index and its float32 rows bit for bit in one int32 tensor
(:func:`pack_rows`), so one collective moves both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tau_core.distributed import (
    all_gather_known_sizes,
    all_gather_sizes,
    all_gather_variable,
    all_to_all_counts,
    all_to_all_equal,
    all_to_all_variable,
    backend_has_all_to_all,
)

EXCHANGES = ("auto", "all_to_all", "padded_all_to_all", "all_gather")


def check_exchange(exchange: str) -> str:
    """``exchange`` if it names one of :data:`EXCHANGES`, else a ``ValueError``."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {list(EXCHANGES)}, got {exchange!r}.")
    return exchange


def choose_exchange(exchange: str, device: torch.device) -> str:
    """The exchange used for tensors on ``device``: ``exchange``, or auto's choice (padded
    all_to_all for accelerators and all_to_all for CPU where the backend has it, else
    all_gather)."""
    if exchange != "auto":
        return exchange
    if not backend_has_all_to_all(device):
        return "all_gather"
    return "all_to_all" if device.type == "cpu" else "padded_all_to_all"


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


def padded_route(index: Tensor, world: int) -> tuple[Tensor, Tensor]:
    """``(order, slot)``: entry ``order[j]`` of the batch goes to position ``slot[j]`` of a
    ``world x batch`` send buffer, whose block ``d`` holds owner ``d``'s entries in batch order,
    then padding. Computed on the device, without a host synchronisation."""
    b = index.numel()
    owner = index % world
    order = torch.argsort(owner, stable=True)
    counts = torch.zeros(world, dtype=torch.long, device=index.device)
    counts.scatter_add_(0, owner, torch.ones_like(owner))
    starts = torch.cumsum(counts, 0) - counts
    sorted_owner = owner[order]
    slot = sorted_owner * b + torch.arange(b, device=index.device) - starts[sorted_owner]
    return order, slot


def _owner_counts(index: Tensor, world: int) -> tuple[Tensor, list[int], list[int]]:
    """``(order by owner, entries sent to each owner, entries received from each rank)``."""
    owner = index % world
    order = torch.argsort(owner, stable=True)
    send = torch.bincount(owner, minlength=world)
    counts = torch.cat([send, all_to_all_counts(send)]).tolist()
    return order, counts[:world], counts[world:]


# ---------------------------------------------------------------------- reads


def read_padded(storage: Tensor, index: Tensor, world: int) -> Tensor:
    """Rows ``index`` (this rank's batch, int64) from their owners' ``storage``, by two padded
    ``all_to_all_single`` (indices, then rows); ``(batch, tables)``."""
    order, slot = padded_route(index, world)
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
    return packed


def read_all_to_all(storage: Tensor, index: Tensor, world: int) -> Tensor:
    """Rows ``index`` from their owners by exact ``all_to_all_single`` (counts, indices, rows)."""
    order, sent, received = _owner_counts(index, world)
    asked = all_to_all_variable(index[order], sent, received)
    answered = all_to_all_variable(storage[asked // world], received, sent)
    packed = torch.empty_like(answered)
    packed[order] = answered
    return packed


def read_all_gather(storage: Tensor, index: Tensor, world: int, rank: int) -> Tensor:
    """Rows ``index`` from their owners by two ``all_gather`` (every index, then every answer)."""
    sizes = all_gather_sizes(index.numel(), storage.device)
    every = torch.cat(all_gather_known_sizes(index, sizes))
    owner = every % world
    order = torch.argsort(owner, stable=True)
    per_owner = torch.bincount(owner, minlength=world).tolist()
    start = sum(per_owner[:rank])
    mine = every[order][start : start + per_owner[rank]]
    answers = all_gather_known_sizes(storage[mine // world], per_owner)
    full = storage.new_empty((every.numel(), storage.shape[1]))
    full[order] = torch.cat(answers)
    offset = sum(sizes[:rank])
    return full[offset : offset + index.numel()]


def read_rows(exchange: str, storage: Tensor, index: Tensor, world: int, rank: int) -> Tensor:
    """Rows ``index`` (this rank's batch) of a sharded ``storage`` through ``exchange`` (a
    resolved name, see :func:`choose_exchange`); ``(batch, tables)`` float32. A collective."""
    if world == 1:
        return storage[index]
    if exchange == "padded_all_to_all":
        return read_padded(storage, index, world)
    if exchange == "all_to_all":
        return read_all_to_all(storage, index, world)
    return read_all_gather(storage, index, world, rank)


# ---------------------------------------------------------------------- sends (writes)


def send_to_owners(
    exchange: str, index: Tensor, rows: Tensor, world: int, rank: int
) -> tuple[Tensor, Tensor]:
    """Every rank's ``(index, rows)`` entries delivered to their owners: the entries this rank
    owns, in rank order, then batch order. ``exchange`` is ``"all_to_all"`` or ``"all_gather"``
    (the padded exchange has its own pair, :func:`send_padded` and :func:`received_padded`)."""
    message = pack_rows(index, rows)
    if exchange == "all_to_all":
        order, sent, received = _owner_counts(index, world)
        return unpack_rows(all_to_all_variable(message[order], sent, received))
    index, rows = unpack_rows(torch.cat(all_gather_variable(message)))
    mine = index % world == rank
    return index[mine], rows[mine]


def send_padded(index: Tensor, rows: Tensor, world: int) -> Tensor:
    """The entries sent to their owners through one ``world x batch`` all_to_all (no host
    synchronisation); returns the received, still packed buffer (index -1: padding)."""
    order, slot = padded_route(index, world)
    every_index = torch.full((world * index.numel(),), -1, dtype=torch.long, device=index.device)
    every_rows = rows.new_zeros((world * index.numel(), rows.shape[1]))
    every_index[slot] = index[order]
    every_rows[slot] = rows[order]
    return all_to_all_equal(pack_rows(every_index, every_rows))


def received_padded(received: Tensor, storage: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The entries of a :func:`send_padded` buffer to write into this rank's ``storage``.

    Padding entries (index -1) become writes of row 0's current value to row 0, placed before
    every real entry, so that a real write of row 0 is the last occurrence and wins.
    """
    index, rows = unpack_rows(received)
    real = index >= 0
    index = torch.where(real, index, rank)  # row 0 of this shard
    rows = torch.where(real[:, None], rows, storage[0])
    first = torch.argsort(real.to(torch.uint8), stable=True)  # padding first, order kept
    return index[first], rows[first]

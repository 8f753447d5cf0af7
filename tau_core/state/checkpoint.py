"""The shard checkpoint format of the per-sample state: one file per rank plus ``index.json``.

A folder written by :func:`save_state_shards` holds ``shard-<r>-of-<W>.pt`` (rank r's rows
``i % W == r`` of every table, plain tensors) and, written last, ``index.json`` (format, sizes,
tables, loss class, the owner rule). :func:`load_state_shards` reads it into any world size and
either layout, after checking every header.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from tau_core.distributed import barrier
from tau_core.distributed import rank as current_rank
from tau_core.distributed import world_size as current_world_size
from tau_core.state.base import PerSampleStateBase, shard_rows
from tau_core.state.memory import state_of

SHARD_FORMAT = "tau_core.per_sample_state.shards/1"
INDEX_FILE = "index.json"
OWNER_RULE = "row i is in shard i % world_size, at position i // world_size"


def shard_file_name(rank: int, world_size: int) -> str:
    """``shard-00003-of-00008.pt``: the file of one rank's rows."""
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def _replace(path: Path, write: Any) -> None:
    """Writes ``path`` through ``<path>.partial`` and a rename, so it is never half written."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


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

    Args:
        loss_or_state: A stateful loss (its ``state``) or a per-sample state.
        directory: The folder (created if missing; an older ``index.json`` in it is removed
            first).

    Raises:
        ValueError: If ``loss_or_state`` keeps no per-sample state.
        RuntimeError: For a sharded state used outside the process group it was split in.
    """
    state, tag = state_of(loss_or_state)
    directory = Path(directory)
    world, me = current_world_size(), current_rank()
    rows = state.split_rows(world, me)
    index_path = directory / INDEX_FILE
    if me == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if index_path.exists():
            index_path.unlink()  # the folder is incomplete until the new index is written
    barrier()
    header = {
        "format": SHARD_FORMAT,
        "num_samples": state.num_samples,
        "world_size": world,
    }
    payload = {**header, "rank": me, "tables": state.names, "loss": tag, "rows": rows}
    _replace(directory / shard_file_name(me, world), lambda p: torch.save(payload, p))
    barrier()
    if me == 0:
        index = {
            **header,
            "tables": state.names,
            "loss": tag,
            "owner": OWNER_RULE,
            "shards": [shard_file_name(r, world) for r in range(world)],
            "rows_per_shard": [shard_rows(state.num_samples, world, r) for r in range(world)],
        }
        _replace(index_path, lambda p: p.write_text(json.dumps(index, indent=1)))
    barrier()
    return directory


def load_state_shards(loss_or_state: Any, directory: Union[str, os.PathLike]) -> None:
    """Loads a folder written by :func:`save_state_shards` into this state, whatever the world
    size of the save and of this run, and either layout (a sharded state takes its own rows, a
    replicated one every row).

    Everything is checked before anything is copied, and the new rows are assembled apart and
    put in place at the end, so an error leaves the state unchanged. Each rank reads only the
    shards that hold some of its rows, memory-mapped.

    Args:
        loss_or_state: A stateful loss (its ``state``) or a per-sample state.
        directory: A folder written by :func:`save_state_shards`.

    Raises:
        FileNotFoundError: If ``index.json`` or a shard file it lists is missing.
        ValueError: If ``loss_or_state`` keeps no per-sample state, or a file is unreadable or
            holds another ``num_samples``, other tables (another loss) or another loss class
            (naming the file and the sizes).
        RuntimeError: For a sharded state without a process group.
    """
    state, tag = state_of(loss_or_state)
    world, me = state.held_layout()  # a sharded state without a process group stops here
    directory = Path(directory)
    index = read_index(directory, state, tag)
    saved_world = int(index["world_size"])
    shards = [directory / shard_file_name(r, saved_world) for r in range(saved_world)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory / INDEX_FILE} lists {saved_world} shards, and {len(missing)} of them "
            f"are missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. "
            "Nothing was loaded."
        )
    # Shard s holds rows i = s (mod saved_world); this rank needs i = me (mod world): some exist
    # only if s = me (mod gcd).
    step = math.gcd(saved_world, world)
    payloads = {}
    for s in range(saved_world):
        if s % step == me % step:
            payloads[s] = _read_shard(shards[s], index, s, state, tag)
    state._put_rows(reshard(payloads, state, saved_world, world, me, directory))


def read_index(directory: Path, state: PerSampleStateBase, tag: Any) -> dict[str, Any]:
    """The checked ``index.json`` of a shard folder (a ``FileNotFoundError`` if missing)."""
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
    check_header(index_path, index, state, tag)
    return index


def _read_shard(
    path: Path, index: Mapping[str, Any], shard: int, state: PerSampleStateBase, tag: Any
) -> dict[str, Any]:
    """Shard file ``path`` memory-mapped, its header checked against the index and the state."""
    try:
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"Cannot read the per-sample state shard {path}: {err}") from err
    check_shard(path, payload, index, shard, state, tag)
    return payload


def reshard(
    payloads: Mapping[int, Mapping[str, Any]],
    state: PerSampleStateBase,
    saved_world: int,
    world: int,
    me: int,
    directory: Path,
) -> Tensor:
    """The rows ``i % world == me`` of every table, ``(rows, tables)``, assembled from the
    shards ``payloads`` (shard number to payload) of a save with ``saved_world`` ranks."""
    rows = shard_rows(state.num_samples, world, me)
    names = state.names
    new = torch.empty((rows, len(names)), dtype=torch.float32)
    filled = 0
    chunk = 1 << 24
    for s, payload in payloads.items():
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
    return new


def check_header(
    path: Path, header: Mapping[str, Any], state: PerSampleStateBase, tag: Any
) -> None:
    """A ``ValueError`` unless ``header`` (of file ``path``) matches the state's num_samples,
    tables and, where ``tag`` is given, the loss class."""
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


def check_shard(
    path: Path,
    payload: Any,
    index: Mapping[str, Any],
    shard: int,
    state: PerSampleStateBase,
    tag: Any,
) -> None:
    """A ``ValueError`` unless ``payload`` is shard ``shard`` of the save ``index`` describes."""
    if not isinstance(payload, dict) or payload.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a per-sample state shard (format {SHARD_FORMAT}).")
    check_header(path, payload, state, tag)
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

"""Per-sample state: named float32 tables indexed by dataset index, synchronised across ranks.

One interface (:class:`PerSampleStateBase`: ``read``, ``write``, ``table``, ``state_dict``) and
two layouts, chosen by :func:`make_state`: :class:`PerSampleState` (every rank holds every row)
and :class:`ShardedPerSampleState` (rank r holds the rows ``i % world_size == r``, exchanged by
the functions of :mod:`tau_core.state.exchange`). Checkpoints that re-shard to any world size:
:func:`save_state_shards`, :func:`load_state_shards`. The start-up line on memory per rank:
:func:`describe_state_memory`.

Modules: ``base`` (the interface and the index checks), ``replicated`` and ``sharded`` (the two
layouts), ``exchange`` (how a sharded state's rows travel), ``checkpoint`` (the shard files),
``memory`` (bytes per rank), ``layouts`` (``make_state``).
"""

from tau_core.state.base import (
    SHARD_INFO,
    SHARD_PREFIX,
    PerSampleStateBase,
    keep_last_occurrence,
    shard_rows,
)
from tau_core.state.checkpoint import (
    INDEX_FILE,
    SHARD_FORMAT,
    load_state_shards,
    save_state_shards,
    shard_file_name,
)
from tau_core.state.exchange import EXCHANGES, pack_rows, unpack_rows
from tau_core.state.layouts import STATE_LAYOUTS, make_state
from tau_core.state.memory import describe_state_memory, format_bytes, state_bytes_per_rank
from tau_core.state.replicated import PerSampleState
from tau_core.state.sharded import ShardedPerSampleState

__all__ = [
    "EXCHANGES",
    "INDEX_FILE",
    "SHARD_FORMAT",
    "SHARD_INFO",
    "SHARD_PREFIX",
    "STATE_LAYOUTS",
    "PerSampleState",
    "PerSampleStateBase",
    "ShardedPerSampleState",
    "describe_state_memory",
    "format_bytes",
    "keep_last_occurrence",
    "load_state_shards",
    "make_state",
    "pack_rows",
    "save_state_shards",
    "shard_file_name",
    "shard_rows",
    "state_bytes_per_rank",
    "unpack_rows",
]

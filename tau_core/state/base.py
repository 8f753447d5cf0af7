"""The one interface of the per-sample state, shared by its two layouts.

:class:`PerSampleStateBase` holds what both layouts do the same way: the checks of ``num_samples``
and of a batch's index, ``write`` through ``prepare_write``, and the ``nn.Module`` integration
(device moves, ``state_dict``, a load that checks everything before copying anything). A layout
implements where the rows live: :class:`tau_core.PerSampleState` (every rank holds every row) and
:class:`tau_core.ShardedPerSampleState` (rank r holds the rows ``i % world_size == r``).
"""

from __future__ import annotations

import abc
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

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


def shard_rows(num_samples: int, world_size: int, rank: int) -> int:
    """Rows owned by ``rank``: the indices ``i`` in [0, num_samples) with ``i % world_size == rank``."""
    return max(0, (num_samples - rank + world_size - 1) // world_size)


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


def index_problem(
    index: IndexLike, batch_size: Optional[int] = None
) -> tuple[Optional[Tensor], Optional[str]]:
    """``(index as int64, None)``, or ``(None, message)`` naming what is wrong with its form."""
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


class PerSampleStateBase(nn.Module, abc.ABC):
    """Named per-sample float32 tables indexed by dataset index: the interface of both layouts.

    A state holds ``num_samples`` rows of each table named in ``initial_values``. The interface:
    ``read(index)`` (the rows of a batch), ``write(index, rows)`` / ``prepare_write`` (new rows
    for a batch, synchronised across ranks), ``table(name)`` (a whole table), ``reset()``,
    ``check_index`` (a batch's index checked), ``state_dict`` / ``load_state_dict`` (a failed load
    changes nothing) and ``check_loadable``. ``module.to(device)`` moves the tables; dtype casts do
    not touch them. Build one with :func:`tau_core.make_state`, or a layout's class directly.

    Args:
        num_samples: Number of samples in the dataset, an integer >= 1; valid indices are
            [0, num_samples).
        initial_values: Name and initial value of each table (at least one).

    Raises:
        ValueError: If ``num_samples`` is not a positive integer or ``initial_values`` is empty.
    """

    #: The layout's name, as :func:`tau_core.make_state` takes it.
    layout: str = ""
    #: Whether ``read`` is a collective (every rank must call it together).
    collective_read = False

    def __init__(self, num_samples: int, initial_values: Mapping[str, float]) -> None:
        super().__init__()
        self.num_samples, self.initial_values = checked_tables(num_samples, initial_values)

    # ------------------------------------------------------------------ what a layout implements
    @property
    @abc.abstractmethod
    def names(self) -> list[str]:
        """The tables' names, in their storage order."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device the rows are (or will be) stored on."""

    @abc.abstractmethod
    def table(self, name: str) -> Tensor:
        """The whole table ``name`` (a new tensor)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Sets every row this rank holds back to its initial value."""

    @abc.abstractmethod
    def read(self, index: Tensor, device: Optional[torch.device] = None) -> dict[str, Tensor]:
        """Rows ``index`` of every table, as float32 tensors on ``device`` (default: index's)."""

    @abc.abstractmethod
    def prepare_write(
        self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True
    ) -> Callable[[], None]:
        """Every collective of :meth:`write` now; returns the local part, not yet applied."""

    @abc.abstractmethod
    def check_loadable(self, state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
        """The rows this state would load from ``state_dict`` under ``prefix``, checked."""

    @abc.abstractmethod
    def held_layout(self) -> tuple[int, int]:
        """``(world_size, rank)`` of the rows this state holds: ``(1, 0)`` for every row."""

    @abc.abstractmethod
    def rows_per_rank(self, world_size: int) -> int:
        """Rows of each table one rank holds (the largest share) with ``world_size`` ranks."""

    @abc.abstractmethod
    def split_rows(self, world_size: int, rank: int) -> dict[str, Tensor]:
        """Rows ``i % world_size == rank`` of every table (CPU copies), for a shard file."""

    @abc.abstractmethod
    def _move_to(self, device: torch.device) -> None:
        """Moves the stored rows to ``device``."""

    @abc.abstractmethod
    def _saved_rows(self, prefix: str, keep_vars: bool) -> dict[str, Tensor]:
        """The state-dict entries of the rows (keys with ``prefix``; copies unless keep_vars)."""

    @abc.abstractmethod
    def _missing_keys(self, prefix: str, incoming: Mapping[str, Tensor]) -> list[str]:
        """The keys a load of ``incoming`` reports as missing."""

    @abc.abstractmethod
    def _copy_in(self, incoming: Mapping[str, Tensor]) -> None:
        """Copies checked rows (as :meth:`check_loadable` returns them) into place."""

    @abc.abstractmethod
    def _put_rows(self, rows: Tensor) -> None:
        """Replaces the held rows by ``rows`` (held rows, tables), already checked."""

    # ------------------------------------------------------------------ index checks
    def index_problem(
        self, index: IndexLike, batch_size: Optional[int] = None
    ) -> tuple[Optional[Tensor], Optional[str]]:
        """``(index as int64, None)``, or ``(None, message)`` naming what is wrong with its form.

        Checks what needs no look at the values: integer dtype, one dimension, length
        ``batch_size`` (when given), not empty. The range of the values is :meth:`range_problem`'s,
        so that a loss can check every rank's values with one collective.
        """
        return index_problem(index, batch_size)

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

    # ------------------------------------------------------------------ writes
    def write(self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True) -> None:
        """Writes ``rows[name][k]`` to row ``index[k]`` of every table (all tables must be given).

        With ``synchronize`` (the default) and a process group of several ranks, every rank's
        entries are applied (a collective: every rank must call it), and a repeated index keeps
        its last occurrence in rank order, then batch order. The same as
        ``prepare_write(index, rows, synchronize)()``.
        """
        self.prepare_write(index, rows, synchronize)()

    def _stacked_rows(self, rows: Mapping[str, Tensor]) -> Tensor:
        """``rows`` as one (n, tables) float32 tensor in :attr:`names` order, detached."""
        names = self.names
        if set(rows) != set(names):
            raise ValueError(f"write needs rows for {sorted(names)}, got {sorted(rows)}.")
        return torch.stack([rows[name].detach().float() for name in names], dim=1)

    # ------------------------------------------------------------------ nn.Module integration
    def _apply(self, fn: Any, recurse: bool = True) -> PerSampleStateBase:  # type: ignore[override]
        # Follow device moves only: apply fn to an empty probe to learn the target device.
        target = fn(torch.empty(0, device=self.device)).device
        if target != self.device:
            self._move_to(target)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self._saved_rows(prefix, keep_vars))

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
        missing_keys.extend(self._missing_keys(prefix, incoming))
        self._copy_in(incoming)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # nn.Module knows only parameters and buffers and reports the tables as unexpected,
        # which makes a strict load_state_dict of the module's own state_dict fail.
        ours = {prefix + name for name in self.names} | {prefix + SHARD_INFO}
        ours |= {prefix + SHARD_PREFIX + name for name in self.names}
        unexpected_keys[:] = [key for key in unexpected_keys if key not in ours]

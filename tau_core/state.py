"""Per-sample state: named float32 tables indexed by dataset index, synchronised across ranks."""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tau_core.distributed import concat_all_gather, is_distributed

IndexLike = Union[Tensor, Sequence[int]]


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

    Sharding: every rank holds the whole table (4 bytes x tables x samples). ``read``/``write`` are
    the only access points, so a sharded table can replace this class without touching the losses.

    Args:
        num_samples: Number of samples in the dataset; valid indices are [0, num_samples).
        initial_values: Name and initial value of each table.

    Examples:
        >>> state = PerSampleState(1000, {"log_u": float("-inf"), "tau": 0.1})
        >>> rows = state.read(torch.tensor([3, 7]))
        >>> state.write(torch.tensor([3, 7]), {"log_u": rows["log_u"] + 1, "tau": rows["tau"]})
    """

    def __init__(self, num_samples: int, initial_values: Mapping[str, float]) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        num_samples = int(num_samples)
        if num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if not initial_values:
            raise ValueError("initial_values must name at least one table.")
        self.num_samples = num_samples
        self.initial_values = dict(initial_values)
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

    @torch.no_grad()
    def write(self, index: Tensor, rows: Mapping[str, Tensor], synchronize: bool = True) -> None:
        """Writes ``rows[name][k]`` to ``table[name][index[k]]`` for every table.

        With ``synchronize`` (the default) and a process group of several ranks, the indices and
        rows of all ranks are gathered first, so every rank writes the whole global batch and the
        tables stay identical (a collective: every rank must call it). All tables must be given.
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
        for k, name in enumerate(names):
            self._tables[name][index] = packed[:, k]

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
        for name in self._tables:
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if value.dim() != 1 or value.shape[0] != self.num_samples:
                raise ValueError(
                    f"Cannot load per-sample state '{key}' of shape {tuple(value.shape)} into a "
                    f"loss with num_samples={self.num_samples}: the checkpoint was made for "
                    f"{value.shape[0] if value.dim() == 1 else 'another'} samples. Build the loss "
                    "with the num_samples of the checkpoint's dataset."
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
        unexpected_keys[:] = [key for key in unexpected_keys if key not in tables]

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, tables={self.names}"


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


STATE_LAYOUTS = ("replicated",)


def make_state(
    layout: str, num_samples: int, initial_values: Mapping[str, float]
) -> PerSampleState:
    """The per-sample state of a loss in the chosen layout.

    ``"replicated"``: every rank holds every row (:class:`PerSampleState`), the default.
    """
    if layout == "replicated":
        return PerSampleState(num_samples, initial_values)
    raise ValueError(f"state_layout must be one of {list(STATE_LAYOUTS)}, got {layout!r}.")

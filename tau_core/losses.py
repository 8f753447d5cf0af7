"""The base of every loss: checks, statistics, epochs.

What every loss of this package shares, once (the global contrastive losses are in
:mod:`tau_core.global_contrastive`, DySTreSS in :mod:`tau_core.dystress`, the blocks an adapter
builds in :mod:`tau_core.blocks`):

- the batch checks, agreed by all ranks before anything changes (a rank with NaN features or a bad
  index makes every rank raise, instead of leaving the others in a gather forever);
- when the per-sample state is written: in training mode, with gradients enabled and features that
  require them (Lightly's rule), and then on every rank whenever a process group of several ranks
  exists, whatever ``gather_distributed`` says (that flag chooses only the negatives);
- ``set_epoch``, ``stats`` (computed when read, so a step pays nothing for statistics nobody reads)
  and :func:`warn_caller`, which points the warnings for likely mistakes at the user's line.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tau_core import device as device_runtime
from tau_core.blocks import AnchorBlock
from tau_core.checks import pair_features_problem
from tau_core.distributed import all_reduce_max, is_distributed, raise_agreed
from tau_core.state import PerSampleStateBase

IndexLike = Union[Tensor, Sequence[int]]


# Packages whose frames a warning skips, so that it points at the line that called into them.
_INTERNAL_PACKAGES = ("tau_core", "lightly_tau", "openclip_tau", "torch")


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package, its adapters and
    torch: the user's call of the loss (whatever wrappers, ``torch.compiler.disable`` or
    ``nn.Module.__call__``, lie between)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        _INTERNAL_PACKAGES
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def temperature_stats(tau: Tensor, prefix: str = "tau") -> dict[str, Tensor]:
    """Mean, spread and quantiles of a batch of temperatures, as detached 0-d tensors."""
    tau = tau.detach().float().flatten()
    q = sorted_quantiles(tau, (0.1, 0.5, 0.9))
    return {
        f"{prefix}_mean": tau.mean(),
        f"{prefix}_std": tau.std(unbiased=False),
        f"{prefix}_min": tau.min(),
        f"{prefix}_p10": q[0],
        f"{prefix}_p50": q[1],
        f"{prefix}_p90": q[2],
        f"{prefix}_max": tau.max(),
    }


def sorted_quantiles(values: Tensor, levels: Sequence[float]) -> list[Tensor]:
    """``torch.quantile(values, levels)`` (linear interpolation, NaN if any value is NaN) as 0-d
    tensors, with the levels as Python numbers: no tensor of levels copied to the device."""
    ordered = values.sort().values  # NaN sorts last
    n, last = ordered.numel(), ordered[-1]
    out = []
    for level in levels:
        position = level * (n - 1)
        low = int(math.floor(position))
        high = min(low + 1, n - 1)
        fraction = position - low
        value = torch.lerp(ordered[low], ordered[high], fraction) if fraction else ordered[low]
        out.append(torch.where(torch.isnan(last), last, value))
    return out


def normalized_float32(out: Tensor) -> Tensor:
    """L2-normalised float32 features: the similarity and temperature math never runs in bf16."""
    return torch.nn.functional.normalize(out.float(), dim=1)


def normalized_pair(out0: Tensor, out1: Tensor) -> tuple[Tensor, Tensor]:
    """Both feature tensors L2-normalised in float32, outside autocast."""
    with torch.autocast(device_type=out0.device.type, enabled=False):
        return normalized_float32(out0), normalized_float32(out1)


@dataclass
class CheckedBatch:
    """What :meth:`ContrastiveLoss.check_batch` returns.

    Attributes:
        index: The index as int64 (None for a loss without state).
        valid: With deferred checks, a 0-d bool tensor saying whether the batch is valid.
        z0, z1: The features, L2-normalised in float32 (autograd flows through them).
    """

    index: Optional[Tensor]
    valid: Optional[Tensor]
    z0: Tensor
    z1: Tensor


class ContrastiveLoss(nn.Module):
    """What every loss of this package shares: checks, ``set_epoch``, ``stats``.

    Subclasses call :meth:`check_batch` first in their forward, and :meth:`set_stats` with the
    step's statistics (tensors, or temperature tensors summarised when ``stats`` is read).

    Args:
        gather_distributed: If True, the negatives are gathered from all processes. Default False.

    Raises:
        ValueError: If ``gather_distributed`` is not a bool.
    """

    #: Whether the loss keeps per-sample state and therefore needs ``index``.
    needs_index = False
    #: Anchor rows per tile of the similarity block (0: the whole block at once); the adapters'
    #: losses take it as ``chunk_size=``.
    chunk_size = 0

    def __init__(self, gather_distributed: bool = False) -> None:
        super().__init__()
        if not isinstance(gather_distributed, bool):
            raise ValueError(
                f"gather_distributed must be True or False, got {gather_distributed!r}."
            )
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. "
                "Please set gather_distributed=False or install a torch version with "
                "distributed support."
            )
        self.gather_distributed = gather_distributed
        self.epoch = 0
        self._epoch_set = False
        self._stats_values: dict[str, Tensor] = {}
        self._stats_temperatures: dict[str, Tensor] = {}
        self._stats_cache: Optional[dict[str, Tensor]] = None
        self._deferred: list[tuple[Tensor, Any, tuple[str, str], bool]] = []

    # ------------------------------------------------------------- epochs, stats
    def set_epoch(self, epoch: int) -> None:
        """Sets the current epoch (0-based); call it at the start of every epoch.

        Losses whose settings follow a schedule (gamma's cosine decay) read it; for the others it
        is recorded only, so every loss can be driven the same way.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}.")
        self.epoch = epoch
        self._epoch_set = True

    @property
    def stats(self) -> dict[str, Tensor]:
        """Statistics of the last call, as detached 0-d tensors (computed when first read).

        ``objective`` (the returned loss value) and, where temperatures exist, ``tau_mean``,
        ``tau_std``, ``tau_min``, ``tau_p10``, ``tau_p50``, ``tau_p90``, ``tau_max`` (image-text
        losses also per role: ``tau_image_*``, ``tau_text_*``).
        """
        if self._stats_cache is None:
            stats = dict(self._stats_values)
            for prefix, tau in self._stats_temperatures.items():
                summary = temperature_stats(tau, prefix)  # a value given exactly is kept
                stats.update({k: v for k, v in summary.items() if k not in self._stats_values})
            self._stats_cache = stats
        return dict(self._stats_cache)

    def set_stats(
        self, values: Mapping[str, Tensor], temperatures: Mapping[str, Tensor] = {}
    ) -> None:
        self._stats_values = {k: v.detach() for k, v in values.items()}
        self._stats_temperatures = {k: v.detach() for k, v in temperatures.items()}
        self._stats_cache = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._epoch_set = self._epoch_set or "epoch" in state

    # ------------------------------------------------------------- checks
    def writes_state(self, *features: Tensor) -> bool:
        """Whether this call may change per-sample state: training mode, gradients enabled, and
        features that require them (a validation pass under ``no_grad`` or in ``eval()`` reads).
        The rows are then put into the tables when the backward pass reaches the loss: a call
        that is never backpropagated writes nothing."""
        return (
            self.needs_index
            and self.training
            and torch.is_grad_enabled()
            and any(f.requires_grad for f in features)
        )

    # ------------------------------------------------------------- adapter hooks
    def gathers(self) -> bool:
        """Whether the blocks use other ranks' features (a collective in every forward)."""
        return self.gather_distributed and is_distributed()

    def anchor_blocks(self, z0: Tensor, z1: Tensor) -> list[AnchorBlock]:
        """The adapter's similarity blocks of the normalised float32 features ``z0``, ``z1``."""
        raise NotImplementedError

    def check_batch(
        self,
        names: tuple[str, str],
        features: tuple[Tensor, Tensor],
        index: Optional[IndexLike],
        collective: bool,
    ) -> CheckedBatch:
        """Checks the features (and the index of a stateful loss).

        Returns the index as int64, the L2-normalised float32 features, and, when the value
        checks are deferred, a 0-d bool tensor that says whether the batch is valid. Raises a
        ``ValueError`` naming the problem. With ``collective`` (the step gathers or writes across
        ranks) every rank learns every rank's verdict through one small all-reduce, so all of
        them raise together; no state has been changed at that point.

        Value checks (index range, finite features) need the values on the host. On a CPU that
        costs nothing; on an accelerator it would stall the step, so there (``sync_checks``
        None or False) the verdict stays on the device: the state write keeps the old rows when
        it is negative, and the error is raised at the next call, which reads it.
        """
        if self._deferred:  # (a list: no graph break under torch.compile when empty)
            self.raise_deferred_error()
        out0, out1 = features
        problem = pair_features_problem(names[0], out0, names[1], out1)
        checked: Optional[Tensor] = None
        state: Optional[PerSampleStateBase] = getattr(self, "state", None)
        if problem is None and self.needs_index:
            if index is None:
                problem = (
                    f"{type(self).__name__} keeps per-sample state and needs index=: the dataset "
                    "index of each sample in the batch (see IndexedDataset)."
                )
            else:
                checked, problem = state.index_problem(index, out0.shape[0])
        normalized: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
        if problem is None:
            device = out0.device
            normalized = normalized_pair(out0, out1)
            # A NaN or Inf anywhere in a row makes its normalised row NaN, and the sum of
            # normalised rows is bounded by their number of entries: one reduction per tensor
            # tells whether a tensor is finite, without a boolean copy of it.
            flags = [torch.zeros((), dtype=torch.long, device=device)]
            flags += [(~torch.isfinite(z.sum())).to(device, torch.long) for z in normalized]
            if checked is not None:
                checked = checked.to(device)
                flags += [-checked.min(), checked.max()]
        else:
            device = out0.device if isinstance(out0, Tensor) else torch.device("cpu")
            flags = [torch.ones((), dtype=torch.long, device=device)]
            flags += [torch.zeros((), dtype=torch.long, device=device)] * (
                4 if self.needs_index else 2
            )
        values = torch.stack(flags)
        if problem is None and self._defers_checks(device):
            # Shape problems are known on the host and raised below; values wait on the device.
            if collective:
                values = all_reduce_max(values)
            valid = values[1:3].sum() == 0
            if checked is not None:
                n = state.num_samples
                valid = valid & (values[3] <= 0) & (values[4] < n)
                checked = checked.clamp(0, n - 1)  # an out-of-range row is never touched
            self._defer(values, names, collective)
            return CheckedBatch(checked, valid, *normalized)
        if collective:
            values = all_reduce_max(values)
        self._read_verdict(values, problem, names, collective)
        return CheckedBatch(checked, None, *normalized)

    #: Whether the value checks run before the step (True), after it on the device (False), or
    #: before it on a CPU and after it on an accelerator (None, the default).
    sync_checks: Optional[bool] = None

    def _defers_checks(self, device: torch.device) -> bool:
        if self.sync_checks is None:
            return device.type != "cpu"
        return not self.sync_checks

    def _defer(self, values: Tensor, names: tuple[str, str], collective: bool) -> None:
        # On an accelerator: copied to pinned host memory behind the step's kernels and read
        # once it has landed (tau_core.device), so the step never waits for the verdict.
        host = device_runtime.copy_to_host(values)
        event = device_runtime.record_event(values.device)
        self._deferred.append((host, event, names, collective))

    @torch.compiler.disable  # reads host values: outside torch.compile's graphs
    def raise_deferred_error(self, wait: bool = False) -> None:
        """Raises the error of an earlier batch whose value checks were deferred (see
        :meth:`check_batch`); that batch did not change the state. Verdicts still on their way
        from the device are left for a later call unless ``wait`` is True."""
        while self._deferred:
            host, event, names, collective = self._deferred[0]
            if not wait and not device_runtime.event_ready(event):
                return
            device_runtime.wait_event(event)
            self._deferred.pop(0)
            self._verdict(device_runtime.host_values(host), None, names, collective, previous=True)

    @torch.compiler.disable  # reads the values on the host: outside torch.compile's graphs
    def _read_verdict(
        self, values: Tensor, problem: Optional[str], names: tuple[str, str], collective: bool
    ) -> None:
        self._verdict(values.tolist(), problem, names, collective)

    def _verdict(
        self,
        values: list[int],
        problem: Optional[str],
        names: tuple[str, str],
        collective: bool,
        previous: bool = False,
    ) -> None:
        failed, *rest = values
        if failed:
            if collective:
                raise_agreed(problem)
            raise ValueError(problem)
        where = " on at least one rank" if collective else ""
        which = "the previous batch's " if previous else ""
        unchanged = "; the state was not changed" if self.needs_index else ""
        for name, bad in zip(names, rest[:2]):
            if bad:
                raise ValueError(f"{which}{name} contains NaN or Inf values{where}{unchanged}.")
        if self.needs_index:
            low, high = -rest[2], rest[3]
            problem = self.state.range_problem(low, high)
            if problem:
                raise ValueError(which + problem + (where and f" (seen{where})"))
            self._index_high = max(getattr(self, "_index_high", -1), high)

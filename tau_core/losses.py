"""The loss bases: checks, statistics, epochs and the one global-contrastive forward.

An adapter (``lightly_tau``, ``openclip_tau``) says only how its features become similarity blocks
(:class:`AnchorBlock`: anchors against candidates) and what its ``forward`` signature is; everything
else is here, once:

- the batch checks, agreed by all ranks before anything changes (a rank with NaN features or a bad
  index makes every rank raise, instead of leaving the others in a gather forever);
- when the per-sample state is written: in training mode, with gradients enabled and features that
  require them (Lightly's rule), and then on every rank whenever a process group of several ranks
  exists, whatever ``gather_distributed`` says (that flag chooses only the negatives);
- ``set_epoch``, ``stats`` (computed when read, so a step pays nothing for statistics nobody reads)
  and warnings for likely mistakes (class labels passed as indices, a gamma schedule without
  ``set_epoch``).
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
from tau_core.checks import (
    check_number,
    check_optional_epochs,
    check_temperature_range,
    pair_features_problem,
)
from tau_core.distributed import all_reduce_max, is_distributed, raise_agreed
from tau_core.functional import (
    cosine_gamma,
    dystress_rows,
    dystress_temperature,
    global_contrastive_rows,
    weighted_similarity_sum,
    with_value,
)
from tau_core.state import PerSampleStateBase, make_state
from tau_core.temperature import TemperatureRule
from tau_core.tiled import tiled_dystress, tiled_global_contrastive_blocks

IndexLike = Union[Tensor, Sequence[int]]

# tau_max / tau_min above which s / tau(s) stops increasing in s (about 4.5), and above which a
# negative near s = 0.23 outranks a perfect positive (about 8.2); see docs/methods.md.
DYSTRESS_MONOTONE_RATIO = 4.5
DYSTRESS_RANKING_RATIO = 8.2

# Labels passed as indices: warn once the samples seen outnumber the index range this many times
# while that range is below this fraction of num_samples.
LABELS_AS_INDEX_REPEATS = 4
LABELS_AS_INDEX_FRACTION = 0.1

# Pairs whose temperatures DySTreSS's stats summarise (a subsample of rows beyond it).
STATS_PAIRS = 1 << 20


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


#: The keyword a float first argument most likely meant, in order of preference.
TEMPERATURE_KEYWORDS = ("temperature", "tau_init", "tau_min")


def keyword_example(cls: type) -> str:
    """`` (e.g. temperature=0.2)`` with a temperature keyword ``cls`` accepts, else ``""``."""
    code = getattr(cls.__init__, "__code__", None)
    if code is None:
        return ""
    accepted = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    for name in TEMPERATURE_KEYWORDS:
        if name in accepted:
            return f" (e.g. {name}=0.2)" if name == "temperature" else f" (e.g. {name}=0.1)"
    return ""


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


@dataclass
class AnchorBlock:
    """One block of anchors against candidates, as an adapter builds it.

    Attributes:
        sim: (rows, cols) cosine similarities, float32, with autograd history; None for a tiled
            block (the loss computes ``anchors @ candidates.T`` a tile of rows at a time).
        pos_col: (rows,) column of each row's positive.
        self_col: (rows,) the row's own column (left out of its negatives), or None.
        suffix: Table suffix of this anchor role ("" unimodal, "_image", "_text").
        views: Rows per sample: ``rows = views * batch_size`` and rows ``k * b + i`` belong to
            sample ``i`` of the local batch for every view ``k`` (SimCLR's two views: 2).
        anchors: (rows, dim) the anchors' normalised features (for rules that read them), or None.
        transpose_of: Position of an earlier block whose ``sim`` this block's is the transpose
            of (image-text in one process), or None. Its surrogate coefficients are then folded
            into that block's, so autograd keeps one block and no transposed copy.
        candidates: (cols, dim) the candidates' normalised features of a tiled block, or None.
    """

    sim: Optional[Tensor]
    pos_col: Tensor
    self_col: Optional[Tensor]
    suffix: str = ""
    views: int = 1
    anchors: Optional[Tensor] = None
    transpose_of: Optional[int] = None
    candidates: Optional[Tensor] = None

    @property
    def device(self) -> torch.device:
        return (self.sim if self.sim is not None else self.anchors).device


def _views(row_values: Tensor, views: int) -> Tensor:
    """A sample's rows repeated for each of its views (rows ``k * b + i``)."""
    return row_values.repeat(views) if views > 1 else row_values


class SurrogateSum:
    """``sum over blocks of sum(coef * sim) / scale``, the surrogate whose gradient is ``coef``.

    A block that is the transpose of an earlier one adds ``coef.T`` (rescaled) to that block's
    coefficients instead of a term of its own: ``sum(c_t * S.T) = sum(c_t.T * S)``.
    """

    def __init__(self, blocks: Sequence[AnchorBlock]) -> None:
        self.blocks = blocks
        self.terms: dict[int, tuple[Tensor, float]] = {}
        self.tiled: list[Tensor] = []  # tiled blocks' sums, already scaled

    def add(self, position: int, coef: Tensor, scale: float) -> None:
        primary = self.blocks[position].transpose_of
        if primary is None:
            self.terms[position] = (coef, scale)
            return
        primary_coef, primary_scale = self.terms[primary]
        primary_coef.add_(coef.T, alpha=primary_scale / scale)

    def total(self) -> Tensor:
        out = sum(self.tiled, torch.zeros((), device=self.blocks[0].device))
        for position, (coef, scale) in self.terms.items():
            out = out + weighted_similarity_sum(self.blocks[position].sim, coef) / scale
        return out


class _WriteOnBackward(torch.autograd.Function):
    """Identity on the loss; its backward applies the state write prepared in the forward.

    The collectives of the write ran in the forward (every rank, in step), so the backward only
    writes this rank's tables, once, with no communication.
    """

    @staticmethod
    def forward(ctx: Any, loss: Tensor, apply_write: Any) -> Tensor:  # type: ignore[override]
        ctx.apply_write = apply_write
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        apply_write, ctx.apply_write = ctx.apply_write, None
        if apply_write is not None:  # a second backward (retain_graph) writes nothing again
            apply_write()
        return grad, None


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


class GlobalContrastiveLoss(ContrastiveLoss):
    """The global contrastive loss with per-sample moving averages, for any temperature rule.

    Implements SogCLR's and iSogCLR's step (see :func:`tau_core.global_contrastive_rows`) for the
    blocks an adapter builds with :meth:`anchor_blocks`; ``rule`` (:class:`FixedTemperature`,
    :class:`LearnedTemperature`) decides the temperature and the tables kept per sample.

    Args:
        num_samples: Number of samples in the dataset (size of the per-sample tables), an
            integer >= 1. Required (None raises ValueError with a hint).
        rule: The temperature rule (:class:`FixedTemperature`, :class:`LearnedTemperature`,
            :class:`GlobalLearnedTemperature` or :class:`NetworkTemperature`).
        gamma: Weight of the batch estimate in the moving average, in (0, 1].
        gamma_decay_epochs: If set (an integer >= 1), gamma decays from 1.0 at epoch 0 to
            ``gamma`` at this epoch; None keeps it constant.
        gather_distributed: If True, negatives are gathered from all processes.
        suffixes: Table suffix of each anchor role. Default ``("",)`` (one role).
        state_layout: How the per-sample tables are stored across ranks (see
            :func:`tau_core.make_state`): ``"replicated"`` (the default; every rank holds every
            row) or ``"sharded"``.

    Raises:
        ValueError: If ``num_samples`` is None, a float or not positive, ``gamma`` or
            ``gamma_decay_epochs`` lie outside their ranges, or ``state_layout`` is unknown.
    """

    needs_index = True

    def __init__(
        self,
        num_samples: int,
        rule: TemperatureRule,
        gamma: float,
        gamma_decay_epochs: Optional[int],
        gather_distributed: bool,
        suffixes: Sequence[str] = ("",),
        state_layout: str = "replicated",
    ) -> None:
        super().__init__(gather_distributed)
        if num_samples is None:
            raise ValueError(
                f"{type(self).__name__} keeps a state per sample and needs num_samples=, the "
                "number of samples in the training set (e.g. num_samples=len(dataset))."
            )
        if isinstance(num_samples, float):
            raise ValueError(
                f"num_samples must be a positive integer (the number of samples in the training "
                f"set), got {num_samples!r}. The first argument of {type(self).__name__} is "
                f"num_samples; pass every other setting by keyword{keyword_example(type(self))}."
            )
        self.settings = rule
        self.gamma = check_number("gamma", gamma, 0.0, 1.0, low_open=True)
        self.gamma_decay_epochs = check_optional_epochs("gamma_decay_epochs", gamma_decay_epochs)
        tables = {
            name + suffix: value
            for suffix in suffixes
            for name, value in rule.initial_values().items()
        }
        self.state = make_state(state_layout, num_samples, tables)
        self._samples_seen = 0
        self._index_high = -1
        self._warned: set[str] = set()

    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    @property
    def rho(self) -> float:
        """KL radius of the robust objective (0 for SogCLR)."""
        return self.settings.rho

    @property
    def current_gamma(self) -> float:
        """The moving-average weight used at the current epoch."""
        if self.gamma_decay_epochs is None:
            return self.gamma
        return cosine_gamma(self.epoch, self.gamma, self.gamma_decay_epochs)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # The epoch (this module's extra state) is loaded before the tables (a child module):
        # check the tables first so that a checkpoint of another size changes nothing.
        self.state.check_loadable(state_dict, prefix + "state.")
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------- adapter hooks
    def gathers(self) -> bool:
        """Whether the blocks use other ranks' features (a collective in every forward)."""
        return self.gather_distributed and is_distributed()

    def anchor_blocks(self, z0: Tensor, z1: Tensor) -> list[AnchorBlock]:
        """The adapter's similarity blocks of the normalised float32 features ``z0``, ``z1``."""
        raise NotImplementedError

    # ------------------------------------------------------------- the forward, once
    def global_contrastive_loss(
        self, names: tuple[str, str], out0: Tensor, out1: Tensor, index: Optional[IndexLike]
    ) -> Tensor:
        """Checks, blocks, state rows, the block math, the state write and the statistics.

        Returns a scalar whose value is the objective estimate (mean over anchors and roles) and
        whose gradient is the surrogate's.
        """
        writes = self.writes_state(out0, out1)
        if writes and self.settings.trains_temperature:
            self._temperature_forward_started()
        # A sharded state reads through a collective: then every rank must agree on every batch.
        collective = is_distributed() and (
            writes or self.gathers() or getattr(self.state, "collective_read", False)
        )
        batch = self.check_batch(names, (out0, out1), index, collective)
        index, valid = batch.index, batch.valid
        blocks = self.anchor_blocks(batch.z0, batch.z1)
        rows = self.state.read(index, device=blocks[0].device)
        gamma = self.current_gamma
        b = index.numel()
        surrogate_sum = SurrogateSum(blocks)
        objective = torch.zeros((), device=blocks[0].device)
        new_rows: dict[str, Tensor] = {}
        temperatures: dict[str, Tensor] = {}
        rule = self.settings
        temperature_term = torch.zeros((), device=blocks[0].device)
        taus = [rule.block_temperature(rows, k.suffix, k.views, k.anchors) for k in blocks]
        block_args = [
            (
                k.pos_col,
                k.self_col,
                tau_rows.detach(),
                _views(rows["log_u" + k.suffix], k.views),
                gamma,
                rule.rho,
                rule.learns or rule.trains_temperature,
            )
            for k, tau_rows in zip(blocks, taus)
        ]
        if blocks[0].sim is None:  # tiled: no (rows, cols) block is ever held
            term, results = tiled_global_contrastive_blocks(blocks, block_args, self.chunk_size)
            surrogate_sum.tiled.append(term)
        else:
            results = [
                global_contrastive_rows(k.sim.detach(), *a) for k, a in zip(blocks, block_args)
            ]
            for position, (block, result) in enumerate(zip(blocks, results)):
                scale = result.num_negatives * block.sim.shape[0] * len(blocks)
                surrogate_sum.add(position, result.coef, scale)
        for block, tau_rows, result in zip(blocks, taus, results):
            v = block.views
            objective = objective + result.objective.mean() / len(blocks)
            if rule.trains_temperature:
                # d/dtau of the robust objective, pushed through tau's parameters by autograd.
                temperature_term = temperature_term + (tau_rows * result.grad_tau).mean() / len(
                    blocks
                )
            # The views of a sample share its state: the moving average of u is the mean of the
            # views' u (a log-mean-exp in log space), the temperature gradient their mean.
            log_u, grad_tau = result.log_u, result.grad_tau
            if v > 1:
                log_u = torch.logsumexp(log_u.view(v, b), dim=0) - math.log(v)
                grad_tau = grad_tau.view(v, b).mean(dim=0)
            role_rows = rule.next_rows(rows, log_u, grad_tau, block.suffix)
            new_rows.update(role_rows)
            temperatures["tau" + block.suffix] = role_rows.get("tau" + block.suffix, tau_rows)
        surrogate = surrogate_sum.total()
        apply_write = None
        if writes:
            if valid is not None:  # deferred checks: an invalid batch writes back the old rows
                new_rows = {k: torch.where(valid, v, rows[k]) for k, v in new_rows.items()}
            # Every collective of the write happens now, on every rank; the rows are put into
            # the tables when the backward pass reaches the loss (never, for a forward that is
            # not backpropagated, e.g. a validation pass that forgot no_grad).
            apply_write = self.state.prepare_write(index, new_rows)
            self._after_write(b)
            if rule.trains_temperature:
                self._temperature_forward_done()
        if len(blocks) > 1:
            temperatures = {"tau": torch.cat(list(temperatures.values())), **temperatures}
        self.set_stats({"objective": objective, "surrogate": surrogate}, temperatures)
        if rule.trains_temperature:
            loss = with_value(surrogate + temperature_term, objective)
        else:
            loss = with_value(surrogate, objective)
        if apply_write is not None:
            loss = _WriteOnBackward.apply(loss, apply_write)
        return loss

    def _temperature_forward_started(self) -> None:
        """Hook of a trained temperature: a training call starts (see ``tau_core.trained``)."""

    def _temperature_forward_done(self) -> None:
        """Hook of a trained temperature: a training call ends (see ``tau_core.trained``)."""

    # ------------------------------------------------------------- warnings
    @torch.compiler.disable  # host counters: traced, each new value would recompile the step
    def _after_write(self, local_batch: int) -> None:
        self._samples_seen += local_batch * (
            torch.distributed.get_world_size() if is_distributed() else 1
        )
        seen, high, n = self._samples_seen, self._index_high, self.num_samples
        if (
            "labels" not in self._warned
            and high >= 0  # a verdict on the index values has arrived (deferred checks lag)
            and seen > LABELS_AS_INDEX_REPEATS * (high + 1)
            and high + 1 <= LABELS_AS_INDEX_FRACTION * n
        ):
            self._warned.add("labels")
            warn_caller(
                f"{type(self).__name__}: over {seen} samples every index was below {high + 1}, "
                f"while num_samples={n}. Is the index the dataset index of each sample (e.g. "
                "batch[-1] of an IndexedDataset) and not its class label? Training on a small "
                "part of a large table on purpose is fine; then ignore this warning."
            )
        if (
            "epoch" not in self._warned
            and self.gamma_decay_epochs is not None
            and not self._epoch_set
            and seen > 2 * n
        ):
            self._warned.add("epoch")
            warn_caller(
                f"{type(self).__name__}: gamma_decay_epochs={self.gamma_decay_epochs} is set but "
                f"set_epoch was never called after {seen} samples (more than two epochs of "
                f"num_samples={n}), so gamma stays at its epoch-0 value 1.0. Call "
                "loss.set_epoch(epoch) at the start of every epoch."
            )


class DySTreSSBase(ContrastiveLoss):
    """Cross-entropy of ``sim / tau(sim)`` over an adapter's blocks (stateless).

    ``tau(s) = tau_min + (tau_max - tau_min) * sin(pi * s / 2) ** 2`` (see
    :func:`tau_core.dystress_temperature`); a ratio ``tau_max / tau_min`` above
    ``DYSTRESS_MONOTONE_RATIO`` warns.

    Args:
        tau_min: Temperature at similarity 0, > 0.
        tau_max: Temperature at similarity +-1, >= ``tau_min``.
        gather_distributed: If True, negatives are gathered from all processes.

    Raises:
        ValueError: If a temperature is not positive or ``tau_min > tau_max``.
    """

    def __init__(self, tau_min: float, tau_max: float, gather_distributed: bool) -> None:
        super().__init__(gather_distributed)
        if isinstance(tau_min, int) and not isinstance(tau_min, bool) and tau_min > 1:
            raise ValueError(
                f"{type(self).__name__}'s first argument is a temperature, tau_min (default "
                f"0.1), not num_samples: got {tau_min}. DySTreSS keeps no per-sample state and "
                f"needs no dataset size: {type(self).__name__}() or "
                f"{type(self).__name__}(tau_min=0.1, tau_max=0.2)."
            )
        self.tau_min, self.tau_max = check_temperature_range(tau_min, tau_max)
        warn_wide_dystress_range(self.tau_min, self.tau_max)

    def gathers(self) -> bool:
        return self.gather_distributed and is_distributed()

    def anchor_blocks(self, z0: Tensor, z1: Tensor) -> list[AnchorBlock]:
        """The adapter's similarity blocks of the normalised float32 features ``z0``, ``z1``."""
        raise NotImplementedError

    def dystress_loss(
        self, names: tuple[str, str], out0: Tensor, out1: Tensor, index: Optional[IndexLike]
    ) -> Tensor:
        """Mean over blocks of the mean cross-entropy of each block's rows (``index`` unused)."""
        batch = self.check_batch(names, (out0, out1), None, is_distributed() and self.gathers())
        blocks = self.anchor_blocks(batch.z0, batch.z1)
        surrogate_sum = SurrogateSum(blocks)
        value = torch.zeros((), device=blocks[0].device)
        tau_pos = tau_neg = tau_all = 0.0
        for position, block in enumerate(blocks):
            args = (block.pos_col, block.self_col, self.tau_min, self.tau_max)
            if block.sim is None:  # tiled: no (rows, cols) block is ever held
                rows = block.anchors.shape[0]
                term, result = tiled_dystress(
                    block.anchors, block.candidates, *args, self.chunk_size
                )
                surrogate_sum.tiled.append(term / (rows * len(blocks)))
            else:
                rows = block.sim.shape[0]
                result = dystress_rows(block.sim.detach(), *args)
                surrogate_sum.add(position, result.coef, rows * len(blocks))
            value = value + result.loss.mean() / len(blocks)
            pos_sum = result.tau_positive.sum()
            neg_sum = result.tau_negative_sum.sum()
            tau_pos = tau_pos + pos_sum / (rows * len(blocks))
            tau_neg = tau_neg + neg_sum / (rows * max(result.num_negatives, 1) * len(blocks))
            tau_all = tau_all + (pos_sum + neg_sum) / (
                rows * (result.num_negatives + 1) * len(blocks)
            )
        loss = with_value(surrogate_sum.total(), value)
        self.set_stats(
            {
                "objective": loss,
                "tau_mean": tau_all,
                "tau_positive_mean": tau_pos,
                "tau_negative_mean": tau_neg,
            },
            {"tau": self._pair_temperatures(blocks)},
        )
        return loss

    def _pair_temperatures(self, blocks: Sequence[AnchorBlock]) -> Tensor:
        """The temperatures of the pairs (positives and negatives) behind ``stats``' quantiles:
        every pair, or evenly spaced rows' pairs beyond ``STATS_PAIRS`` of them."""
        parts = []
        for block in blocks:
            tiled = block.sim is None
            rows, cols = (
                (block.anchors.shape[0], block.candidates.shape[0]) if tiled else block.sim.shape
            )
            step = max(1, math.ceil(rows * cols / (STATS_PAIRS // len(blocks))))
            picked = torch.arange(0, rows, step, device=block.device)
            if tiled:  # the picked rows' similarities only
                with torch.no_grad(), torch.autocast(block.device.type, enabled=False):
                    sim = block.anchors.detach()[picked] @ block.candidates.detach().T
            else:
                sim = block.sim.detach()[picked]
            if block.self_col is not None:
                # Every column but the row's own, in order (a gather of a known shape, where a
                # boolean mask would wait for the device to learn its size).
                others = torch.arange(cols - 1, device=sim.device)[None, :]
                others = others + (others >= block.self_col[picked][:, None])
                sim = sim.gather(1, others)
            parts.append(dystress_temperature(sim.flatten(), self.tau_min, self.tau_max))
        return torch.cat(parts)


def warn_wide_dystress_range(tau_min: float, tau_max: float) -> None:
    """Warns when ``tau_max / tau_min`` lets some negatives outrank closer pairs."""
    ratio = tau_max / tau_min
    if ratio > DYSTRESS_MONOTONE_RATIO:
        severity = (
            "a negative at similarity near 0.23 now outranks a perfect positive"
            if ratio > DYSTRESS_RANKING_RATIO
            else "s / tau(s) is no longer increasing in s, so some negatives outrank closer ones"
        )
        warn_caller(
            f"DySTreSS temperature range tau_max / tau_min = {ratio:.2f} exceeds "
            f"{DYSTRESS_MONOTONE_RATIO}: {severity}. Keep tau_max / tau_min below "
            f"{DYSTRESS_MONOTONE_RATIO}."
        )

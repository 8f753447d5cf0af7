"""The global contrastive loss with per-sample moving averages: SogCLR's and iSogCLR's step,
written once for any temperature rule (fixed, learned per sample, RGCL-g's global temperature,
TempNet's network).

The forward (:meth:`GlobalContrastiveLoss.global_contrastive_loss`) checks the batch, reads the
state rows, computes each block's rows (:func:`tau_core.global_contrastive_rows`, or its tiled form),
prepares the state write (its collectives run in the forward, on every rank; the rows are put into
the tables when the backward pass reaches the loss) and records the statistics. After each write
it warns of likely mistakes: class labels passed as indices, a gamma schedule without
``set_epoch``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from tau_core.blocks import AnchorBlock, SurrogateSum
from tau_core.checks import check_number, check_optional_epochs
from tau_core.distributed import is_distributed
from tau_core.functional import GCLRows, cosine_gamma, global_contrastive_rows, with_value
from tau_core.losses import ContrastiveLoss, IndexLike, warn_caller
from tau_core.state import make_state
from tau_core.temperature import TemperatureRule
from tau_core.tiled import tiled_global_contrastive_blocks

# Labels passed as indices: warn once the samples seen outnumber the index range this many times
# while that range is below this fraction of num_samples.
LABELS_AS_INDEX_REPEATS = 4
LABELS_AS_INDEX_FRACTION = 0.1


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


def _views(row_values: Tensor, views: int) -> Tensor:
    """A sample's rows repeated for each of its views (rows ``k * b + i``)."""
    return row_values.repeat(views) if views > 1 else row_values


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
        rule = self.settings
        taus = [rule.block_temperature(rows, k.suffix, k.views, k.anchors) for k in blocks]
        results, surrogate_sum = self._block_results(blocks, rows, taus)
        objective, temperature_term, new_rows, temperatures = self._combine_blocks(
            blocks, rows, taus, results, index.numel()
        )
        surrogate = surrogate_sum.total()
        apply_write = None
        if writes:
            if valid is not None:  # deferred checks: an invalid batch writes back the old rows
                new_rows = {k: torch.where(valid, v, rows[k]) for k, v in new_rows.items()}
            # Every collective of the write happens now, on every rank; the rows are put into
            # the tables when the backward pass reaches the loss (never, for a forward that is
            # not backpropagated, e.g. a validation pass that forgot no_grad).
            apply_write = self.state.prepare_write(index, new_rows)
            self._after_write(index.numel())
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

    def _block_results(
        self, blocks: Sequence[AnchorBlock], rows: dict[str, Tensor], taus: Sequence[Tensor]
    ) -> tuple[list[GCLRows], SurrogateSum]:
        """Each block's rows (:func:`tau_core.global_contrastive_rows`, tiled where the blocks
        are) at the temperatures ``taus``, and the surrogate's terms."""
        rule = self.settings
        gamma = self.current_gamma
        surrogate_sum = SurrogateSum(blocks)
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
        return results, surrogate_sum

    def _combine_blocks(
        self,
        blocks: Sequence[AnchorBlock],
        rows: dict[str, Tensor],
        taus: Sequence[Tensor],
        results: Sequence[GCLRows],
        b: int,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """The objective (mean over anchors and roles), the temperature term, each role's new
        state rows and temperatures, from the blocks' rows (``b``: the local batch size)."""
        rule = self.settings
        objective = torch.zeros((), device=blocks[0].device)
        temperature_term = torch.zeros((), device=blocks[0].device)
        new_rows: dict[str, Tensor] = {}
        temperatures: dict[str, Tensor] = {}
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
        return objective, temperature_term, new_rows, temperatures

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

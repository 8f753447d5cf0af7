"""Statistics and logging of a run: the loss's summary temperature written into the model's
``logit_scale``, the batch and whole-table temperature statistics (console, TensorBoard,
wandb), the set-up lines of the loss, and the per-epoch check that replicated tables agree on
every rank."""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Optional

import open_clip_train.train as upstream_train
import torch
from open_clip_train import logger as upstream_logger
from open_clip_train.distributed import is_master
from torch import Tensor, nn

from openclip_tau.data import derive_seed
from openclip_tau.registry import Temperature
from openclip_tau.train.options import option_flag
from tau_core import ShardedPerSampleState, describe_state_memory
from tau_core.adapter import all_gather_variable

SHARD_SAMPLE_ROWS = 1 << 20
"""Sharded table statistics: at most this many visited rows per rank and table are gathered."""
OWN_LOGGERS = ("open_clip", "openclip_tau", "tau_core", "lightly_tau")
"""Loggers that follow ``--debug`` / INFO as upstream sets them; every other library's keep
their level."""


class Monitoring:
    """Statistics and logging of a run (mixed into
    :class:`~openclip_tau.train.training.LossTraining`)."""

    def log_loss_setup(self, args: argparse.Namespace) -> None:
        """Master: the loss as built, its state's memory, its temperature group and the
        distributed computation, in the log.

        Args:
            args: ``open_clip_train``'s parsed options.
        """
        if is_master(args):
            table = f", per-sample table of {self.num_samples} indexed by {self.index_source}"
            dim = f", dim {self.embed_dim} (the model's embed_dim)" if self.embed_dim else ""
            logging.info(
                f"openclip_tau: --loss {self.loss_name}: {type(self.loss).__name__}"
                f"({self.loss_kwargs or 'defaults'}){table if self.stateful else ''}{dim}"
            )
            if self.stateful:
                logging.info("openclip_tau: " + describe_state_memory(self.loss, args.world_size))
            if self.trains_temperature:
                group = {k: v for k, v in self.loss.param_groups()[0].items() if k != "params"}
                count = sum(p.numel() for p in self.loss.temperature_parameters())
                logging.info(
                    f"openclip_tau: the temperature's {count} parameters are stepped by the "
                    f"run's optimizer in their own group {group}."
                )
            if self.ours:
                given = [f for f in ("local_loss", "gather_with_grad") if getattr(args, f)]
                logging.info(
                    f"openclip_tau: --loss {self.loss_name} computes each rank's anchors against "
                    "the candidates gathered from all ranks with the gradient through the gather "
                    "(as upstream's --local-loss --gather-with-grad; "
                    f"{' '.join(option_flag(f) for f in given) or 'neither flag'} given). The model's "
                    f"logit_scale is set to {self.spec.temperature_rule}."
                )
                self._warn_small_batch(args)

    def compare_ranks(self, args: argparse.Namespace) -> None:
        """After an epoch: replicated tables must be equal on every rank (sharded ones differ
        by design: said once).

        Args:
            args: ``open_clip_train``'s parsed options.

        Raises:
            RuntimeError: Replicated tables differ between ranks (:meth:`check_ranks_agree`).
        """
        if self.stateful and args.distributed:
            if self.sharded():
                if not self.said_sharded and is_master(args):
                    logging.info(
                        f"openclip_tau: per-sample state sharded over {args.world_size} ranks: "
                        "no cross-rank comparison."
                    )
                self.said_sharded = True
            else:
                self.check_ranks_agree(args)

    def write_logit_scale(self, model: nn.Module) -> None:
        """Writes ln(1/tau) of the loss's summary temperature into the model's ``logit_scale``.

        The summary temperature is the registry entry's rule (``LossSpec.temperature`` or
        ``LossSpec.logit_scale``); a model without a ``logit_scale`` tensor, or a loss without a
        summary yet, is left as it is.

        Args:
            model: The model, DDP-wrapped or not.
        """
        scale = getattr(upstream_train.unwrap_model(model), "logit_scale", None)
        if not isinstance(scale, Tensor):
            return
        if self.spec.logit_scale is not None:
            with torch.no_grad():
                value = self.spec.logit_scale(self).to(scale.device, non_blocking=True)
                scale.copy_(value.to(scale.dtype).reshape(scale.shape))
            return
        tau = self.spec.temperature(self)
        if tau is None:
            return
        with torch.no_grad():
            tau = torch.as_tensor(tau, dtype=torch.float32).to(scale.device, non_blocking=True)
            scale.copy_(torch.log(1.0 / tau).to(scale.dtype).reshape(scale.shape))

    def stat_mean(self, name: str, default: Optional[Temperature] = None) -> Optional[Temperature]:
        """Mean of the batch statistic ``name`` over this epoch's steps so far (or ``default``).

        Args:
            name: A key of the loss's ``stats``.
            default: Returned before the first step or for an unknown name. Default None.
        """
        if name not in self.stat_sums or self.step_in_epoch == 0:
            return default
        return self.stat_sums[name] / self.step_in_epoch

    def table_stats(self) -> dict[str, Tensor]:
        """Whole-table temperature statistics over the rows visited so far (0-d tensors).

        For every ``tau_<role>`` table: ``table_tau_<role>_{mean,min,p10,p50,p90,max}`` over the
        rows whose ``log_u_<role>`` is finite (visited), and ``table_visited_<role>``. Also sets
        :attr:`table_median`, the median of the visited temperatures of all roles pooled.
        """
        state = getattr(self.loss, "state", None)
        if state is None:
            return {}
        sharded = isinstance(state, ShardedPerSampleState)
        # Sharded: this rank's rows, no gather of whole tables (see sharded_sample).
        column = state.shard if sharded else state.table
        stats: dict[str, Tensor] = {}
        pooled = []
        for name in state.names:
            if not name.startswith("log_u_"):
                continue
            role = name[len("log_u_") :]
            visited = torch.isfinite(column(name))
            count = visited.sum()
            if sharded:
                torch.distributed.all_reduce(count)
            stats[f"table_visited_{role}"] = count
            if f"tau_{role}" in state.names:
                tau = column(f"tau_{role}")[visited]
                if sharded:
                    tau = sharded_sample(tau, seed=self.epoch)
                pooled.append(tau)
                stats.update(quantile_stats(tau, f"table_tau_{role}"))
        if pooled and not sum(t.numel() for t in pooled):
            # Nothing visited yet: the median of the initial tables (every table has the same
            # rows, so it is that of the initial values); TempNet's are NaN: none.
            initial = [state.initial_values[n] for n in state.names if n.startswith("tau_")]
            initial = [v for v in initial if math.isfinite(v)]
            pooled = [torch.tensor(initial, dtype=torch.float32, device=state.device)]
        if pooled and sum(t.numel() for t in pooled):
            self.table_median = quantile_stats(torch.cat(pooled), "tau")["tau_p50"]
        return stats

    def check_ranks_agree(self, args: argparse.Namespace) -> None:
        """Raises if the per-sample state differs between ranks (one small gather per epoch).

        Every rank applies the same update for the whole global batch, so the tables must stay
        identical; public implementations that update only the local rank drift apart here.
        The checksums are computed where the tables are (CPU or GPU); only floats are gathered.

        Args:
            args: ``open_clip_train``'s parsed options (``world_size``).

        Raises:
            RuntimeError: The checksums of :func:`state_checksums` differ between ranks.
        """
        gathered: list[Any] = [None] * args.world_size
        torch.distributed.all_gather_object(gathered, state_checksums(self.loss))
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(
                f"The per-sample loss state differs between ranks after epoch {self.epoch}: "
                f"{gathered}."
            )
        if is_master(args):
            logging.info(
                f"openclip_tau: per-sample state identical on all {args.world_size} ranks after "
                f"epoch {self.epoch}."
            )

    def step_stats(self) -> dict[str, Tensor]:
        """The loss's statistics of this step; RGCL-g's global temperature also as ``tau``."""
        stats = dict(self.loss.stats)
        if self.spec.logit_scale is not None:
            stats["tau"] = torch.exp(-self.spec.logit_scale(self).float())
        return stats

    def log_stats(self, stats: dict[str, Tensor], step: int, title: str = "Loss stats") -> None:
        """Statistics to OpenCLIP's console, TensorBoard and wandb (as ``train/<name>``).

        Batch temperatures are named ``batch_tau_*``, whole-table ones ``table_tau_*``.

        Args:
            stats: Name to 0-d tensor.
            step: The global step (TensorBoard's and wandb's x axis), >= 0.
            title: The console line's start. Default ``"Loss stats"``.
        """
        names = list(stats)
        values = dict(zip(names, torch.stack([stats[k].detach().float() for k in names]).tolist()))
        # The console gets the objective, visited counts and the temperatures' mean and
        # quantiles; TensorBoard and wandb get every statistic.
        brief = [
            k
            for k in names
            if k in ("objective", "tau")
            or k.startswith("table_visited")
            or k.endswith(("_mean", "_p10", "_p50", "_p90"))
        ]
        logging.info(
            f"{title} epoch {self.epoch} step {step}: "
            + " ".join(f"{k}: {values[k]:.5g}" for k in brief)
        )
        log_data = {f"train/{k}": v for k, v in values.items()}
        if self.tb_writer is not None:
            for name, value in log_data.items():
                self.tb_writer.add_scalar(name, value, step)
        if self.args.wandb:
            import wandb

            wandb.log(log_data, step=step)


def quantile_stats(values: Tensor, prefix: str) -> dict[str, Tensor]:
    """Mean, min, p10, p50, p90 and max of a 1-D tensor (linear interpolation, as
    ``torch.quantile``, which refuses more than 2^24 values; tables can be larger).

    Args:
        values: Any shape (flattened); may be empty.
        prefix: The names' start: ``tau`` gives ``tau_mean``, ``tau_min``, ``tau_p10``,
            ``tau_p50``, ``tau_p90``, ``tau_max``.

    Returns:
        Name to 0-d float tensor; empty for empty ``values``.
    """
    values = values.detach().float().flatten()
    if values.numel() == 0:
        return {}
    ordered = torch.sort(values).values
    out = {f"{prefix}_mean": values.mean(), f"{prefix}_min": ordered[0]}
    last = ordered.numel() - 1
    for q in (10, 50, 90):
        position = q / 100 * last
        low = math.floor(position)
        high = min(low + 1, last)
        frac = position - low
        out[f"{prefix}_p{q}"] = ordered[low] + (ordered[high] - ordered[low]) * frac
    out[f"{prefix}_max"] = ordered[-1]
    return out


def state_checksums(loss: nn.Module) -> list[tuple[str, float, float]]:
    """Two checksums per state tensor (sum, position-weighted sum), computed on its device.

    Non-finite entries (unvisited rows) count as -1e4; the sums are rounded to 6 decimals.

    Args:
        loss: The loss module (its floating-point ``state_dict`` entries are summed).

    Returns:
        (name, sum, weighted sum) per floating-point entry.
    """
    checksums = []
    for name, table in loss.state_dict().items():
        if isinstance(table, Tensor) and table.is_floating_point():
            t = torch.where(torch.isfinite(table), table, torch.full_like(table, -1e4)).double()
            weights = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
            both = torch.stack([t.sum(), (t.flatten() * weights / t.numel()).sum()]).tolist()
            checksums.append((name, round(both[0], 6), round(both[1], 6)))
    return checksums


def sharded_sample(values: Tensor, seed: int, limit: int = SHARD_SAMPLE_ROWS) -> Tensor:
    """Every rank's ``values`` gathered (a collective): all of them when a rank holds at most
    ``limit``, else a uniform sample of ``limit`` of its values (seeded by ``seed`` and the rank),
    so the table statistics of a LAION-size sharded state never gather whole tables. The
    quantiles of the union are exact for tables of up to ``limit`` visited rows per rank.

    Args:
        values: This rank's values, 1-D.
        seed: Seeds the sample together with the rank (the run uses the epoch).
        limit: Most values taken per rank, >= 1. Default :data:`SHARD_SAMPLE_ROWS` (2^20).

    Returns:
        The values of all ranks, concatenated in rank order.
    """
    if values.numel() > limit:
        rank = torch.distributed.get_rank()
        generator = torch.Generator().manual_seed(derive_seed("table-sample", seed, rank))
        pick = torch.randperm(values.numel(), generator=generator)[:limit]
        values = values[pick.to(values.device)]
    return torch.cat(all_gather_variable(values.contiguous()))


def setup_logging(log_file: Optional[str], level: int, include_host: bool = False) -> None:
    """Upstream's logging set-up, except that it no longer lowers other libraries' loggers.

    Upstream sets every logger that exists to ``level`` (INFO), so torch's internal loggers
    printed their INFO lines (``TorchDynamo compilation metrics``, ``FakeTensor cache stats``
    at exit) after every run; they get their own levels back.

    Args:
        log_file: Upstream's log file, or None for the console only.
        level: The level of upstream's and our loggers (``logging.INFO`` or ``DEBUG``).
        include_host: Whether each line names the host. Default False.
    """
    levels = {  # a placeholder (a parent not yet made) becomes a logger: NOTSET
        name: getattr(logger, "level", logging.NOTSET)
        for name, logger in logging.root.manager.loggerDict.items()
        if not name.startswith(OWN_LOGGERS)
    }
    upstream_logger.setup_logging(log_file, level, include_host)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)

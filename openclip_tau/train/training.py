"""What remains of a run once its concerns have their modules: :class:`LossTraining` holds the
run's state and the replacements of upstream's names, and coordinates the options
(:mod:`~openclip_tau.train.options`), the checks (:mod:`~openclip_tau.train.checks`), the
checkpoints (:mod:`~openclip_tau.train.checkpoint`), the statistics
(:mod:`~openclip_tau.train.monitoring`) and the patches (:mod:`~openclip_tau.train.patches`);
:func:`run_training` runs it (the entry points are in
:mod:`~openclip_tau.train.command`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import open_clip
import open_clip_train.main as upstream_main
import open_clip_train.train as upstream_train
import torch
from open_clip_train import data as upstream_data
from open_clip_train import params as upstream_params
from open_clip_train.distributed import is_master
from torch import Tensor, nn

from openclip_tau.data import (
    IndexedLoader,
    SampleIndexer,
    derive_seed,
    indexed_train_data,
    seed_everything,
)
from openclip_tau.key_index import KeyIndex
from openclip_tau.registry import LOSSES, LossSpec
from openclip_tau.train import patches
from openclip_tau.train.checkpoint import LossCheckpoints
from openclip_tau.train.checks import InputChecks, model_embed_dim, train_data_kind
from openclip_tau.train.errors import TrainingSetupError, UpstreamDriftError, prints_errors
from openclip_tau.train.monitoring import Monitoring
from openclip_tau.train.options import (
    LOSS_OPTIONS,
    SWITCHES,
    build_loss,
    class_defaults,
    loss_kwargs,
    parse_loss_args,
)
from openclip_tau.train.patches import UpstreamGuards
from tau_core import ShardedPerSampleState


class IndexedLoss(nn.Module):
    """Calls our loss the way ``open_clip_train`` calls its losses, adding the batch's indices.

    ``train_one_epoch`` calls ``loss(**model_out, output_dict=True)``; the indices come from the
    run's queue, filled by the data loader. With ``--accum-freq k`` upstream calls the loss
    k times per optimizer step on the step's k batches together; the state is written by the
    last of those calls only.

    Args:
        loss: Our loss module (an entry of ``openclip_tau.registry.LOSSES``).
        run: The run whose queue holds the batches' indices.
    """

    def __init__(self, loss: nn.Module, run: LossTraining) -> None:
        super().__init__()
        self.loss = loss
        self.run = run

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Optional[Tensor] = None,
        logit_bias: Optional[Tensor] = None,
        output_dict: bool = False,
        **other_outputs: Tensor,
    ) -> Any:
        """The loss of one call of upstream's loop, with the indices of the batches it covers.

        Args:
            image_features: Shape (batch, dim).
            text_features: Shape (batch, dim).
            logit_scale: The model's ``logit_scale`` (upstream passes it). Default None.
            logit_bias: The model's ``logit_bias`` (SigLIP models). Default None.
            output_dict: Whether to return the dict of losses. Default False.
            **other_outputs: Other model outputs; any given is refused.

        Returns:
            ``{"contrastive_loss": loss}`` with ``output_dict``, else the loss (0-d).

        Raises:
            ValueError: The model returns more than image and text features (CoCa,
                distillation).
            UpstreamDriftError: The queue does not hold the indices of ``--accum-freq``
                batches.
        """
        if other_outputs:
            raise ValueError(
                f"--loss {self.run.loss_name} trains CLIP-style models (image_features, "
                f"text_features, logit_scale); this model also returns {sorted(other_outputs)}."
            )
        index, write = self.run.next_call()
        if index is not None:
            index = index.to(image_features.device, non_blocking=True)
        self.loss.train(write)  # the state is written by the last call of an optimizer step only
        out = self.loss(
            image_features,
            text_features,
            logit_scale,
            index=index,
            logit_bias=logit_bias,
            output_dict=True,
        )
        if write:
            self.run.end_step(self.run.step_stats())
        return out if output_dict else out["contrastive_loss"]


class LossTraining(InputChecks, LossCheckpoints, Monitoring, UpstreamGuards):
    """One training run: our options, the loss, the index queue, and upstream's patched names.

    Its methods replace ``open_clip_train.main``'s ``parse_args``,
    ``create_model_and_transforms``, ``get_data``, ``create_loss``, ``train_one_epoch``,
    ``pt_load`` and ``torch.save`` while :meth:`installed` is active; the checks, checkpoints,
    statistics and guards come from the mixins of the other modules.

    Args:
        options: Our options, as :func:`~openclip_tau.train.options.parse_loss_args` returns
            them.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.loss_name: str = options.loss
        self.loss_kwargs = loss_kwargs(options)
        self.spec: Optional[LossSpec] = LOSSES.get(self.loss_name)
        self.ours = self.spec is not None
        self.stateful = self.ours and self.spec.stateful
        self.trains_temperature = self.ours and self.spec.trains_temperature
        self.state_layout: str = getattr(options, "tau_state", None) or "replicated"
        self.args: Optional[argparse.Namespace] = None
        self.loss: Optional[nn.Module] = None  # the module whose state_dict is checkpointed
        self.num_samples: Optional[int] = None
        self.index_source = ""
        # What maps samples to table rows: a key index's, a csv's or a rule's fingerprint.
        self.index_fingerprint: Optional[str] = None
        self.resumed: Optional[dict[str, Any]] = None  # loss entries of the --resume checkpoint
        self.resumed_path = ""
        self.table_median: Optional[Tensor] = None  # iSogCLR's summary temperature
        self.saved_paths: set[str] = set()  # checkpoints written with our entries
        self.last_completed: Optional[int] = None
        self.embed_dim: Optional[int] = None  # the model's, for TempNet's networks
        # The optimizer that steps the loss's temperature group, and the saved optimizer state
        # (with that group) to load once the group is added.
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.optimizer_state: Optional[dict[str, Any]] = None
        self.shard_folders: dict[int, str] = {}  # sharded layout: epoch -> folder written
        self.said_sharded = False
        self.key_index: Optional[KeyIndex] = None  # loaded by check_inputs
        self.data_rows: Optional[int] = None  # csv rows or synthetic samples
        self.inputs_checked = False
        self._create_model: Callable[..., Any] = upstream_main.create_model_and_transforms
        # Per-epoch progress, reset by train_one_epoch.
        self.pending: list[Tensor] = []
        self.batches_seen = 0
        self.calls = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.steps_per_epoch = 1
        self.stat_sums: dict[str, Tensor] = {}
        self.tb_writer: Any = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Replaces the names ``open_clip_train.main`` bound at import, for this run only
        (:func:`openclip_tau.train.patches.installed`)."""
        with patches.installed(self):
            yield

    def parse_args(self, argv: Sequence[str]) -> argparse.Namespace:
        """Upstream's ``parse_args`` (usage and errors on rank 0 only), then our checks.

        Args:
            argv: The arguments left for upstream by ``parse_loss_args``.

        Returns:
            Upstream's options, with ``loss`` and our options added (so ``params.txt`` and
            wandb list them).

        Raises:
            TrainingSetupError: An option combination the loss does not support.
            SystemExit: Upstream's parser refuses the arguments (code 2).
        """
        quiet = (
            contextlib.nullcontext()
            if prints_errors()
            else contextlib.redirect_stderr(io.StringIO())
        )
        with quiet:  # upstream's usage and error lines: rank 0 only
            args = upstream_params.parse_args(argv)
        self._check(args)
        args.loss = self.loss_name
        for dest in ("tau_num_samples", "tau_key_index", *LOSS_OPTIONS, *SWITCHES):
            setattr(args, dest, getattr(self.options, dest))  # listed in params.txt and wandb
        args.tau_state = self.state_layout
        self.args = args
        return args

    # -------------------------------------------------------------- data
    def get_data(
        self, args: argparse.Namespace, preprocess_fns: Any, epoch: int = 0, tokenizer: Any = None
    ) -> dict[str, Any]:
        """Upstream's ``get_data``; for the losses with state the training set carries indices.

        Args:
            args: ``open_clip_train``'s parsed options.
            preprocess_fns: The (train, validation) transforms.
            epoch: The epoch to start at, >= 0. Default 0.
            tokenizer: The model's tokenizer. Default None.

        Returns:
            Upstream's data dict; ``"train"`` holds an :class:`~openclip_tau.data.IndexedLoader`.

        Raises:
            UpstreamDriftError: Upstream built a csv or synthetic training set of another size
                than was counted.
        """
        if not self.stateful:
            return upstream_data.get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        # Validation and zero-shot sets as upstream builds them; the training set with indices.
        others = copy.copy(args)
        if args.dataset_type != "synthetic":
            others.train_data = None
        data = upstream_data.get_data(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        if not (args.train_data or args.dataset_type == "synthetic"):
            return data
        info = indexed_train_data(args, preprocess_fns[0], epoch, tokenizer)
        indexer = self._make_indexer(args, info)
        loader = IndexedLoader(info.dataloader, indexer, self.on_batch)
        data["train"] = dataclasses.replace(info, dataloader=loader)
        return data

    def _make_indexer(self, args: argparse.Namespace, info: Any) -> SampleIndexer:
        """The key map for the training set, with the table planned by :meth:`check_inputs`."""
        if not self.inputs_checked:  # get_data called without open_clip_train.main
            self.plan_table(args)
        kind = train_data_kind(args)
        if kind in ("csv", "synthetic") and info.dataloader.num_samples != self.data_rows:
            raise UpstreamDriftError(
                f"open_clip_train built a training set of {info.dataloader.num_samples} "
                f"samples from {args.train_data}, where openclip_tau counted {self.data_rows}."
            )
        return SampleIndexer(self.num_samples, self.key_index)

    def create_model_and_transforms(self, *args: Any, **kwargs: Any) -> Any:
        """``open_clip.create_model_and_transforms`` for ``open_clip_train.main``, after
        :meth:`check_inputs` (once): bad inputs are refused before the model is built.

        Args:
            *args: Passed on to ``open_clip.create_model_and_transforms``.
            **kwargs: Passed on to ``open_clip.create_model_and_transforms``.

        Returns:
            What ``open_clip.create_model_and_transforms`` returns.

        Raises:
            TrainingSetupError: A refused input (:meth:`check_inputs`).
        """
        if not self.inputs_checked:
            self.check_inputs(self.args)
        return self._create_model(*args, **kwargs)

    def create_loss(self, args: argparse.Namespace) -> nn.Module:
        """Upstream's ``create_loss`` for ``clip`` and ``siglip``; ours otherwise.

        Ours is built on the training device, wrapped in :class:`IndexedLoss`, and its state
        restored from ``--resume`` (unless ``--tau-fresh-state``).

        Args:
            args: ``open_clip_train``'s parsed options.

        Returns:
            The loss upstream's loop calls.

        Raises:
            TrainingSetupError: ``--tau-state sharded`` in one process, a model config without
                ``embed_dim`` (TempNet), or a checkpoint whose loss state cannot be restored.
        """
        if not self.ours:
            self.loss = open_clip.create_loss(args)
            result = self.loss
        else:
            if self.state_layout == "sharded" and args.world_size < 2:
                raise TrainingSetupError(
                    "--tau-state sharded splits the tables over the ranks of torchrun; this run "
                    "has one process: use --tau-state replicated."
                )
            if "dim" in inspect.signature(self.spec.cls.__init__).parameters:
                self.embed_dim = model_embed_dim(args.model, self.loss_name)
            self.loss = build_loss(
                self.loss_name,
                self.loss_kwargs,
                num_samples=self.num_samples,
                rank=args.rank,
                world_size=args.world_size,
                distributed={
                    "local_loss": args.local_loss,
                    "gather_with_grad": args.gather_with_grad,
                },
                dim=self.embed_dim,
                state_layout=self.state_layout,
            )
            # The tables and the temperature's parameters live on the training device: no step
            # copies them through the host (NCCL also needs a sharded table there).
            self.loss.to(args.device)
            result = IndexedLoss(self.loss, self)
        self.log_loss_setup(args)
        self._restore_loss_state()
        return result

    def sharded(self) -> bool:
        """Whether the loss's per-sample state is split over the ranks (``--tau-state sharded``)."""
        return isinstance(getattr(self.loss, "state", None), ShardedPerSampleState)

    def option(self, kwarg: str) -> Any:
        """The loss's keyword ``kwarg`` as given (``--tau-*``) or the class default (or None).

        Args:
            kwarg: A keyword of the loss class, e.g. ``"rho"``.
        """
        if kwarg in self.loss_kwargs:
            return self.loss_kwargs[kwarg]
        return class_defaults(self.spec.cls).get(kwarg) if self.ours else None

    def _log_master(self, message: str, level: int = logging.INFO) -> None:
        if self.args is None or is_master(self.args):
            logging.log(level, message)

    def on_batch(self, index: Tensor) -> None:
        """Called by the data loader with the table indices of each batch it yields.

        Args:
            index: The batch's table indices, shape (batch,), int64.
        """
        self.pending.append(index)
        self.batches_seen += 1

    def train_one_epoch(
        self,
        model: nn.Module,
        data: dict[str, Any],
        loss: Any,
        epoch: int,
        optimizer: Any,
        scaler: Any,
        scheduler: Any,
        dist_model: Any,
        args: argparse.Namespace,
        tb_writer: Any = None,
    ) -> Any:
        """``open_clip_train.train.train_one_epoch`` between the loss's epoch start (optimizer
        group, queue, seeds, ``logit_scale``) and its epoch end (checks, statistics, shards).

        The arguments are upstream's, passed on unchanged (except that the scheduler, for our
        losses, also writes the loss's temperature into the model's ``logit_scale``).

        Args:
            model: The model.
            data: Upstream's data dict (``"train"`` and the evaluation sets).
            loss: The loss of :meth:`create_loss`.
            epoch: The epoch, >= 0.
            optimizer: Upstream's optimizer.
            scaler: The AMP gradient scaler, or None.
            scheduler: Upstream's learning-rate schedule (called with the step), or None.
            dist_model: The distillation model, or None.
            args: ``open_clip_train``'s parsed options.
            tb_writer: Upstream's TensorBoard writer. Default None.

        Raises:
            UpstreamDriftError: Upstream's loop did not call the loss once per batch, or wrote
                a checkpoint without the loss entries.
        """
        self.start_epoch(model, data, epoch, optimizer, args, tb_writer)

        def scheduler_then_scale(step: int) -> Any:
            # Upstream calls the scheduler before each step's forward (unless
            # --skip-scheduler): the step's forward, its logs and the clamp see our scale.
            out = scheduler(step) if scheduler is not None else None
            self.write_logit_scale(model)
            return out

        # Looked up at call time, so upstream's loop (or a test's stand-in) is what runs.
        upstream_train.train_one_epoch(
            model,
            data,
            loss,
            epoch,
            optimizer,
            scaler,
            scheduler_then_scale if self.ours else scheduler,
            dist_model,
            args,
            tb_writer,
        )
        self.end_epoch(model, epoch, args, tb_writer)

    def start_epoch(
        self,
        model: nn.Module,
        data: dict[str, Any],
        epoch: int,
        optimizer: Any,
        args: argparse.Namespace,
        tb_writer: Any,
    ) -> None:
        """Before upstream's epoch: the last epoch's checkpoints checked, the temperature group
        added (once), the per-epoch progress reset, the seeds and the model's scale set.

        Args:
            model: The model (its ``logit_scale`` is set).
            data: Upstream's data dict (``data["train"].dataloader.num_batches``).
            epoch: The epoch starting, >= 0.
            optimizer: Upstream's optimizer (gets the temperature group).
            args: ``open_clip_train``'s parsed options.
            tb_writer: Upstream's TensorBoard writer, or None.

        Raises:
            UpstreamDriftError: The last epoch's checkpoint lacks the loss entries, or another
                optimizer than the first epoch's.
        """
        if self.last_completed is not None:
            self.verify_checkpoints(self.last_completed)
            self.remove_unreferenced_shards(args)
        if self.trains_temperature:
            self.attach_optimizer(optimizer)
        self.pending.clear()  # an incomplete --accum-freq group of the last epoch is dropped
        self.batches_seen = 0
        self.calls = 0
        self.epoch = epoch
        self.step_in_epoch = 0
        self.steps_per_epoch = max(1, data["train"].dataloader.num_batches // args.accum_freq)
        self.stat_sums = {}
        self.tb_writer = tb_writer
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)
        if self.stateful:
            # Sampling order (csv, synthetic) and augmentations drawn in this process depend on
            # the epoch only, so a resumed run repeats the epochs it did not finish.
            seed_everything(derive_seed("main", args.seed, epoch, args.rank))
        if self.ours:
            if self.table_median is None:
                self.table_stats()  # after a resume: the restored tables' median
            self.write_logit_scale(model)

    def end_epoch(
        self, model: nn.Module, epoch: int, args: argparse.Namespace, tb_writer: Any
    ) -> None:
        """After upstream's epoch: the loss was called, table statistics, the scale unclamped,
        the ranks compared, the shards written.

        Args:
            model: The model (its ``logit_scale`` is set).
            epoch: The epoch that ended, >= 0.
            args: ``open_clip_train``'s parsed options.
            tb_writer: Upstream's TensorBoard writer, or None.

        Raises:
            UpstreamDriftError: The loss was not called once per batch.
            RuntimeError: Replicated tables differ between ranks.
        """
        if self.ours:
            self.check_loss_was_called()
            stats = self.table_stats()
            self.write_logit_scale(model)  # validation and the checkpoint get it unclamped
            if stats and is_master(args):
                self.log_stats(stats, self.steps_per_epoch * (epoch + 1) - 1, "Table stats")
        if tb_writer is not None:
            tb_writer.flush()  # upstream never closes its writer; make each epoch's scalars land
        self.compare_ranks(args)
        self.last_completed = epoch + 1
        self.save_shards(args, epoch + 1)

    def next_call(self) -> tuple[Optional[Tensor], bool]:
        """The indices for this loss call, and whether it is the last call of its step.

        Returns:
            The queued batches' indices concatenated (None for the losses without state), and
            True on the ``--accum-freq``-th call of a step.

        Raises:
            UpstreamDriftError: The queue does not hold ``--accum-freq`` batches.
        """
        self.calls += 1
        write = self.calls >= self.args.accum_freq
        if not self.stateful:
            return None, write
        if len(self.pending) != self.args.accum_freq:
            raise UpstreamDriftError(
                f"--loss {self.loss_name} was called with the indices of {len(self.pending)} "
                f"queued batches, expected {self.args.accum_freq} (--accum-freq): "
                + (
                    "the training data was not built by openclip_tau.train."
                    if not self.pending
                    else "open_clip_train's loop no longer calls the loss once per batch."
                )
            )
        return torch.cat(self.pending), write

    def end_step(self, stats: dict[str, Tensor]) -> None:
        """After the last loss call of an optimizer step: reset the queue, log statistics.

        Args:
            stats: The step's statistics (name to 0-d tensor), summed for the epoch's means and
                logged every ``--log-every-n-steps`` steps.
        """
        self.pending.clear()
        self.calls = 0
        i = self.step_in_epoch
        self.step_in_epoch += 1
        for name, value in stats.items():  # running sums on the device, no host sync
            value = value.detach().float()
            self.stat_sums[name] = self.stat_sums[name] + value if name in self.stat_sums else value
        args = self.args
        if not stats or not is_master(args):
            return
        if i % args.log_every_n_steps == 0 or i + 1 == self.steps_per_epoch:
            batch = {(f"batch_{k}" if k.startswith("tau_") else k): v for k, v in stats.items()}
            self.log_stats(batch, self.steps_per_epoch * self.epoch + i)


def run_training(argv: Sequence[str]) -> Optional[int]:
    """Runs ``open_clip_train.main.main`` with the loss of ``argv``; returns what it returns.

    Args:
        argv: The command line without the program name and without ``--help``
            (:func:`openclip_tau.train.main` prepares it).

    Returns:
        What ``open_clip_train.main.main`` returns.

    Raises:
        TrainingSetupError: A refused input, found before the model is built.
        SystemExit: A refused option (code 2, one line on stderr).
    """
    options, rest = parse_loss_args(argv)
    for path in options.add_model_config:
        if not os.path.exists(path):
            raise TrainingSetupError(f"--add-model-config {path}: no such file or folder.")
        open_clip.add_model_config(path)
    if options.loss == "siglip":
        rest.append("--siglip")
    run = LossTraining(options)
    handlers = list(logging.root.handlers)
    try:
        with run.installed():
            result = upstream_main.main(rest)
        if run.last_completed is not None:
            run.verify_checkpoints(run.last_completed)
            run.remove_unreferenced_shards(run.args)
        return result
    finally:
        # upstream's setup_logging adds handlers at every call; drop them so that a second run in
        # the same process does not write into the first run's log file.
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()

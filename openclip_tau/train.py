"""OpenCLIP's own training loop with a ``--loss`` choice: clip, siglip, sogclr, isogclr, rgclg,
tempnet, dystress.

Usage (every option of ``open_clip_train.main`` works as upstream)::

    python -m openclip_tau.train --loss isogclr --tau-key-index /data/cc3m/key_index.txt \\
        --train-data "/data/cc3m/{00000..00331}.tar" --dataset-type webdataset \\
        --train-num-samples 2800000 --model RN50 --batch-size 128 --epochs 30 ...
    torchrun --nproc-per-node 8 -m openclip_tau.train --loss sogclr ...

Nothing of the training loop is copied. ``open_clip_train.main.main`` runs as it is, with the
names it bound at import replaced for the duration of the run (docs/design.md):

- ``parse_args``: our options (``--loss``, ``--tau-*``, ``--add-model-config``) are removed before
  upstream's parser sees them (it matches prefixes: ``--loss X`` would become
  ``--loss-dist-impl X``) and checked against upstream's (table size, conflicts);
- ``create_model_and_transforms``: first checks what needs files (:meth:`LossTraining.check_inputs`:
  the ``--resume`` checkpoint's loss entries, the key index, the csv's rows), so that every
  refusal comes before the model is built;
- ``get_data``: for the stateful losses (sogclr, isogclr, rgclg, tempnet) the training set is
  built by upstream's functions with an index per pair (:mod:`openclip_tau.data`); the loop
  still receives ``(images, texts)``;
- ``create_loss``: builds our loss (``rank``/``world_size`` from upstream's distributed setup,
  ``--tau-state``'s layout, TempNet's ``dim`` from the model config's ``embed_dim``), logs the
  per-sample state's memory per rank, and restores its state from the checkpoint given to
  ``--resume``;
- ``train_one_epoch``: for rgclg and tempnet, at its first call, adds the loss's temperature
  group (``loss.param_groups()``) to the optimizer upstream built before the loss and registers
  the loss's hooks on it (its own lr schedule and bounds); calls ``set_epoch`` on the loss,
  then upstream's loop with a scheduler
  that also writes the loss's temperature into the model's ``logit_scale`` before every step;
  afterwards checks that the loss got every batch's indices and logs the whole table's
  temperature statistics;
- ``pt_load`` (to read the loss state of the resumed checkpoint; upstream loads the optimizer
  before the loss exists, so it gets the saved optimizer state without the temperature group,
  and the whole state is loaded once that group is added) and, inside the ``torch`` name
  of ``open_clip_train.main`` only, ``save`` (checkpoints also hold ``loss_state_dict``,
  ``loss_name`` and ``loss_options``) and ``nn.parallel.DistributedDataParallel`` (CPU processes
  get ``device_ids=None``: upstream passes ``[cpu]``, which DDP rejects).

``--loss clip`` and ``--loss siglip`` keep upstream's loss and data; they share the fixes above
(end-of-shard with webdataset 1.0.2, DDP on CPU) and ``loss_name`` in checkpoints.

``logit_scale``: our losses do not use the model's scale, but upstream shows it (console "Logit
Scale", ``train/scale``), uses it in its validation loss, and saves it, so an exported checkpoint
would carry an unrelated ln(1/0.07). The wrapper writes ln(1/tau) into it (see :data:`LOSSES`):
SogCLR's ``--tau-temperature`` exactly; iSogCLR the median of the per-sample temperatures of the
rows visited so far, image and text tables pooled (recomputed at every epoch start and end);
DySTreSS the mean temperature of the positive pairs over the epoch's steps so far; RGCL-g its
learned global temperature (the loss's own ``logit_scale`` parameter, copied bit for bit); TempNet
the median of the temperatures predicted at the last visit of the visited rows, as iSogCLR's
(unchanged until a row was visited). Upstream clamps
the scale at 100 after each step; the value is written again before the next step and after the
epoch's last one, so validation and checkpoints carry it unclamped.

Distributed options: our losses compute each rank's anchors against the candidates gathered
from all ranks, with the gradient through the gather, i.e. what upstream's ClipLoss does with
``--local-loss --gather-with-grad``; both flags given, or neither (which in upstream also gives
the exact gradient), are accepted; ``--local-loss`` alone (upstream then drops the other ranks'
gradient) and ``--loss-dist-impl`` (SigLIP's exchange) are refused.

``--tau-state sharded`` (torchrun only): rank r holds the table rows i % world_size == r. Every
rank writes its rows of each checkpointed epoch into ``checkpoints/epoch_K.tau_state/`` (one file
per rank and an ``index.json``), which the checkpoint names (``loss_options["state_shards"]``);
``--resume`` re-shards them to this run's layout and number of processes. The whole-table
statistics are computed from the gathered visited rows (a sample of at most 2^20 per rank and
table beyond that), and the cross-rank comparison of the state is skipped (ranks differ by
design).

The loss receives each batch's indices without changing what the loop unpacks: the data loader
queues the indices of each batch it yields, and the loss consumes the queue once per optimizer
step. With ``--accum-freq k`` the loss is called k times on the k batches of a step; every call
reads the same stored rows, and only the last writes them, so the state is updated once per
optimizer step exactly as with one batch k times larger.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import logging
import math
import os
import re
import shutil
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import open_clip
import open_clip_train.main as upstream_main
import open_clip_train.train as upstream_train
import torch
from open_clip_train import data as upstream_data
from open_clip_train import file_utils as upstream_file_utils
from open_clip_train import logger as upstream_logger
from open_clip_train import params as upstream_params
from open_clip_train import zero_shot as upstream_zero_shot
from open_clip_train.distributed import is_master, is_using_distributed, world_info_from_env
from torch import Tensor, nn

from openclip_tau.data import (
    IndexedLoader,
    SampleIndexer,
    SampleKeyError,
    derive_seed,
    indexed_train_data,
    patched,
    seed_everything,
    tarfile_to_samples_nothrow,
)
from openclip_tau.key_index import KeyIndex, expand_shards, load_key_index, shard_name
from openclip_tau.losses import (  # noqa: F401  (the classes, also as openclip_tau.train's names)
    DySTreSSClipLoss,
    ISogCLRClipLoss,
    RGCLGClipLoss,
    SogCLRClipLoss,
    TempNetClipLoss,
)
from openclip_tau.registry import LOSSES, LossSpec, Temperature, loss_options, off_at_zero
from tau_core import (
    STATE_LAYOUTS,
    ShardedPerSampleState,
    all_gather_variable,
    describe_state_memory,
    load_state_shards,
    save_state_shards,
)

LOSS_CHOICES = ("clip", "siglip", *LOSSES)
LOSS_CLASSES = {name: spec.cls for name, spec in LOSSES.items()}
STATEFUL_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.stateful)


# --tau-* option -> (keyword of the loss class, type, help), read from the registry's classes.
LOSS_OPTIONS = loss_options()
# Keywords whose option value 0 means None (the feature switched off).
OFF_AT_ZERO = off_at_zero()
# Float options where inf means something (no upper bound, no clipping); every other --tau-*
# number must be finite.
INFINITY_ALLOWED = ("tau_max", "tau_grad_clip")
CHECKPOINT_KEYS = ("loss_state_dict", "loss_name", "loss_options")
# Flags of ours that are switches (False = not given).
SWITCHES = ("tau_fresh_state",)


class TrainingSetupError(ValueError):
    """A problem with the command line or the data found before training starts."""


class UpstreamDriftError(RuntimeError):
    """open_clip_train no longer calls a name that openclip_tau replaces (loss, save)."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def prints_errors() -> bool:
    """Whether this process prints setup errors: rank 0 of the launcher (torchrun, SLURM, MPI),
    or a process started alone. The other ranks find the same error and exit quietly with the
    same code, so a bad command line gives one line, not one per rank."""
    return world_info_from_env()[1] == 0


class _Parser(argparse.ArgumentParser):
    """``argparse`` parser whose usage and error lines are printed by rank 0 only."""

    def error(self, message: str) -> None:
        if not prints_errors():
            self.exit(2)
        super().error(message)

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:
        super().exit(status, message if prints_errors() else None)


def build_parser() -> argparse.ArgumentParser:
    """Parser of our options only; everything else goes to ``open_clip_train``'s parser."""
    parser = _Parser(
        prog="python -m openclip_tau.train",
        description="open_clip_train with temperature-aware losses. Options below are ours; "
        "every other option is open_clip_train.main's (listed after these).",
        allow_abbrev=False,  # never take a prefix of an upstream flag for ours
        add_help=False,
    )
    parser.add_argument(
        "--loss",
        required=True,
        choices=LOSS_CHOICES,
        help="clip and siglip: upstream's ClipLoss / SigLipLoss; sogclr, isogclr, dystress: "
        "openclip_tau's losses (sogclr and isogclr keep per-sample state).",
    )
    parser.add_argument(
        "--tau-num-samples",
        type=int,
        default=None,
        metavar="N",
        help=f"({', '.join(STATEFUL_LOSSES)}) per-sample table size. webdataset with integer "
        "keys: larger than every key (img2dataset keys are shard*10^4+position). Default: the "
        "number of "
        "keys in --tau-key-index, of csv rows, or --train-num-samples for synthetic data.",
    )
    parser.add_argument(
        "--tau-key-index",
        default=None,
        metavar="PATH",
        help=f"({', '.join(STATEFUL_LOSSES)}; webdataset) key-to-index map built once with "
        "python -m openclip_tau.key_index --shards <pattern> --output <file>.",
    )
    for dest, (kwarg, kind, text) in LOSS_OPTIONS.items():
        users = [n for n, cls in LOSS_CLASSES.items() if kwarg in _class_defaults(cls)]
        defaults = ", ".join(
            f"{n} {_shown(_class_defaults(LOSS_CLASSES[n])[kwarg])}" for n in users
        )
        parser.add_argument(
            _flag(dest),
            type=kind,
            default=None,
            metavar="N" if kind is int else "X",
            help=f"({', '.join(users)}) {text}. Default: {defaults}.",
        )
    parser.add_argument(
        "--tau-state",
        choices=STATE_LAYOUTS,
        default="replicated",
        help=f"({', '.join(STATEFUL_LOSSES)}) how the per-sample tables are stored across "
        "ranks: replicated (every rank holds every row; the default) or sharded (rank r holds "
        "rows i %% world_size == r: 1/world_size of the memory; needs torchrun). A run may be "
        "resumed with either layout and any number of processes.",
    )
    parser.add_argument(
        "--tau-fresh-state",
        action="store_true",
        help=f"({', '.join(STATEFUL_LOSSES)}) with --resume: start the loss state fresh: the "
        "per-sample tables and, for rgclg and tempnet, the temperature's parameters and their "
        "optimizer moments (the model, its optimizer state and the epoch are still resumed). "
        "Without it, resuming from a checkpoint that "
        "holds no loss state, or one trained with another key index or csv, is an error.",
    )
    parser.add_argument(
        "--add-model-config",
        action="append",
        default=[],
        metavar="PATH",
        help="Register a model config JSON file or folder with open_clip.add_model_config "
        "before training (repeatable), e.g. for a custom --model under torchrun.",
    )
    return parser


def _shown(default: Any) -> str:
    return "off" if default is None else str(default)


def _class_defaults(cls: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def parse_loss_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits ``argv`` into our options (checked) and the arguments for ``open_clip_train``."""
    parser = build_parser()
    repeated = _repeated_option(parser, argv)
    if repeated:
        _fail(parser, repeated)
    options, rest = parser.parse_known_args(list(argv))
    for dest in (*LOSS_OPTIONS, "tau_num_samples", "tau_key_index", *SWITCHES):
        value = getattr(options, dest)
        if value is None or value is False:
            continue
        if dest in LOSS_OPTIONS:
            allowed = [
                n
                for n, cls in LOSS_CLASSES.items()
                if LOSS_OPTIONS[dest][0] in _class_defaults(cls)
            ]
        else:
            allowed = list(STATEFUL_LOSSES)
        if options.loss not in allowed:
            _fail(
                parser,
                f"{_flag(dest)} applies to --loss {' or '.join(allowed)}, not --loss {options.loss}.",
            )
    if options.tau_num_samples is not None and options.tau_num_samples <= 0:
        _fail(
            parser, f"--tau-num-samples must be a positive integer, got {options.tau_num_samples}."
        )
    if options.tau_seed is not None and options.tau_seed < 0:
        _fail(parser, f"--tau-seed must be a non-negative integer, got {options.tau_seed}.")
    for dest, (_, kind, _) in LOSS_OPTIONS.items():
        value = getattr(options, dest)
        if kind is int or value is None or math.isfinite(value):
            continue
        if not (dest in INFINITY_ALLOWED and value == math.inf):
            _fail(parser, f"{_flag(dest)} must be a finite number, got {value}.")
    stray = [a for a in rest if a.startswith("--tau") or a == "--loss"]
    if stray:
        _fail(parser, f"unrecognized option {stray[0]}; options of openclip_tau start with --tau-.")
    if options.loss in LOSSES:
        # Every value the loss class checks (ranges, tau_min <= tau_max, ...) is checked now, by
        # the class itself, before the model and the data are built.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warnings come once, when the loss is built
                build_loss(options.loss, loss_kwargs(options), num_samples=1, dim=1)
        except ValueError as err:
            _fail(parser, with_flag_names(str(err)))
    return options, rest


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exits with code 2 and one line on stderr (no usage block, no traceback; rank 0 only)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _repeated_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    """The error for ``--loss`` given more than once (argparse would keep the last).

    A repeated ``--tau-*`` option keeps argparse's rule, the last one wins: scripts append
    overrides to a recipe's defaults (``recipes/cc3m/train.sh``).
    """
    given = []
    for i, token in enumerate(argv):
        flag, equals, value = token.partition("=")
        if flag == "--loss":
            given.append(value if equals else (argv[i + 1] if i + 1 < len(argv) else ""))
    if len(given) > 1:
        return f"--loss is given {len(given)} times ({', '.join(given)}); give it once."
    return None


def with_flag_names(message: str) -> str:
    """A loss class's error message with its keyword names written as our ``--tau-*`` flags."""
    names = sorted(
        ((kw, _flag(d)) for d, (kw, _, _) in LOSS_OPTIONS.items()), key=lambda x: -len(x[0])
    )
    for kwarg, flag in names:
        message = re.sub(rf"(?<![-\w]){re.escape(kwarg)}\b", flag, message)
    return message


def build_loss(
    name: str,
    kwargs: dict[str, Any],
    num_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    distributed: Optional[dict[str, Any]] = None,
    dim: Optional[int] = None,
    state_layout: str = "replicated",
) -> nn.Module:
    """The loss of ``--loss name`` (an entry of :data:`LOSSES`) with the given keywords.

    ``distributed`` (``local_loss``, ``gather_with_grad``) is passed only to classes whose
    constructor takes those keywords; ``dim`` (the model's ``embed_dim``) only to those that take
    ``dim`` (TempNet); ``state_layout`` (``replicated`` or ``sharded``) to the stateful ones.
    """
    spec = LOSSES[name]
    kw = dict(kwargs, rank=rank, world_size=world_size)
    if spec.stateful:
        kw["num_samples"] = num_samples
        kw["state_layout"] = state_layout
    accepted = inspect.signature(spec.cls.__init__).parameters
    if "dim" in accepted:
        kw["dim"] = dim
    kw.update({k: v for k, v in (distributed or {}).items() if k in accepted})
    return spec.cls(**kw)


def loss_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the loss class from the ``--tau-*`` options that were given.

    ``--tau-lr-drop-below 0`` (or ``none``) becomes ``lr_tau_drop_below=None``.
    """
    return {
        kwarg: None if kwarg in OFF_AT_ZERO and value == 0 else value
        for dest, (kwarg, _, _) in LOSS_OPTIONS.items()
        if (value := getattr(options, dest, None)) is not None
    }


def _train_data_kind(args: argparse.Namespace) -> Optional[str]:
    """``webdataset``, ``csv`` or ``synthetic`` (resolving ``--dataset-type auto``), or None."""
    if args.dataset_type == "synthetic":
        return "synthetic"
    if not args.train_data:
        return None
    build = upstream_data.get_dataset_fn(args.train_data, args.dataset_type)
    return {
        upstream_data.get_wds_dataset: "webdataset",
        upstream_data.get_csv_dataset: "csv",
    }.get(build)


class _Overlay:
    """Stands in for a module: the given attributes replace its own, the rest pass through."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def distributed_data_parallel(
    module: nn.Module, device_ids: Optional[Sequence[Any]] = None, **kwargs: Any
) -> nn.Module:
    """DDP as upstream builds it, except that CPU devices give ``device_ids=None`` (CPU + gloo)."""
    if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
        device_ids = None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **kwargs)


class IndexedLoss(nn.Module):
    """Calls our loss the way ``open_clip_train`` calls its losses, adding the batch's indices.

    ``train_one_epoch`` calls ``loss(**model_out, output_dict=True)``; the indices come from the
    run's queue, filled by the data loader (see the module docstring for ``--accum-freq``).
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


def zero_shot_accuracy(output: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """``open_clip_train.zero_shot.accuracy`` that works with NumPy 2.

    Upstream (3.3.0) converts a 1-element array with ``float()``, which NumPy >= 2.3 refuses
    ("only 0-dimensional arrays can be converted"), so ``--imagenet-val`` crashed at the first
    evaluation batch. Same result: the number of samples whose target is among the top-k logits.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) for k in topk]


class LossTraining:
    """One training run: our options, the loss, the index queue, and upstream's patched names."""

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

    # -------------------------------------------------------------- installed names
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Replaces the names ``open_clip_train.main`` bound at import, for this run only."""
        torch_overlay = _Overlay(
            torch,
            save=self.save,
            nn=_Overlay(
                torch.nn,
                parallel=_Overlay(
                    torch.nn.parallel, DistributedDataParallel=distributed_data_parallel
                ),
            ),
        )
        self._create_model = upstream_main.create_model_and_transforms
        with (
            patched(
                upstream_main,
                parse_args=self.parse_args,
                create_model_and_transforms=self.create_model_and_transforms,
                get_data=self.get_data,
                create_loss=self.create_loss,
                train_one_epoch=self.train_one_epoch,
                pt_load=self.pt_load,
                setup_logging=setup_logging,
                torch=torch_overlay,
            ),
            patched(upstream_data, tarfile_to_samples_nothrow=tarfile_to_samples_nothrow),
            patched(upstream_zero_shot, accuracy=zero_shot_accuracy),
        ):
            yield

    def parse_args(self, argv: Sequence[str]) -> argparse.Namespace:
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

    def _check(self, args: argparse.Namespace) -> None:
        if args.siglip and self.loss_name != "siglip":
            raise TrainingSetupError(
                f"--siglip selects upstream's SigLIP loss: use --loss siglip, not --loss {self.loss_name} with --siglip."
            )
        if self.state_layout != "replicated" and not self.stateful:
            raise TrainingSetupError(
                f"--tau-state applies to {', '.join(STATEFUL_LOSSES)} (the losses with "
                f"per-sample state), not --loss {self.loss_name}."
            )
        if self.state_layout == "sharded" and not is_using_distributed():
            raise TrainingSetupError(
                "--tau-state sharded splits the tables over the ranks of torchrun; this run has "
                "one process: use --tau-state replicated."
            )
        if not self.ours:
            return
        name = f"--loss {self.loss_name}"
        if self.trains_temperature and args.accum_freq > 1:
            raise TrainingSetupError(
                f"{name} with --accum-freq {args.accum_freq}: open_clip_train calls the loss "
                f"{args.accum_freq} times per step, each on all of the step's features, so the "
                f"temperature's gradient would be counted {args.accum_freq} times. Use "
                "--accum-freq 1 (a larger --batch-size, or more processes)."
            )
        if args.distill_model or args.distill_pretrained:
            raise TrainingSetupError(f"{name} does not support distillation (--distill-model).")
        if "coca" in args.model.lower():
            raise TrainingSetupError(f"{name} trains CLIP-style models, not CoCa ({args.model}).")
        if args.horovod:
            raise TrainingSetupError(f"{name} needs torch.distributed (torchrun), not --horovod.")
        if args.local_loss and not args.gather_with_grad:
            raise TrainingSetupError(
                f"--local-loss without --gather-with-grad drops the other ranks' gradient in "
                f"upstream's ClipLoss; {name} always computes local anchors against all gathered "
                "candidates with the gradient through the gather (as --local-loss "
                "--gather-with-grad): pass both flags or neither."
            )
        if args.loss_dist_impl is not None:
            raise TrainingSetupError(
                f"--loss-dist-impl {args.loss_dist_impl} selects upstream's SigLIP exchange; "
                f"{name} has one distributed implementation (all-gather with gradient): leave "
                "--loss-dist-impl out."
            )
        if self.spec.trains_temperature and getattr(args, "opt", "adamw").startswith("timm/"):
            raise TrainingSetupError(
                f"{name} adds its temperature group to open_clip_train's AdamW (--opt adamw); "
                f"--opt {args.opt} is not supported with it."
            )
        if self.options.tau_fresh_state and not args.resume:
            raise TrainingSetupError("--tau-fresh-state applies to a --resume run only.")
        if not self.stateful:
            return
        kind = _train_data_kind(args)
        if kind is None and args.train_data:
            raise TrainingSetupError(
                f"{name} supports --dataset-type webdataset, csv and synthetic; got "
                f"--dataset-type {args.dataset_type} for {args.train_data}."
            )
        if self.options.tau_key_index and kind != "webdataset":
            raise TrainingSetupError(
                f"--tau-key-index maps webdataset keys; the training data is {kind} "
                "(its index is the row number)."
            )
        if kind == "webdataset" and not (
            self.options.tau_num_samples or self.options.tau_key_index
        ):
            raise TrainingSetupError(
                f"{name} keeps per-sample state and needs the table size for webdataset: pass "
                "--tau-key-index <file> (built once with python -m openclip_tau.key_index "
                "--shards <pattern> --output <file>) or, for integer keys, --tau-num-samples N "
                "larger than every key."
            )

    # -------------------------------------------------------------- data
    def get_data(
        self, args: argparse.Namespace, preprocess_fns: Any, epoch: int = 0, tokenizer: Any = None
    ) -> dict[str, Any]:
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
        kind = _train_data_kind(args)
        if kind in ("csv", "synthetic") and info.dataloader.num_samples != self.data_rows:
            raise UpstreamDriftError(
                f"open_clip_train built a training set of {info.dataloader.num_samples} "
                f"samples from {args.train_data}, where openclip_tau counted {self.data_rows}."
            )
        return SampleIndexer(self.num_samples, self.key_index)

    # -------------------------------------------------------------- inputs, before the model
    def create_model_and_transforms(self, *args: Any, **kwargs: Any) -> Any:
        """``open_clip.create_model_and_transforms`` for ``open_clip_train.main``, after
        :meth:`check_inputs` (once): bad inputs are refused before the model is built."""
        if not self.inputs_checked:
            self.check_inputs(self.args)
        return self._create_model(*args, **kwargs)

    def check_inputs(self, args: argparse.Namespace) -> None:
        """Refusals that read files: the checkpoint given to ``--resume`` (missing, or not
        resumable with this run's loss, table or sample-to-row map), the key index (missing,
        malformed, or without a training shard), the csv (``--tau-num-samples`` below its rows).

        Called on every rank after ``--resume latest`` is resolved, before the model is built;
        every rank reads the same files, so every rank raises the same error.
        """
        self.inputs_checked = True
        resume = args.resume
        if resume and "://" not in resume and not os.path.isfile(resume):
            raise TrainingSetupError(f"--resume {resume}: no such file.")
        if self.stateful and (args.train_data or args.dataset_type == "synthetic"):
            self.plan_table(args)
        if resume and "://" not in resume:
            entries = read_loss_entries(resume)
            if entries is not None:
                self._check_resumable(resume, entries)

    def plan_table(self, args: argparse.Namespace) -> None:
        """Table size, sample-to-row map and its fingerprint, from the data's files."""
        kind = _train_data_kind(args)
        requested = self.options.tau_num_samples
        self.data_rows = None
        if kind == "csv":
            rows = self.data_rows = csv_rows(args)
            what = "rows of the csv"
            self.index_source = f"the row number ({rows} {what})"
            self.index_fingerprint = f"csv sha256:{_file_sha256(args.train_data)}"
        elif kind == "synthetic":
            if not args.train_num_samples:
                raise TrainingSetupError(
                    "--dataset-type synthetic needs --train-num-samples (the table size)."
                )
            rows = self.data_rows = args.train_num_samples
            what = "synthetic samples"
            self.index_source = f"the row number ({rows} {what})"
            self.index_fingerprint = f"synthetic {rows}"
        elif self.options.tau_key_index:
            self.key_index = key_index = read_key_index(self.options.tau_key_index)
            unmapped = [
                url
                for url in expand_shards(args.train_data)
                if shard_name(url) not in key_index.shards
            ]
            if unmapped:
                raise TrainingSetupError(
                    f"{len(unmapped)} training shard(s) are not in the key index "
                    f"{key_index.path}, e.g. {unmapped[0]}; rebuild it over the training shards "
                    "with python -m openclip_tau.key_index."
                )
            rows = len(key_index)
            what = "keys in the key index"
            self.index_source = f"the key index {key_index.path} ({rows} keys)"
            self.index_fingerprint = f"key index {key_index.fingerprint()}"
        else:
            rows = requested
            what = "--tau-num-samples"
            self.index_source = "the integer sample keys"
            self.index_fingerprint = "integer keys"
        if requested is not None and requested < rows:
            raise TrainingSetupError(
                f"--tau-num-samples {requested} is smaller than the {rows} {what}; omit it or "
                f"pass at least {rows}."
            )
        if requested is not None and requested > rows:
            self._log_master(
                f"openclip_tau: --tau-num-samples {requested} is larger than the {rows} {what}: "
                f"{requested - rows} rows of the per-sample table are never used.",
                logging.WARNING,
            )
        self.num_samples = requested or rows

    # -------------------------------------------------------------- loss
    def create_loss(self, args: argparse.Namespace) -> nn.Module:
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
                    f"{' '.join(_flag(f) for f in given) or 'neither flag'} given). The model's "
                    f"logit_scale is set to {self.spec.temperature_rule}."
                )
                self._warn_small_batch(args)
        self._restore_loss_state()
        return result

    def _warn_small_batch(self, args: argparse.Namespace) -> None:
        """iSogCLR: the KL radius must stay below log(B - 1) of the global batch B."""
        state = getattr(self.loss, "state", None)
        learns = state is not None and any(n.startswith("tau_") for n in state.names)
        rho = self.option("rho")
        if not learns or rho is None or rho <= 0:
            return
        batch = args.batch_size * args.world_size * args.accum_freq
        limit = math.log(max(batch - 1, 1))
        if rho >= limit:
            logging.warning(
                f"openclip_tau: --tau-rho {rho:g} is not below log(B - 1) = {limit:.2f} for the "
                f"global batch B = {batch}: no temperature can reach it, so every per-sample "
                "temperature is driven to --tau-min. The published settings assume B >= 512; "
                f"for this batch use --tau-rho below {limit:.2f} (e.g. {0.5 * limit:.2f}) and a "
                "smaller --tau-eta."
            )

    def pt_load(self, file_path: str, map_location: Any = None) -> Any:
        checkpoint = upstream_file_utils.pt_load(file_path, map_location=map_location)
        if isinstance(checkpoint, dict) and "epoch" in checkpoint:
            self.resumed = {
                k: checkpoint[k] for k in ("epoch", *CHECKPOINT_KEYS) if k in checkpoint
            }
            self.resumed_path = str(file_path)
            saved = checkpoint.get("optimizer")
            if isinstance(saved, dict) and temperature_groups(saved):
                # open_clip_train loads the optimizer before create_loss, into an optimizer of
                # the model's groups only: it gets the state without the temperature group; the
                # whole state is loaded once that group is added (attach_optimizer).
                self.resumed["optimizer"] = saved
                checkpoint = {**checkpoint, "optimizer": without_temperature_groups(saved)}
        return checkpoint

    def _restore_loss_state(self) -> None:
        if self.resumed is None:
            return
        resumed, self.resumed = self.resumed, None  # release the tables once done
        path = self.resumed_path
        fresh = self.options.tau_fresh_state
        self._check_resumable(path, resumed)
        if not self.stateful:
            return
        if resumed.get("loss_name") is None or "loss_state_dict" not in resumed:
            self._log_master(f"openclip_tau: {path} holds no loss state; starting it fresh.")
            return
        options = resumed.get("loss_options", {})
        before = options.get("index")
        if fresh:
            self._log_master(
                f"openclip_tau: --tau-fresh-state: the {self.loss_name} loss state of {path} "
                "is not restored; it starts fresh."
            )
            return
        shards = options.get("state_shards")
        try:
            if shards is None:
                self.loss.load_state_dict(resumed["loss_state_dict"])
            else:
                # The tables are in a folder of shards beside the checkpoint (saved by every
                # rank); the checkpoint holds the rest (epoch, temperature parameters).
                loaded = self.loss.load_state_dict(resumed["loss_state_dict"], strict=False)
                stray = [k for k in loaded.missing_keys if not k.startswith("state.")]
                if stray or loaded.unexpected_keys:
                    raise ValueError(
                        f"missing keys {stray}, unexpected keys {loaded.unexpected_keys}"
                    )
                folder = os.path.join(os.path.dirname(os.path.abspath(path)), shards)
                load_state_shards(self.loss, folder)
        except (ValueError, RuntimeError, OSError) as err:
            raise TrainingSetupError(f"Cannot restore the loss state from {path}: {err}") from err
        self.optimizer_state = resumed.get("optimizer")
        if options.get("kwargs", {}) != self.loss_kwargs:
            self._log_master(
                f"Resuming with loss options {self.loss_kwargs}; {path} used "
                f"{options.get('kwargs', {})}.",
                logging.WARNING,
            )
        if before is None:
            self._log_master(
                f"{path} records no sample-to-row fingerprint (older checkpoint); the map "
                "could not be checked.",
                logging.WARNING,
            )
        self._log_master(f"openclip_tau: restored the {self.loss_name} loss state from {path}.")

    def _check_resumable(self, path: str, resumed: dict[str, Any]) -> None:
        """Refuses a checkpoint trained with another loss, or (unless ``--tau-fresh-state``)
        one without loss state, with another table size or another sample-to-row map."""
        fresh = self.options.tau_fresh_state
        saved = resumed.get("loss_name")
        if saved is not None and saved != self.loss_name:
            raise TrainingSetupError(
                f"{path} was trained with --loss {saved}; resume it with --loss {saved}, not "
                f"--loss {self.loss_name}."
            )
        if not self.stateful or fresh:
            return
        if saved is None or "loss_state_dict" not in resumed:
            raise TrainingSetupError(
                f"{path} holds no loss state (written by open_clip_train itself, or by "
                f"another tool): resuming --loss {self.loss_name} from it would start the "
                "per-sample state fresh. Pass --tau-fresh-state to do that."
            )
        options = resumed.get("loss_options", {})
        before = options.get("index")
        if before is not None and before != self.index_fingerprint:
            raise TrainingSetupError(
                f"{path} was trained with another sample-to-row map ({before}); this run uses "
                f"{self.index_fingerprint} ({self.index_source}), so the saved state would "
                "belong to other samples. Resume with the key index (or csv) it was trained "
                "with, or pass --tau-fresh-state to start the per-sample state fresh."
            )
        rows = options.get("num_samples")
        if rows is not None and self.num_samples is not None and rows != self.num_samples:
            raise TrainingSetupError(
                f"{path} holds a per-sample table of {rows} rows; this run's has "
                f"{self.num_samples} (num_samples={self.num_samples}, from {self.index_source}). "
                f"Resume with --tau-num-samples {rows}, or pass --tau-fresh-state to start the "
                "per-sample state fresh."
            )

    def class_kwargs(self) -> dict[str, Any]:
        """Every keyword of the loss's constructor as this run built it (no rank/world/table)."""
        kwargs = dict(_class_defaults(self.spec.cls), **self.loss_kwargs)
        if "dim" in kwargs:
            kwargs["dim"] = self.embed_dim
        for name in ("rank", "world_size", "num_samples", "state_layout"):
            kwargs.pop(name, None)
        return kwargs

    def sharded(self) -> bool:
        """Whether the loss's per-sample state is split over the ranks (``--tau-state sharded``)."""
        return isinstance(getattr(self.loss, "state", None), ShardedPerSampleState)

    def option(self, kwarg: str) -> Any:
        """The loss's keyword ``kwarg`` as given (``--tau-*``) or the class default (or None)."""
        if kwarg in self.loss_kwargs:
            return self.loss_kwargs[kwarg]
        return _class_defaults(self.spec.cls).get(kwarg) if self.ours else None

    def _log_master(self, message: str, level: int = logging.INFO) -> None:
        if self.args is None or is_master(self.args):
            logging.log(level, message)

    def save(self, obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.save`` for ``open_clip_train.main``: training checkpoints get the loss state."""
        if isinstance(obj, dict) and {"epoch", "state_dict", "optimizer"} <= obj.keys():
            obj = {**obj, **self.checkpoint_entries(obj["epoch"])}
            if isinstance(f, (str, os.PathLike)):
                self.saved_paths.add(os.path.abspath(f))
        return torch.save(obj, f, *args, **kwargs)

    def checkpoint_entries(self, completed_epoch: Optional[int] = None) -> dict[str, Any]:
        """``loss_name``, ``loss_options`` and ``loss_state_dict`` of a checkpoint.

        ``loss_options["class_kwargs"]`` holds every keyword the loss was built with (defaults
        included, e.g. TempNet's temperature range and ``dim``), so the loss can be rebuilt
        from the checkpoint alone. With ``--tau-state sharded`` the tables are not in
        ``loss_state_dict`` (rank 0 holds only its rows): every rank wrote its rows into the
        folder ``loss_options["state_shards"]``, a name relative to the checkpoint's folder.
        """
        options: dict[str, Any] = {
            "kwargs": dict(self.loss_kwargs),
            "num_samples": self.num_samples,
            "key_index": self.options.tau_key_index,
            "index": self.index_fingerprint,
            "logit_scale": self.spec.temperature_rule if self.ours else None,
        }
        state: dict[str, Any] = {}
        if self.loss is not None:
            state = self.loss.state_dict()
        if self.ours:
            options["class"] = self.spec.cls.__name__
            options["class_kwargs"] = self.class_kwargs()
            options["state_layout"] = self.state_layout if self.stateful else None
        if self.sharded() and completed_epoch is not None:
            state = {k: v for k, v in state.items() if not k.startswith("state.")}
            options["state_shards"] = shard_folder_name(completed_epoch)
        return {
            "loss_name": self.loss_name,
            "loss_options": options,
            "loss_state_dict": state,
        }

    def verify_checkpoints(self, completed_epoch: int) -> None:
        """Raises if a checkpoint upstream wrote for ``completed_epoch`` lacks our entries."""
        args = self.args
        if not args.save_logs:
            return
        expected = []
        if completed_epoch == args.epochs or (
            args.save_frequency > 0 and completed_epoch % args.save_frequency == 0
        ):
            expected.append(os.path.join(args.checkpoint_path, f"epoch_{completed_epoch}.pt"))
        if args.save_most_recent:
            expected.append(os.path.join(args.checkpoint_path, "tmp.pt"))  # then renamed
        missing = [p for p in expected if os.path.abspath(p) not in self.saved_paths]
        if missing:
            raise UpstreamDriftError(
                f"open_clip_train wrote {missing[0]} without openclip_tau's loss entries (it no "
                "longer saves through the torch name of open_clip_train.main): the checkpoint "
                "cannot be resumed exactly. This open_clip_train version is not supported."
            )
        self.saved_paths.clear()

    # -------------------------------------------------------------- epochs and steps
    def on_batch(self, index: Tensor) -> None:
        """Called by the data loader with the table indices of each batch it yields."""
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
        if self.ours:
            self.check_loss_was_called()
            stats = self.table_stats()
            self.write_logit_scale(model)  # validation and the checkpoint get it unclamped
            if stats and is_master(args):
                self.log_stats(stats, self.steps_per_epoch * (epoch + 1) - 1, "Table stats")
        if tb_writer is not None:
            tb_writer.flush()  # upstream never closes its writer; make each epoch's scalars land
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
        self.last_completed = epoch + 1
        if self.sharded() and self.will_checkpoint(epoch + 1):
            # Every rank writes its rows (a collective); upstream's checkpoint, written by the
            # master after this returns, names the folder.
            folder = os.path.join(args.checkpoint_path, shard_folder_name(epoch + 1))
            save_state_shards(self.loss, folder)
            self.shard_folders[epoch + 1] = folder

    def will_checkpoint(self, completed_epoch: int) -> bool:
        """Whether upstream writes a checkpoint after ``completed_epoch`` (on the master)."""
        args = self.args
        if not args.logs or args.logs.lower() == "none":
            return False
        return (
            completed_epoch == args.epochs
            or (args.save_frequency > 0 and completed_epoch % args.save_frequency == 0)
            or bool(args.save_most_recent)
        )

    def remove_unreferenced_shards(self, args: argparse.Namespace) -> None:
        """Master: removes shard folders of this run's earlier epochs that no checkpoint names.

        Called once upstream's checkpoints of the last epoch are complete: ``epoch_latest.pt``
        names the newest folder, and ``epoch_K.pt`` (unless upstream's
        ``--delete-previous-checkpoint`` removed it) names folder K.
        """
        if not is_master(args):
            return
        for epoch, folder in sorted(self.shard_folders.items()):
            if epoch >= (self.last_completed or 0):
                continue
            if not os.path.exists(os.path.join(args.checkpoint_path, f"epoch_{epoch}.pt")):
                shutil.rmtree(folder, ignore_errors=True)
            del self.shard_folders[epoch]

    def attach_optimizer(self, optimizer: Any) -> None:
        """Adds the loss's temperature group to upstream's optimizer (once) and its hooks.

        open_clip_train builds the optimizer before the loss; its first ``train_one_epoch``
        hands it over. The group (``loss.param_groups()``) is appended after the model's groups,
        ``register_optimizer`` keeps its own learning rate schedule (the model's scheduler sets
        every group's lr; the pre-step hook sets this one's again) and the temperature's bounds.
        On ``--resume`` the saved optimizer state, temperature group included, is loaded now.
        """
        if optimizer is self.optimizer:
            return
        if self.optimizer is not None:
            raise UpstreamDriftError(
                "open_clip_train passed another optimizer to train_one_epoch than in the first "
                f"epoch: --loss {self.loss_name}'s temperature group is in the first one. This "
                "open_clip_train version is not supported."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TrainingSetupError(
                f"--loss {self.loss_name} needs a torch optimizer for its temperature group; "
                f"open_clip_train built a {type(optimizer).__name__}."
            )
        for group in self.loss.param_groups():
            optimizer.add_param_group(group)
        self.optimizer = optimizer
        saved, self.optimizer_state = self.optimizer_state, None
        if saved is not None:
            try:
                optimizer.load_state_dict(saved)
            except (ValueError, KeyError) as err:
                raise TrainingSetupError(
                    f"Cannot restore the optimizer state of --loss {self.loss_name}'s "
                    f"temperature group from {self.resumed_path}: {err}"
                ) from err
            self._log_master(
                f"openclip_tau: restored the optimizer state of the temperature group from "
                f"{self.resumed_path}."
            )
        # After the load: load_state_dict replaces the group dicts, and the hooks hold the
        # groups they were registered with.
        self.loss.register_optimizer(optimizer)

    def check_loss_was_called(self) -> None:
        """Raises unless upstream's loop called our loss once per batch it drew (with indices)."""
        if self.stateful:
            accum = self.args.accum_freq
            used = self.batches_seen - len(self.pending)  # a last incomplete group is dropped
            if (
                self.batches_seen == 0
                or len(self.pending) >= accum
                or used != self.step_in_epoch * accum
            ):
                raise UpstreamDriftError(
                    f"In epoch {self.epoch} open_clip_train drew {self.batches_seen} batches but "
                    f"called --loss {self.loss_name} with the indices of "
                    f"{self.step_in_epoch * self.args.accum_freq}: its loop no longer calls the "
                    "loss made by create_loss once per batch. This open_clip_train version is "
                    "not supported."
                )
        elif self.step_in_epoch == 0:
            raise UpstreamDriftError(
                f"In epoch {self.epoch} open_clip_train never called --loss {self.loss_name}: its "
                "loop no longer uses the loss made by create_loss."
            )

    def write_logit_scale(self, model: nn.Module) -> None:
        """Writes ln(1/tau) of the loss's summary temperature into the model's ``logit_scale``."""
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
        """Mean of the batch statistic ``name`` over this epoch's steps so far (or ``default``)."""
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

    def next_call(self) -> tuple[Optional[Tensor], bool]:
        """The indices for this loss call, and whether it is the last call of its step."""
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

    def step_stats(self) -> dict[str, Tensor]:
        """The loss's statistics of this step; RGCL-g's global temperature also as ``tau``."""
        stats = dict(self.loss.stats)
        if self.spec.logit_scale is not None:
            stats["tau"] = torch.exp(-self.spec.logit_scale(self).float())
        return stats

    def end_step(self, stats: dict[str, Tensor]) -> None:
        """After the last loss call of an optimizer step: reset the queue, log statistics."""
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

    def log_stats(self, stats: dict[str, Tensor], step: int, title: str = "Loss stats") -> None:
        """Statistics to OpenCLIP's console, TensorBoard and wandb (as ``train/<name>``).

        Batch temperatures are named ``batch_tau_*``, whole-table ones ``table_tau_*``.
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
    ``torch.quantile``, which refuses more than 2^24 values; tables can be larger)."""
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
    """Two checksums per state tensor (sum, position-weighted sum), computed on its device."""
    checksums = []
    for name, table in loss.state_dict().items():
        if isinstance(table, Tensor) and table.is_floating_point():
            t = torch.where(torch.isfinite(table), table, torch.full_like(table, -1e4)).double()
            weights = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
            both = torch.stack([t.sum(), (t.flatten() * weights / t.numel()).sum()]).tolist()
            checksums.append((name, round(both[0], 6), round(both[1], 6)))
    return checksums


TEMPERATURE_GROUP = "temperature"  # the "name" of a loss's group in ``param_groups()``
# Sharded table statistics: at most this many visited rows per rank and table are gathered.
SHARD_SAMPLE_ROWS = 1 << 20


def temperature_groups(optimizer_state: dict[str, Any]) -> list[int]:
    """Positions of the loss's temperature groups in a saved optimizer ``state_dict``."""
    return [
        i
        for i, group in enumerate(optimizer_state.get("param_groups", []))
        if isinstance(group, dict) and group.get("name") == TEMPERATURE_GROUP
    ]


def without_temperature_groups(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer ``state_dict`` without the temperature groups and their moments.

    ``Optimizer.load_state_dict`` pairs the saved parameters with the optimizer's in group
    order, so the model's groups load into an optimizer that does not hold the loss's group yet.
    """
    drop = set(temperature_groups(optimizer_state))
    groups = optimizer_state["param_groups"]
    dropped = {p for i in drop for p in groups[i]["params"]}
    return {
        **optimizer_state,
        "state": {k: v for k, v in optimizer_state["state"].items() if k not in dropped},
        "param_groups": [g for i, g in enumerate(groups) if i not in drop],
    }


def model_embed_dim(model: str, loss_name: str) -> int:
    """``embed_dim`` of an OpenCLIP model config (the dimension of the features the loss gets)."""
    try:
        config = open_clip.get_model_config(model)
    except Exception as err:  # noqa: BLE001 - hf-hub lookups raise several kinds
        config, reason = None, str(err)
    else:
        reason = "no such model config"
    if not config or not isinstance(config.get("embed_dim"), int):
        raise TrainingSetupError(
            f"--loss {loss_name} builds temperature networks of the model's embed_dim, and the "
            f"config of --model {model} gives none ({reason}); register the model's JSON "
            "config with --add-model-config."
        )
    return int(config["embed_dim"])


def shard_folder_name(completed_epoch: int) -> str:
    """``epoch_K.tau_state``: the per-sample state shards of checkpoint ``epoch_K.pt``."""
    return f"epoch_{completed_epoch}.tau_state"


def sharded_sample(values: Tensor, seed: int, limit: int = SHARD_SAMPLE_ROWS) -> Tensor:
    """Every rank's ``values`` gathered (a collective): all of them when a rank holds at most
    ``limit``, else a uniform sample of ``limit`` of its values (seeded by ``seed`` and the rank),
    so the table statistics of a LAION-size sharded state never gather whole tables. The
    quantiles of the union are exact for tables of up to ``limit`` visited rows per rank.
    """
    if values.numel() > limit:
        rank = torch.distributed.get_rank()
        generator = torch.Generator().manual_seed(derive_seed("table-sample", seed, rank))
        pick = torch.randperm(values.numel(), generator=generator)[:limit]
        values = values[pick.to(values.device)]
    return torch.cat(all_gather_variable(values.contiguous()))


def read_loss_entries(path: str) -> Optional[dict[str, Any]]:
    """``epoch`` and the loss entries of a training checkpoint, read before the model is built
    (memory-mapped: the weights are not read), or None for a bare model checkpoint."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not the zip format: no memory map
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds
        raise TrainingSetupError(f"--resume {path} cannot be read: {err}") from None
    if not isinstance(checkpoint, dict) or "epoch" not in checkpoint:
        return None
    return {k: checkpoint[k] for k in ("epoch", *CHECKPOINT_KEYS) if k in checkpoint}


def read_key_index(path: str) -> KeyIndex:
    """:func:`load_key_index` with its errors as one-line setup errors naming the option."""
    try:
        return load_key_index(path)
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--tau-key-index {path}: {err}") from None


def csv_rows(args: argparse.Namespace) -> int:
    """The number of rows upstream's ``CsvDataset`` reads from ``--train-data``."""
    import pandas as pd

    try:
        frame = pd.read_csv(args.train_data, sep=args.csv_separator, usecols=[args.csv_img_key])
    except (OSError, ValueError) as err:
        raise TrainingSetupError(f"--train-data {args.train_data}: {err}") from None
    return len(frame)


# Loggers that follow --debug / INFO as upstream sets them; every other library's keep their level.
OWN_LOGGERS = ("open_clip", "openclip_tau", "tau_core", "lightly_tau")


def setup_logging(log_file: Optional[str], level: int, include_host: bool = False) -> None:
    """Upstream's logging set-up, except that it no longer lowers other libraries' loggers.

    Upstream sets every logger that exists to ``level`` (INFO), so torch's internal loggers
    printed their INFO lines (``TorchDynamo compilation metrics``, ``FakeTensor cache stats``
    at exit) after every run; they get their own levels back.
    """
    levels = {  # a placeholder (a parent not yet made) becomes a logger: NOTSET
        name: getattr(logger, "level", logging.NOTSET)
        for name, logger in logging.root.manager.loggerDict.items()
        if not name.startswith(OWN_LOGGERS)
    }
    upstream_logger.setup_logging(log_file, level, include_host)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Runs ``open_clip_train.main.main`` with the chosen loss; returns what it returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m openclip_tau.train -- <args>
        argv = argv[1:]
    if "-h" in argv or "--help" in argv:
        print(build_parser().format_help())
        print("\nopen_clip_train.main options:\n")
        upstream_params.parse_args(["--help"])
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


def cli() -> None:
    """Console entry: setup errors and sample keys outside the table are one line, exit code 2.

    Under torchrun every rank finds a setup error and exits with 2; rank 0 prints it. A sample
    key outside the table is seen by the rank whose data holds it: that rank prints it.
    """
    try:
        code = main()
    except TrainingSetupError as err:
        if prints_errors():
            print(f"openclip_tau.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SampleKeyError as err:
        _, rank, world_size = world_info_from_env()
        where = f" (rank {rank})" if world_size > 1 else ""
        print(f"openclip_tau.train: error{where}: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


if __name__ == "__main__":
    cli()

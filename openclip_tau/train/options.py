"""Our options (``--loss``, ``--tau-*``, ``--add-model-config``), derived from the loss registry
(:mod:`openclip_tau.registry`): the parser that takes them out of the command line before
upstream's parser sees it, their checks, and the loss built from them.

The parser is built from :func:`tau_core.registry_source.loss_classes`: the registry's classes
when it is loaded, else their signatures read from the source, so that ``--help`` answers
without importing torch; the registry itself is imported when a loss is built."""

from __future__ import annotations

import argparse
import inspect
import math
import re
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

from openclip_tau.flags import loss_options, off_at_zero, option_flag
from openclip_tau.train.errors import prints_errors
from tau_core.options import STATE_LAYOUTS, takes_index
from tau_core.registry_source import constant, loss_classes

if TYPE_CHECKING:
    from torch import nn

_REGISTRY = "openclip_tau"
_CLASSES = loss_classes(_REGISTRY)  # read once, as the module's tables are
LOSS_CHOICES = (*constant(_REGISTRY, "UPSTREAM_LOSSES"), *_CLASSES)
"""The values of ``--loss``: upstream's two losses, then every entry of the registry."""
STATEFUL_LOSSES = tuple(n for n, cls in _CLASSES.items() if takes_index(cls))
"""The ``--loss`` names whose class keeps per-sample state (takes ``num_samples``)."""


LOSS_OPTIONS = loss_options(_CLASSES)
"""``--tau-*`` option (its ``dest``) to (keyword of the loss class, type, help text), read from
the registry's classes."""
OFF_AT_ZERO = off_at_zero(LOSS_OPTIONS)
"""Keywords whose option value 0 means None (the feature switched off)."""
INFINITY_ALLOWED = ("tau_max", "tau_grad_clip")
"""Float options where inf means something (no upper bound, no clipping); every other
``--tau-*`` number must be finite."""
SWITCHES = ("tau_fresh_state",)
"""Options of ours that are switches (False: not given)."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` parser whose usage and error lines are printed by rank 0 only."""

    def error(self, message: str) -> None:
        if not prints_errors():
            self.exit(2)
        super().error(message)

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:
        super().exit(status, message if prints_errors() else None)


def build_parser() -> argparse.ArgumentParser:
    """Parser of our options only; everything else goes to ``open_clip_train``'s parser.

    ``--loss`` (required), ``--tau-num-samples``, ``--tau-key-index``, one ``--tau-*`` option
    per keyword of :data:`LOSS_OPTIONS` (its help text names the losses that take it and their
    defaults), ``--tau-state``, ``--tau-fresh-state`` and ``--add-model-config``. Prefix
    matching is off, so an abbreviation of an upstream flag is never taken for ours; its usage
    and error lines are printed by rank 0 only.

    Returns:
        The parser, without ``--help`` (``main`` prints ours and upstream's together).
    """
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
        help=f"clip and siglip: upstream's ClipLoss / SigLipLoss; {', '.join(_CLASSES)}: "
        f"openclip_tau's losses ({', '.join(STATEFUL_LOSSES)} keep per-sample state).",
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
        users = _option_users(kwarg)
        defaults = ", ".join(f"{n} {_shown(class_defaults(_CLASSES[n])[kwarg])}" for n in users)
        parser.add_argument(
            option_flag(dest),
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


def _option_users(keyword: str) -> list[str]:
    """The registry's losses whose constructor takes hyperparameter ``keyword``."""
    return [n for n, cls in _CLASSES.items() if keyword in class_defaults(cls)]


def class_defaults(cls: type) -> dict[str, Any]:
    """The keywords of ``cls``'s constructor that have a default, with their defaults."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def parse_loss_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits ``argv`` into our options (checked) and the arguments for ``open_clip_train``.

    Checked here, before anything is built: ``--loss`` given once; each ``--tau-*`` option
    given only with a loss that takes it; ``--tau-num-samples`` > 0, ``--tau-seed`` >= 0;
    ``--tau-*`` numbers finite (except those of :data:`INFINITY_ALLOWED`); no stray ``--tau``
    flag; and every value the loss class checks (its ranges, ``tau_min <= tau_max``, ...), by
    building the loss once on a one-row table, its error written with our flag names.

    Args:
        argv: The command line without the program name.

    Returns:
        Our options (a namespace with one attribute per option of :func:`build_parser`) and the
        remaining arguments, in order, for ``open_clip_train``'s parser.

    Raises:
        SystemExit: With code 2 and one line on stderr (rank 0) for any refused option.
    """
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
            allowed = _option_users(LOSS_OPTIONS[dest][0])
        else:
            allowed = list(STATEFUL_LOSSES)
        if options.loss not in allowed:
            _fail(
                parser,
                f"{option_flag(dest)} applies to --loss {' or '.join(allowed)}, not --loss {options.loss}.",
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
            _fail(parser, f"{option_flag(dest)} must be a finite number, got {value}.")
    stray = [a for a in rest if a.startswith("--tau") or a == "--loss"]
    if stray:
        _fail(parser, f"unrecognized option {stray[0]}; options of openclip_tau start with --tau-.")
    if options.loss in _CLASSES:
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
    """A loss class's error message with its keyword names written as our ``--tau-*`` flags.

    ``"tau_min must be positive"`` becomes ``"--tau-min must be positive"``; longer keywords are
    replaced first, and only whole words (not parts of other names or flags).
    """
    names = sorted(
        ((kw, option_flag(d)) for d, (kw, _, _) in LOSS_OPTIONS.items()), key=lambda x: -len(x[0])
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
    """The loss of ``--loss name`` (an entry of the registry's ``LOSSES``) with the given keywords.

    ``distributed`` (``local_loss``, ``gather_with_grad``) is passed only to classes whose
    constructor takes those keywords; ``dim`` (the model's ``embed_dim``) only to those that take
    ``dim`` (TempNet); ``num_samples`` and ``state_layout`` to the stateful ones.

    Args:
        name: A key of ``openclip_tau.registry.LOSSES`` (not ``clip`` or ``siglip``).
        kwargs: Keywords of the loss class (as from :func:`loss_kwargs`).
        num_samples: Per-sample table size, >= 1, for the stateful losses. Default None: only
            valid for the losses without per-sample state.
        rank: This process's rank, in [0, world_size). Default 0.
        world_size: Number of processes, >= 1. Default 1.
        distributed: ``local_loss`` and ``gather_with_grad`` as upstream's options give them.
            Default None: the classes' own defaults.
        dim: The model's ``embed_dim``, >= 1, for classes that take ``dim``. Default None.
        state_layout: ``"replicated"`` or ``"sharded"`` (stateful losses). Default
            ``"replicated"``.

    Returns:
        The loss module.

    Raises:
        KeyError: ``name`` is not in the registry.
        ValueError: A keyword out of its range (the class's own check, naming the keyword).
    """
    from openclip_tau.registry import LOSSES  # the classes themselves (and torch)

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

    Options left out are left out (the class's defaults apply); for a keyword of
    :data:`OFF_AT_ZERO`, 0 becomes None (``--tau-lr-drop-below 0`` gives
    ``lr_tau_drop_below=None``).

    Args:
        options: Our options, as :func:`parse_loss_args` returns them.

    Returns:
        Keyword to value, for the options given.
    """
    return {
        kwarg: None if kwarg in OFF_AT_ZERO and value == 0 else value
        for dest, (kwarg, _, _) in LOSS_OPTIONS.items()
        if (value := getattr(options, dest, None)) is not None
    }

"""The flags of both SimCLR scripts, generated from the dataclasses below (light: for ``--help``).

``--loss`` offers Lightly's NT-Xent and every loss of ``lightly_tau.registry``; each loss
hyperparameter is one flag (``--rho``, ``--tau-min``, ``--loss-seed`` where the name is taken),
unset by default (the loss's own default), refused for a loss that lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal, Optional, Sequence

from recipes.cli_args import ArgumentParser, PositiveInt, add_dataclass
from tau_core.registry_source import class_options, loss_options

# Lightly's NT-Xent (the example's loss), then lightly_tau's registry.
NTXENT = "lightly.loss.ntx_ent_loss:NTXentLoss"
LOSSES = ("ntxent", *loss_options("lightly_tau"))
# Hyperparameters named like a flag of the scripts get the prefix ``loss-`` (TempNet's seed).
RESERVED = frozenset({"seed", "lr", "epochs", "batch_size", "devices", "accelerator"})


def loss_options_of(name: str) -> dict[str, Any]:
    """The hyperparameters ``--loss name`` accepts (read from the loss class)."""
    if name == "ntxent":
        return {"temperature": class_options(NTXENT)["temperature"]}
    return loss_options("lightly_tau")[name]


def option_dest(keyword: str) -> str:
    """The dest of a loss hyperparameter's flag (``tau_min``, ``loss_seed``)."""
    return "loss_" + keyword if keyword in RESERVED else keyword


def _hyperparameter_options() -> type:
    """One field per keyword of any loss: its type, and a help naming each loss's default."""
    table: dict[str, tuple[type, list[str], str]] = {}
    for name in LOSSES:
        for keyword, option in loss_options_of(name).items():
            kind, users, text = table.get(keyword, (option.kind, [], option.help))
            users.append(f"{name} {'off' if option.default is None else option.default}")
            table[keyword] = (kind, users, text or option.help)
    return make_dataclass(
        "HyperparameterOptions",
        [
            (
                option_dest(kw),
                Optional[kind],
                field(default=None, metadata={"help": f"{text} (default: {', '.join(users)})"}),
            )
            for kw, (kind, users, text) in table.items()
        ],
    )


@dataclass
class CommonOptions:
    """data, model and run length

    Args:
        loss: contrastive loss
        data_root: folder for the gunzipped Fashion-MNIST files
        num_samples_limit: train on the first N images only (default: all 60,000)
        backbone: resnet18 as in Lightly's example, or a small ConvNet for fast CPU runs
        input_size: crop size in pixels
        max_steps: stop after this many steps (default: none)
        lr: SGD learning rate (as Lightly's example). The SogCLR and iSogCLR gradients are about
            tau times NT-Xent's, so they may want a larger one.
        num_workers: data loader workers
        num_threads: torch CPU threads (default: torch's)
        loss_state_dir: after training, save each rank's loss state and visited indices to
            DIR/loss_state_rank<r>.pt (e.g. to plot the learned temperatures per class)
    """

    loss: Literal[LOSSES] = "ntxent"  # type: ignore[valid-type]
    data_root: str = "datasets"
    num_samples_limit: Optional[PositiveInt] = None
    backbone: Literal["resnet18", "convnet"] = "resnet18"
    input_size: PositiveInt = 32
    batch_size: PositiveInt = 256
    epochs: PositiveInt = 10
    max_steps: Optional[PositiveInt] = None
    lr: float = 0.06
    num_workers: int = 0
    seed: int = 0
    num_threads: Optional[PositiveInt] = None
    loss_state_dir: Optional[str] = None


@dataclass
class PyTorchOptions:
    """device and logging

    Args:
        device: default: cuda if available, else cpu
        log_every: print every N steps
    """

    device: Optional[str] = None
    log_every: PositiveInt = 10


@dataclass
class LightningOptions:
    """devices and logging

    Args:
        accelerator: default: gpu if available, else cpu
        devices: number of processes; more than 1 gathers negatives and state updates
        strategy: Lightning strategy, e.g. ddp
        no_gather_distributed: with several devices, take negatives from each process's own
            batch only (the per-sample state is still synchronised across processes)
        state_layout: per-sample tables of the stateful losses: every process holds every row
            (replicated) or process r holds rows i % devices == r (sharded)
        log_dir: TensorBoard and checkpoint folder
        log_every: log every N steps
    """

    accelerator: Optional[str] = None
    devices: PositiveInt = 1
    strategy: str = "auto"
    no_gather_distributed: bool = False
    state_layout: Literal["replicated", "sharded"] = "replicated"
    log_dir: str = "logs"
    log_every: PositiveInt = 10


def parse(
    argv: Optional[Sequence[str]], description: str, options: type
) -> tuple[ArgumentParser, Any, dict[str, Any]]:
    """The parser, the parsed flags and the loss hyperparameters given (a flag the chosen loss
    lacks is an error)."""
    parser = ArgumentParser(description=description)
    add_dataclass(parser, CommonOptions)
    add_dataclass(
        parser,
        _hyperparameter_options(),
        "loss hyperparameters (unset: the loss's own default; each applies to some losses only)",
    )
    add_dataclass(parser, options)
    args = parser.parse_args(argv)
    accepted = loss_options_of(args.loss)
    keywords = dict.fromkeys(kw for name in LOSSES for kw in loss_options_of(name))
    given = {kw: getattr(args, option_dest(kw)) for kw in keywords}
    given = {kw: value for kw, value in given.items() if value is not None}
    wrong = [kw for kw in given if kw not in accepted]
    if wrong:
        flags = ", ".join(f"--{option_dest(kw).replace('_', '-')}" for kw in wrong)
        allowed = ", ".join(f"--{option_dest(kw).replace('_', '-')}" for kw in accepted)
        parser.error(f"{flags} do not apply to --loss {args.loss}; it accepts {allowed}.")
    return parser, args, given

"""What the pure-PyTorch and the Lightning SimCLR scripts share: data, backbone, loss, flags.

Both scripts follow Lightly's SimCLR example (``examples/pytorch/simclr.py`` and
``examples/pytorch_lightning/simclr.py``); the loss factory below is the only place where the
temperature-aware losses differ from Lightly's ``NTXentLoss``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightly_tau import IndexedDataset, registry
from recipes.fashion_mnist import prepare_torchvision_raw
from tau_core.adapter import LossOption, class_options

# The scripts' and tests' name for it: gunzips Debian's files for torchvision's FashionMNIST.
prepare_fashion_mnist = prepare_torchvision_raw

# Output size of the examples' projection head (SimCLRProjectionHead(num_features, 512, 128)).
PROJECTION_DIM = 128

# Lightly's NT-Xent (the example's loss) and every loss of lightly_tau's registry; a loss added
# to the registry is offered here with its options.
HOST_LOSSES: dict[str, type] = {"ntxent": NTXentLoss}
LOSSES = (*HOST_LOSSES, *registry.LOSSES)


def loss_options_of(name: str) -> dict[str, LossOption]:
    """The hyperparameters ``--loss name`` accepts (read from the loss class)."""
    if name in HOST_LOSSES:
        return {"temperature": class_options(NTXentLoss)["temperature"]}
    return registry.options(name)


# Hyperparameters named like a flag of the scripts get the prefix ``loss-`` (TempNet's seed).
RESERVED = frozenset({"seed", "lr", "epochs", "batch_size", "devices", "accelerator"})


def option_dest(keyword: str) -> str:
    """The argparse dest of a loss hyperparameter (``tau_min``, ``loss_seed``)."""
    return "loss_" + keyword if keyword in RESERVED else keyword


def option_table() -> dict[str, tuple[type, str]]:
    """Keyword -> (type, help naming each loss that takes it and its default)."""
    table: dict[str, tuple[type, list[str], str]] = {}
    for name in LOSSES:
        for keyword, option in loss_options_of(name).items():
            kind, users, text = table.get(keyword, (option.kind, [], option.help))
            users.append(f"{name} {'off' if option.default is None else option.default}")
            table[keyword] = (kind, users, text or option.help)
    return {
        kw: (kind, f"{text} (default: {', '.join(users)})")
        for kw, (kind, users, text) in table.items()
    }


def simclr_transform(input_size: int = 32) -> Callable[[Any], list[Tensor]]:
    """Lightly's ``SimCLRTransform`` for small images, on Fashion-MNIST's grayscale images.

    The images are turned into 3 identical channels first, so the backbone, the colour
    augmentations and the ImageNet normalisation of Lightly's example stay unchanged. The
    settings are those of Lightly's CIFAR-10 benchmark (weaker colour jitter, no blur).
    """
    return torchvision.transforms.Compose(
        [
            torchvision.transforms.Grayscale(num_output_channels=3),
            SimCLRTransform(input_size=input_size, cj_strength=0.5, gaussian_blur=0.0),
        ]
    )


def fashion_mnist_dataset(
    root: str | os.PathLike,
    transform: Optional[Callable[[Any], Any]] = None,
    num_samples_limit: Optional[int] = None,
    train: bool = True,
) -> IndexedDataset:
    """Fashion-MNIST from the Debian files, yielding ``([x0, x1], target, index)``.

    ``num_samples_limit`` keeps the first N images (a ``Subset``). The index is the position in
    the returned dataset, so a stateful loss needs ``num_samples=len(dataset)``.
    """
    prepare_fashion_mnist(root)
    dataset: Dataset = torchvision.datasets.FashionMNIST(
        str(root), train=train, transform=transform, download=False
    )
    if num_samples_limit is not None:
        if num_samples_limit < 1:
            raise ValueError(f"num_samples_limit must be >= 1, got {num_samples_limit}.")
        dataset = Subset(dataset, range(min(num_samples_limit, len(dataset))))
    return IndexedDataset(dataset)


class ConvNet(nn.Sequential):
    """A 5-layer ConvNet (3x3 conv, BatchNorm, ReLU; three stride-2 layers, global pool).

    Trains about 30 times faster than ResNet-18 on a CPU at 32x32 pixels; ``out_features`` 128.
    """

    out_features = 128

    def __init__(self, in_channels: int = 3) -> None:
        layers: list[nn.Module] = []
        channels = [in_channels, 16, 32, 32, 64, 128]
        strides = [1, 2, 1, 2, 2]
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.AdaptiveAvgPool2d(1))
        super().__init__(*layers)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """The backbone and its feature size: ``resnet18`` as in Lightly's example, or ``convnet``."""
    if name == "resnet18":
        resnet = torchvision.models.resnet18()
        return nn.Sequential(*list(resnet.children())[:-1]), 512
    if name == "convnet":
        return ConvNet(), ConvNet.out_features
    raise ValueError(f"backbone must be one of 'resnet18', 'convnet', got {name!r}.")


def build_loss(
    name: str,
    num_samples: int,
    gather_distributed: bool = False,
    state_layout: str = "replicated",
    **options: Any,
) -> nn.Module:
    """The SimCLR loss chosen by ``--loss``: Lightly's ``NTXentLoss`` or one of lightly_tau's.

    This is the swap in Lightly's example: the stateful losses also need the dataset size, and
    their forward takes the batch's dataset indices.

    Args:
        name: One of :data:`LOSSES`.
        num_samples: ``len(dataset)``; the size of the per-sample state.
        gather_distributed: Gather negatives (and the state updates) from all processes.
        state_layout: ``replicated`` or ``sharded`` per-sample tables (stateful losses).
        options: Hyperparameters of the chosen loss (see :func:`loss_options_of`).
    """
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}.")
    unknown = sorted(set(options) - set(loss_options_of(name)))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} do not apply to loss {name!r}; it accepts "
            f"{', '.join(loss_options_of(name))}."
        )
    if name in HOST_LOSSES:
        return HOST_LOSSES[name](gather_distributed=gather_distributed, **options)
    return registry.build(
        name,
        num_samples,
        dim=PROJECTION_DIM,
        gather_distributed=gather_distributed,
        state_layout=state_layout,
        **options,
    )


def takes_index(criterion: nn.Module) -> bool:
    """Whether the loss's forward is ``(out0, out1, index)`` rather than ``(out0, out1)``."""
    return bool(getattr(criterion, "needs_index", False))


def temperature_optimizer(criterion: nn.Module) -> Optional[torch.optim.Optimizer]:
    """The trained temperature's own AdamW (RGCL-g, TempNet), registered with its schedule and
    bounds; None for the other losses. The model keeps the example's SGD."""
    if not hasattr(criterion, "param_groups"):
        return None
    return criterion.optimizer([], lr=0.0)


def loss_stats(criterion: nn.Module) -> dict[str, Tensor]:
    """The diagnostics of the last call (objective, temperature statistics); ``{}`` for NT-Xent."""
    return dict(getattr(criterion, "stats", {}))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, model, loss and run-length flags shared by both scripts."""
    parser.add_argument(
        "--loss", choices=LOSSES, default="ntxent", help="contrastive loss (default: ntxent)"
    )
    group = parser.add_argument_group(
        "loss hyperparameters (unset: the loss's own default; each applies to some losses only)"
    )
    for option, (kind, help_text) in option_table().items():
        flag = "--" + option_dest(option).replace("_", "-")
        group.add_argument(flag, dest=option_dest(option), type=kind, default=None, help=help_text)
    parser.add_argument(
        "--data-root",
        default="datasets",
        help="folder for the gunzipped Fashion-MNIST files (default: ./datasets)",
    )
    parser.add_argument(
        "--num-samples-limit",
        type=int,
        default=None,
        help="train on the first N images only (default: all 60,000)",
    )
    parser.add_argument(
        "--backbone",
        choices=("resnet18", "convnet"),
        default="resnet18",
        help="resnet18 as in Lightly's example, or a small ConvNet for fast CPU runs",
    )
    parser.add_argument("--input-size", type=int, default=32, help="crop size in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (default: none)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=0.06,
        help="SGD learning rate (default 0.06, as Lightly's example). The SogCLR and iSogCLR "
        "gradients are about tau times NT-Xent's, so they may want a larger one.",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--loss-state-dir",
        default=None,
        help="after training, save each rank's loss state and visited indices to "
        "DIR/loss_state_rank<r>.pt (e.g. to plot the learned temperatures per class)",
    )


def loss_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The hyperparameter flags that were given; a flag the chosen loss lacks is an error."""
    accepted = loss_options_of(args.loss)
    values = {name: getattr(args, option_dest(name)) for name in option_table()}
    given = {name: value for name, value in values.items() if value is not None}
    wrong = [name for name in given if name not in accepted]
    if wrong:
        flags = ", ".join(f"--{option_dest(name).replace('_', '-')}" for name in wrong)
        allowed = ", ".join(f"--{option_dest(name).replace('_', '-')}" for name in accepted)
        parser.error(f"{flags} do not apply to --loss {args.loss}; it accepts {allowed}.")
    return given


def check_run_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Positive sizes and lengths, with the flag's name in the message."""
    for flag in ("batch_size", "epochs", "input_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")
    for flag in ("max_steps", "num_samples_limit", "num_threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")


@dataclass
class RunResult:
    """What a run returns to its caller (tests, notebooks).

    Attributes:
        criterion: The loss module, with its per-sample state.
        losses: The loss value of every step.
        stats: The loss's ``stats`` of the last step, as floats.
        visited: Boolean mask over the dataset of the indices this process passed to the loss.
    """

    criterion: nn.Module
    losses: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    visited: Optional[Tensor] = None


def save_loss_state(
    directory: str | os.PathLike, rank: int, criterion: nn.Module, visited: Tensor
) -> Path:
    """Writes ``{"loss_state": ..., "tables": ..., "visited": visited}`` for one rank.

    ``tables`` holds every per-sample table whole (``state.table``: with the sharded layout a
    collective that gathers the rows of all ranks, so every rank must call this together).
    """
    path = Path(directory) / f"loss_state_rank{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = getattr(criterion, "state", None)
    tables = {} if state is None else {name: state.table(name).cpu() for name in state.names}
    record = {"loss_state": criterion.state_dict(), "tables": tables, "visited": visited.cpu()}
    torch.save(record, path)
    return path


# The statistics printed on the console (all of them go to TensorBoard).
CONSOLE_STATS = (
    "objective",
    "tau_mean",
    "tau_p10",
    "tau_p90",
    "tau_positive_mean",
    "tau_negative_mean",
)


def format_stats(values: dict[str, float], keys: Sequence[str] = CONSOLE_STATS) -> str:
    """``name value`` pairs for a console line."""
    return "  ".join(f"{key} {values[key]:.4f}" for key in keys if key in values)

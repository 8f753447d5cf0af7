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

from lightly_tau import (
    DySTreSSLoss,
    IndexedDataset,
    ISogCLRLoss,
    RGCLGLoss,
    SogCLRLoss,
    TempNetLoss,
)
from recipes.fashion_mnist import prepare_torchvision_raw

# The scripts' and tests' name for it: gunzips Debian's files for torchvision's FashionMNIST.
prepare_fashion_mnist = prepare_torchvision_raw

# Output size of the examples' projection head (SimCLRProjectionHead(num_features, 512, 128)).
PROJECTION_DIM = 128

LOSSES = ("ntxent", "sogclr", "isogclr", "rgclg", "tempnet", "dystress")
# Which hyperparameter flags each loss accepts (argument names of the loss classes).
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "ntxent": ("temperature",),
    "sogclr": ("temperature", "gamma", "gamma_decay_epochs"),
    "isogclr": (
        "rho",
        "tau_init",
        "tau_min",
        "tau_max",
        "eta",
        "beta",
        "gamma",
        "gamma_decay_epochs",
        "tau_grad_clip",
    ),
    "rgclg": ("rho", "tau_init", "tau_min", "tau_max", "lr_tau", "gamma", "gamma_decay_epochs"),
    "tempnet": ("rho", "tau_min", "tau_max", "lr_tau", "gamma", "gamma_decay_epochs"),
    "dystress": ("tau_min", "tau_max"),
}
# Flag type and help text; every default is None so that each loss keeps its own default.
_OPTION_FLAGS: dict[str, tuple[type, str]] = {
    "temperature": (float, "temperature (ntxent: default 0.5, sogclr: default 0.1)"),
    "gamma": (float, "moving-average weight in (0, 1] (sogclr 0.9, isogclr 0.8)"),
    "gamma_decay_epochs": (int, "cosine decay of gamma from 1.0 over this many epochs"),
    "rho": (float, "isogclr: KL radius, larger gives smaller temperatures (default 0.3)"),
    "tau_init": (float, "isogclr: initial per-sample temperature (default 0.1)"),
    "tau_min": (float, "lower temperature bound (isogclr 0.05, dystress 0.1)"),
    "tau_max": (float, "upper temperature bound (isogclr 1.0, dystress 0.2)"),
    "eta": (float, "isogclr: temperature step size (default 0.03)"),
    "beta": (float, "isogclr: weight of the new temperature gradient in (0, 1] (default 0.5)"),
    "tau_grad_clip": (float, "isogclr: bound of the temperature gradient (default 3.0)"),
    "lr_tau": (float, "rgclg, tempnet: the temperature's own AdamW step size (2e-4, 3e-5)"),
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

    This is the swap in Lightly's example: the stateful losses (``sogclr``, ``isogclr``) also
    need the dataset size, and their forward takes the batch's dataset indices.

    Args:
        name: One of ``ntxent``, ``sogclr``, ``isogclr``, ``dystress``.
        num_samples: ``len(dataset)``; the size of the per-sample state.
        gather_distributed: Gather negatives (and the state updates) from all processes.
        state_layout: ``replicated`` or ``sharded`` per-sample tables (stateful losses).
        options: Hyperparameters of the chosen loss (see ``LOSS_OPTIONS``).
    """
    if name not in LOSS_OPTIONS:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}.")
    unknown = sorted(set(options) - set(LOSS_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} do not apply to loss {name!r}; it accepts "
            f"{', '.join(LOSS_OPTIONS[name])}."
        )
    if name == "ntxent":
        return NTXentLoss(gather_distributed=gather_distributed, **options)
    if name == "sogclr":
        return SogCLRLoss(
            num_samples,
            gather_distributed=gather_distributed,
            state_layout=state_layout,
            **options,
        )
    if name == "isogclr":
        return ISogCLRLoss(
            num_samples,
            gather_distributed=gather_distributed,
            state_layout=state_layout,
            **options,
        )
    if name == "rgclg":
        return RGCLGLoss(
            num_samples,
            gather_distributed=gather_distributed,
            state_layout=state_layout,
            **options,
        )
    if name == "tempnet":
        return TempNetLoss(
            num_samples,
            dim=PROJECTION_DIM,
            gather_distributed=gather_distributed,
            state_layout=state_layout,
            **options,
        )
    return DySTreSSLoss(gather_distributed=gather_distributed, **options)


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
    for option, (kind, help_text) in _OPTION_FLAGS.items():
        group.add_argument(f"--{option.replace('_', '-')}", type=kind, default=None, help=help_text)
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
    given = {name: getattr(args, name) for name in _OPTION_FLAGS if getattr(args, name) is not None}
    wrong = [name for name in given if name not in LOSS_OPTIONS[args.loss]]
    if wrong:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in wrong)
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in LOSS_OPTIONS[args.loss])
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

"""What the pure-PyTorch and the Lightning SimCLR scripts share: data, backbone, loss.

Both scripts follow Lightly's SimCLR example (``examples/pytorch/simclr.py`` and
``examples/pytorch_lightning/simclr.py``); the loss factory below is the only place where the
temperature-aware losses differ from Lightly's ``NTXentLoss``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightly_tau import IndexedDataset, registry
from recipes.fashion_mnist import prepare_torchvision_raw
from recipes.simclr.cli import LOSSES, loss_options_of  # noqa: F401  (re-exported)

# The scripts' and tests' name for it: gunzips Debian's files for torchvision's FashionMNIST.
prepare_fashion_mnist = prepare_torchvision_raw

# Output size of the examples' projection head (SimCLRProjectionHead(num_features, 512, 128)).
PROJECTION_DIM = 128

HOST_LOSSES: dict[str, type] = {"ntxent": NTXentLoss}


class SimCLR(nn.Module):
    """Backbone and SimCLR projection head, as in Lightly's example."""

    def __init__(self, backbone: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(num_features, 512, PROJECTION_DIM)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


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

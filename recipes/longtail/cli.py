"""The parser of ``python -m recipes.longtail``, importing nothing heavy: ``--help`` and bad
options answer before torch's host libraries (Lightly, Lightning, torchvision, matplotlib) load.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lightly_tau import registry
from recipes.longtail.names import (
    AUGMENTATIONS,
    BACKBONES,
    CLASS_ORDERS,
    DATASETS,
    DEFAULT_LOSSES,
    HOST_LOSS_NAMES,
    OPTIMIZERS,
)
from recipes.longtail.presets import PRESETS
from recipes.longtail.settings import registry_settings

DEFAULT_EPOCHS = 9
DEFAULT_OUTPUT = Path("runs") / "longtail"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False) whose meaning the help text gives."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def loss_names() -> tuple[str, ...]:
    """Every ``--losses`` choice: Lightly's losses, then lightly_tau's registry."""
    return (*HOST_LOSS_NAMES, *registry.LOSSES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.longtail",
        description=(
            "Train the same SimCLR model on a long-tailed image dataset once per loss (default: "
            "NT-Xent, NT-Xent with a cosine temperature schedule, Lightly's MACL, SogCLR, "
            "iSogCLR, DySTreSS; --losses all adds DCL, RGCL-g and TempNet), evaluate each with kNN and a linear "
            "probe on the balanced test set, test iSogCLR's temperature-frequency claim over "
            "several seeds and both class orders (and per sample against local density), and "
            "write a report (Markdown, CSV, JSON, PNG). The defaults take about ten minutes on "
            "two idle CPU cores."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    setting = parser.add_argument_group("presets")
    setting.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="the published settings of a long-tail run (recipes/longtail/presets.py): "
        "dataset, ResNet-18, LARS, batch, 400 epochs, loss settings; options given on the "
        "command line still win. imagenet100-lt also needs --dataset folder PATH",
    )
    setting.add_argument(
        "--smoke",
        action="store_true",
        help="the same code path for 2 steps of 1 epoch on a few images per class, on CPU, "
        "with a Fashion-MNIST stand-in for CIFAR or ImageNet-100 (accuracies mean nothing)",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        nargs="+",
        default=["fashion-mnist"],
        metavar=("NAME", "PATH"),
        help=f"one of {', '.join(DATASETS)}; 'folder PATH' reads PATH/train and "
        "PATH/val (or PATH/test) with torchvision's ImageFolder",
    )
    data.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="where torchvision's dataset files are (Fashion-MNIST is unpacked "
        "here from Debian's package)",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download MNIST or CIFAR if the files are missing",
    )
    data.add_argument(
        "--imbalance",
        type=_float,
        default=100.0,
        help="largest over smallest class size (>= 1; 1 keeps the split balanced)",
    )
    data.add_argument(
        "--class-order",
        choices=CLASS_ORDERS,
        default="natural",
        help="which class is frequent: class 0 first, or a seeded permutation",
    )
    data.add_argument(
        "--data-seed",
        type=_non_negative_int,
        default=0,
        help="seed of the long-tailed subset and of the class permutation",
    )
    data.add_argument(
        "--max-per-class",
        type=_positive_int,
        default=None,
        help="cap the largest class (quick runs)",
    )
    data.add_argument(
        "--test-per-class",
        type=_positive_int,
        default=None,
        help="test images per class (default: the whole balanced test split)",
    )
    data.add_argument(
        "--probe-per-class",
        type=_positive_int,
        default=500,
        help="labelled images per class for the linear probe",
    )
    data.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="image size for 'folder' datasets (default 224)",
    )

    runs = parser.add_argument_group("runs")
    runs.add_argument(
        "--losses",
        nargs="+",
        choices=list(loss_names()) + ["all"],
        default=list(DEFAULT_LOSSES),
        help="losses to compare ('all': every one of " + ", ".join(loss_names()) + ")",
    )
    runs.add_argument(
        "--seeds", nargs="+", type=_non_negative_int, default=[0], help="one run per loss and seed"
    )
    runs.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS)
    runs.add_argument(
        "--claim-seeds",
        nargs="*",
        type=_non_negative_int,
        default=[0, 1],
        help="iSogCLR's temperature-frequency claim: iSogCLR also runs with these seeds under "
        "each of --claim-orders (runs the comparison already has are reused); give no value "
        "to skip. Only when isogclr is among --losses",
    )
    runs.add_argument(
        "--claim-orders",
        nargs="+",
        choices=CLASS_ORDERS,
        default=list(CLASS_ORDERS),
        help="class orders of the claim runs (with --data-seed)",
    )
    runs.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=None,
        help="cap on optimizer steps per epoch (quick runs; default: every batch)",
    )
    runs.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="images per step and process (with --devices N the global batch is N times this)",
    )
    runs.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="report folder")
    runs.add_argument(
        "--no-checkpoints", action="store_true", help="do not save model and loss state per run"
    )
    runs.add_argument("--no-progress", action="store_true", help="no progress bars")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="convnet",
        help="convnet: 5-layer ConvNet that trains in minutes on a CPU; resnet18: "
        "torchvision ResNet-18 (CIFAR stem up to 64 px)",
    )
    model.add_argument("--hidden-dim", type=_positive_int, default=512)
    model.add_argument("--output-dim", type=_positive_int, default=128)
    model.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    model.add_argument("--lr", type=_float, default=1e-3)
    model.add_argument("--weight-decay", type=_float, default=0.0)
    model.add_argument("--warmup-epochs", type=_non_negative_int, default=0)
    model.add_argument(
        "--precision",
        choices=("auto", "32", "bf16"),
        default="auto",
        help="auto: bf16 autocast where the hardware supports it, else float32 "
        "(the losses always compute in float32)",
    )
    model.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default="batched",
        help="batched: SimCLR views drawn per batch with tensor ops on the device; "
        "lightly: Lightly's SimCLRTransform per image in DataLoader workers",
    )
    model.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="DataLoader workers (for --augment lightly and image folders)",
    )

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: a GPU when there is one",
    )
    hardware.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="processes (GPUs) per run; more than one trains with DDP and "
        "gathers negatives and loss state across them",
    )
    hardware.add_argument(
        "--parallel-runs",
        type=_positive_int,
        default=None,
        help="CPU only: runs trained side by side in separate processes "
        "(default: one per loss, or one per core if there are more cores)",
    )
    hardware.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads per run (default: cores / parallel runs)",
    )

    losses = parser.add_argument_group("losses")
    losses.add_argument(
        "--temperature", type=_float, default=0.1, help="NT-Xent, DCL and SogCLR temperature"
    )
    losses.add_argument("--cosine-tau-min", type=_float, default=0.1)
    losses.add_argument("--cosine-tau-max", type=_float, default=1.0)
    losses.add_argument(
        "--cosine-period",
        type=_float,
        default=None,
        help="period of the cosine schedule in epochs (default: a fifth of the "
        "run, the published 400 of 2000 epochs)",
    )
    add_registry_options(losses)
    losses.add_argument(
        "--macl-temperature", type=_float, default=0.1, help="MACL's base temperature tau_0"
    )
    losses.add_argument("--macl-alpha", type=_float, default=0.5, help="in [0, 1]")
    losses.add_argument(
        "--macl-a0", type=_float, default=0.0, help="MACL's alignment threshold A_0, in [0, 1]"
    )

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--knn-k", type=_positive_int, default=20)
    evaluation.add_argument("--knn-t", type=_float, default=0.1)
    evaluation.add_argument("--probe-epochs", type=_positive_int, default=100)
    evaluation.add_argument(
        "--density-k",
        type=_positive_int,
        default=20,
        help="neighbours of the local density (per-sample temperature analysis)",
    )
    return parser


# Help beside a registry option, where the recipe has more to say than the class.
OPTION_NOTES = {
    "isogclr_eta": "the published CIFAR recipe uses 0.03 over 400 epochs, too slow to move the "
    "temperatures in a short run",
}


def add_registry_options(group: argparse._ArgumentGroup) -> None:
    """``--<loss>-<keyword>`` for each hyperparameter of lightly_tau's registry (type, default
    and help read from the class; the recipe's default where :data:`RECIPE_DEFAULTS` has one)."""
    for name, (_, _, option, default) in registry_settings().items():
        kind = _float if option.kind is float else option.kind
        text = "; ".join(t for t in (option.help, OPTION_NOTES.get(name, "")) if t)
        group.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default, help=text or None
        )

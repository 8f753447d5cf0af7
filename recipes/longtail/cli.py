"""The parser of ``python -m recipes.longtail``, generated from the option dataclasses below and
importing nothing heavy: ``--help`` and bad options answer before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Literal, Optional

from recipes.cli_args import ArgumentParser, FiniteFloat, NonNegativeInt, PositiveInt, add_dataclass
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
from recipes.longtail.settings import registry_losses, registry_settings

DEFAULT_EPOCHS = 9
DEFAULT_OUTPUT = Path("runs") / "longtail"
ClassOrder = Literal[CLASS_ORDERS]  # type: ignore[valid-type]


def loss_names() -> tuple[str, ...]:
    """Every ``--losses`` choice: Lightly's losses, then lightly_tau's registry."""
    return (*HOST_LOSS_NAMES, *registry_losses())


@dataclass
class PresetOptions:
    """presets

    Args:
        preset: the published settings of a long-tail run (recipes/longtail/presets.py): dataset,
            ResNet-18, LARS, batch, 400 epochs, loss settings; options given on the command line
            still win. imagenet100-lt also needs --dataset folder PATH
        smoke: the same code path for 2 steps of 1 epoch on a few images per class, on CPU, with
            a Fashion-MNIST stand-in for CIFAR or ImageNet-100 (accuracies mean nothing)
    """

    preset: Optional[Literal[tuple(PRESETS)]] = None  # type: ignore[valid-type]
    smoke: bool = False


@dataclass
class DataOptions:
    """data

    Args:
        data_root: where torchvision's dataset files are (Fashion-MNIST is unpacked here from
            Debian's package)
        download: let torchvision download MNIST or CIFAR if the files are missing
        imbalance: largest over smallest class size (>= 1; 1 keeps the split balanced)
        class_order: which class is frequent: class 0 first, or a seeded permutation
        data_seed: seed of the long-tailed subset and of the class permutation
        max_per_class: cap the largest class (quick runs)
        test_per_class: test images per class (default: the whole balanced test split)
        probe_per_class: labelled images per class for the linear probe
        image_size: image size for 'folder' datasets (default 224)
    """

    dataset: list[str] = field(
        default_factory=lambda: ["fashion-mnist"],
        metadata={
            "metavar": ("NAME", "PATH"),
            "help": f"one of {', '.join(DATASETS)}; 'folder PATH' reads PATH/train and "
            "PATH/val (or PATH/test) with torchvision's ImageFolder",
        },
    )
    data_root: Path = Path("data")
    download: bool = False
    imbalance: FiniteFloat = 100.0  # type: ignore[valid-type]
    class_order: ClassOrder = "natural"
    data_seed: NonNegativeInt = 0
    max_per_class: Optional[PositiveInt] = None
    test_per_class: Optional[PositiveInt] = None
    probe_per_class: PositiveInt = 500
    image_size: Optional[PositiveInt] = None


@dataclass
class RunOptions:
    """runs

    Args:
        seeds: one run per loss and seed
        claim_seeds: iSogCLR's temperature-frequency claim: iSogCLR also runs with these seeds
            under each of --claim-orders (runs the comparison already has are reused); give no
            value to skip. Only when isogclr is among --losses
        claim_orders: class orders of the claim runs (with --data-seed)
        steps_per_epoch: cap on optimizer steps per epoch (quick runs; default: every batch)
        batch_size: images per step and process (with --devices N the global batch is N times
            this)
        output: report folder
        no_checkpoints: do not save model and loss state per run
        no_progress: no progress bars
    """

    losses: list[Literal[(*loss_names(), "all")]] = field(  # type: ignore[misc]
        default_factory=lambda: list(DEFAULT_LOSSES),
        metadata={"help": f"losses to compare ('all': every one of {', '.join(loss_names())})"},
    )
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    epochs: PositiveInt = DEFAULT_EPOCHS
    claim_seeds: list[NonNegativeInt] = field(
        default_factory=lambda: [0, 1], metadata={"nargs": "*"}
    )
    claim_orders: list[ClassOrder] = field(default_factory=lambda: list(CLASS_ORDERS))
    steps_per_epoch: Optional[PositiveInt] = None
    batch_size: PositiveInt = 256
    output: Path = DEFAULT_OUTPUT
    no_checkpoints: bool = False
    no_progress: bool = False


@dataclass
class ModelOptions:
    """model and optimisation

    Args:
        backbone: convnet: 5-layer ConvNet that trains in minutes on a CPU; resnet18:
            torchvision ResNet-18 (CIFAR stem up to 64 px)
        precision: auto: bf16 autocast where the hardware supports it, else float32 (the losses
            always compute in float32)
        augment: batched: SimCLR views drawn per batch with tensor ops on the device; lightly:
            Lightly's SimCLRTransform per image in DataLoader workers
        workers: DataLoader workers (for --augment lightly and image folders)
    """

    backbone: Literal[BACKBONES] = "convnet"  # type: ignore[valid-type]
    hidden_dim: PositiveInt = 512
    output_dim: PositiveInt = 128
    optimizer: Literal[OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    lr: FiniteFloat = 1e-3  # type: ignore[valid-type]
    weight_decay: FiniteFloat = 0.0  # type: ignore[valid-type]
    warmup_epochs: NonNegativeInt = 0
    precision: Literal["auto", "32", "bf16"] = "auto"
    augment: Literal[AUGMENTATIONS] = "batched"  # type: ignore[valid-type]
    workers: NonNegativeInt = 0


@dataclass
class HardwareOptions:
    """hardware

    Args:
        device: auto: a GPU when there is one
        devices: processes (GPUs) per run; more than one trains with DDP and gathers negatives
            and loss state across them
        parallel_runs: CPU only: runs trained side by side in separate processes (default: one
            per loss, or one per core if there are more cores)
        threads: torch CPU threads per run (default: cores / parallel runs)
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    devices: PositiveInt = 1
    parallel_runs: Optional[PositiveInt] = None
    threads: Optional[PositiveInt] = None


@dataclass
class LossOptions:
    """losses

    Args:
        temperature: NT-Xent, DCL and SogCLR temperature
        cosine_period: period of the cosine schedule in epochs (default: a fifth of the run, the
            published 400 of 2000 epochs)
        macl_temperature: MACL's base temperature tau_0
        macl_alpha: in [0, 1]
        macl_a0: MACL's alignment threshold A_0, in [0, 1]
    """

    temperature: FiniteFloat = 0.1  # type: ignore[valid-type]
    cosine_tau_min: FiniteFloat = 0.1  # type: ignore[valid-type]
    cosine_tau_max: FiniteFloat = 1.0  # type: ignore[valid-type]
    cosine_period: Optional[FiniteFloat] = None  # type: ignore[valid-type]
    macl_temperature: FiniteFloat = 0.1  # type: ignore[valid-type]
    macl_alpha: FiniteFloat = 0.5  # type: ignore[valid-type]
    macl_a0: FiniteFloat = 0.0  # type: ignore[valid-type]


@dataclass
class EvaluationOptions:
    """evaluation

    Args:
        knn_k: neighbours of the kNN classifier
        knn_t: temperature of the kNN classifier's similarity weights
        probe_epochs: at most this many L-BFGS iterations of the linear probe (scikit-learn's
            logistic regression on standardised frozen features)
        density_k: neighbours of the local density (per-sample temperature analysis)
    """

    knn_k: PositiveInt = 20
    knn_t: FiniteFloat = 0.1  # type: ignore[valid-type]
    probe_epochs: PositiveInt = 100
    density_k: PositiveInt = 20


# Help beside a registry option, where the recipe has more to say than the class.
OPTION_NOTES = {
    "isogclr_eta": "the published CIFAR recipe uses 0.03 over 400 epochs, too slow to move the "
    "temperatures in a short run",
}


def registry_options() -> type:
    """``--<loss>-<keyword>`` for each hyperparameter of lightly_tau's registry (type, default
    and help read from the class; the recipe's default where ``RECIPE_DEFAULTS`` has one)."""
    fields = []
    for name, (_, _, option, default) in registry_settings().items():
        kind = FiniteFloat if option.kind is float else option.kind
        text = "; ".join(t for t in (option.help, OPTION_NOTES.get(name, "")) if t)
        hint = Optional[kind] if option.optional else kind
        fields.append((name, hint, field(default=default, metadata={"help": text or None})))
    return make_dataclass("RegistryOptions", fields)


OPTION_GROUPS = (
    PresetOptions,
    DataOptions,
    RunOptions,
    ModelOptions,
    HardwareOptions,
    LossOptions,
    EvaluationOptions,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m recipes.longtail",
        description=(
            "Train the same SimCLR model on a long-tailed image dataset once per loss (default: "
            "NT-Xent, NT-Xent with a cosine temperature schedule, Lightly's MACL, SogCLR, "
            "iSogCLR, DySTreSS; --losses all adds DCL, RGCL-g and TempNet), evaluate each with "
            "kNN and a linear probe on the balanced test set, test iSogCLR's temperature-frequency "
            "claim over several seeds and both class orders (and per sample against local "
            "density), and write a report (Markdown, CSV, JSON, PNG). The defaults take about ten "
            "minutes on two idle CPU cores."
        ),
        allow_abbrev=False,
    )
    for group in OPTION_GROUPS:
        add_dataclass(parser, group)
        if group is LossOptions:
            add_dataclass(parser, registry_options(), "losses (lightly_tau's registry)")
    return parser

"""Long-tailed versions of torchvision image datasets, preloaded as uint8 tensors.

The training split is subsampled with the exponential profile of CIFAR-10-LT (Cao et al., 2019):
the class at frequency rank ``r`` of ``C`` keeps ``int(n_max * imbalance ** (-r / (C - 1)))``
images, where ``n_max`` is the size of the largest class. The test split stays balanced. Which
class gets which rank is either the natural class order (class 0 is the most frequent) or a
seeded permutation, so that rarity can be told apart from how hard a class is.

Images are loaded with torchvision's own dataset classes (``FashionMNIST``, ``MNIST``,
``CIFAR10``, ``CIFAR100``, ``ImageFolder``) and kept in memory as ``uint8`` tensors of shape
(N, C, H, W): the small datasets fit easily, and a long-tailed ImageNet-100 (about 28k images at
224 px) needs about 4 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from recipes import fashion_mnist
from recipes.longtail.names import CLASS_ORDERS, DATASETS  # noqa: F401
from recipes.seeds import derive_seed

GROUP_NAMES = ("head", "middle", "tail")

NATIVE_IMAGE_SIZE = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32}
DEFAULT_FOLDER_IMAGE_SIZE = 224


class DatasetUnavailable(ValueError):
    """The dataset's files are missing or malformed; the message says what to install or where."""


@dataclass
class ImageSet:
    """Images as a uint8 tensor (N, C, H, W) with their class labels (N,)."""

    images: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.numel())


@dataclass
class LongTailData:
    """Everything the runs need about the data: splits, class frequencies and groups.

    Attributes:
        name: Dataset name (``fashion-mnist``, ..., or ``folder``).
        classes: Class names, indexed by class id.
        train: The long-tailed training split (what the contrastive runs see).
        train_source_index: Index of each training image in the full training split.
        test: The balanced test split (evaluation).
        probe: A class-balanced labelled subset of the full training split (linear probe).
        class_counts: Images per class id in ``train``.
        class_rank: Frequency rank of each class id (0 = most frequent).
        class_group: ``head``, ``middle`` or ``tail`` for each class id (thirds of the ranks).
        mean, std: Per-channel statistics of ``train`` in [0, 1] units (for normalisation).
        imbalance: Ratio between the largest and the smallest class as requested.
        class_order: ``natural`` or ``permuted``.
        data_seed: Seed of the subsampling and of the class permutation.
    """

    name: str
    classes: list[str]
    train: ImageSet
    train_source_index: Tensor
    test: ImageSet
    probe: ImageSet
    class_counts: list[int]
    class_rank: list[int]
    class_group: list[str]
    mean: list[float]
    std: list[float]
    imbalance: float
    class_order: str
    data_seed: int
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def summary(self) -> dict:
        """A JSON-ready description of the data (counts, ranks, groups)."""
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "channels": self.channels,
            "imbalance": self.imbalance,
            "class_order": self.class_order,
            "data_seed": self.data_seed,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "probe_size": len(self.probe),
            "classes": [
                {
                    "id": c,
                    "name": self.classes[c],
                    "train_count": self.class_counts[c],
                    "rank": self.class_rank[c],
                    "group": self.class_group[c],
                }
                for c in range(self.num_classes)
            ],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- long-tail profile
def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept by the class at each frequency rank: ``int(n_max * imbalance ** (-r/(C-1)))``.

    The CIFAR-10-LT profile: rank 0 keeps ``n_max``, the last rank ``n_max / imbalance``.

    Raises:
        ValueError: If ``imbalance < 1``, fewer than two classes, or the rarest class would
            keep no image.
    """
    if num_classes < 2:
        raise ValueError(f"A long-tailed split needs at least 2 classes, got {num_classes}.")
    if not imbalance >= 1.0:
        raise ValueError(f"imbalance must be >= 1 (largest / smallest class), got {imbalance}.")
    counts = [int(n_max * imbalance ** (-rank / (num_classes - 1))) for rank in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(
            f"imbalance {imbalance:g} is too large for {n_max} images in the largest class: the "
            f"rarest class would keep no image (need imbalance <= {n_max})."
        )
    return counts


def frequency_order(num_classes: int, class_order: str, seed: int) -> list[int]:
    """The class id at each frequency rank: identity, or a permutation seeded by ``seed``."""
    if class_order == "natural":
        return list(range(num_classes))
    if class_order == "permuted":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(num_classes, generator=generator).tolist()
    raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {class_order!r}.")


def frequency_groups(class_rank: Sequence[int]) -> list[str]:
    """``head``, ``middle`` or ``tail`` per class: the ranks split in thirds (10 classes: 4/3/3)."""
    num_classes = len(class_rank)
    bounds = np.array_split(np.arange(num_classes), 3)
    group_of_rank = {}
    for name, ranks in zip(GROUP_NAMES, bounds):
        for rank in ranks.tolist():
            group_of_rank[rank] = name
    return [group_of_rank[rank] for rank in class_rank]


def long_tail_indices(
    targets: Tensor,
    num_classes: int,
    imbalance: float,
    class_order: str,
    seed: int,
    max_per_class: Optional[int] = None,
) -> tuple[Tensor, list[int], list[int]]:
    """Indices of a long-tailed subset of a labelled split.

    ``n_max`` is the largest class's size (capped by ``max_per_class``). Each class draws its
    images at random (seeded) from its own; a class that has fewer than its target keeps all.

    Returns:
        The sorted indices, the count per class id, and the frequency rank per class id.
    """
    available = torch.bincount(targets, minlength=num_classes)
    n_max = int(available.max())
    if max_per_class is not None:
        n_max = min(n_max, max_per_class)
    targets_by_rank = long_tail_counts(n_max, num_classes, imbalance)
    order = frequency_order(num_classes, class_order, seed)
    generator = torch.Generator().manual_seed(seed)
    chosen, counts, ranks = [], [0] * num_classes, [0] * num_classes
    for rank, class_id in enumerate(order):
        members = torch.nonzero(targets == class_id).flatten()
        keep = min(targets_by_rank[rank], members.numel())
        if keep == 0:
            raise DatasetUnavailable(f"Class {class_id} has no training image.")
        pick = members[torch.randperm(members.numel(), generator=generator)[:keep]]
        chosen.append(pick)
        counts[class_id], ranks[class_id] = keep, rank
    return torch.sort(torch.cat(chosen)).values, counts, ranks


def balanced_indices(
    targets: Tensor, num_classes: int, per_class: Optional[int], seed: int
) -> Tensor:
    """A seeded class-balanced subset: ``per_class`` images of every class (all if None).

    ``per_class`` is capped by the smallest class, so the subset stays balanced.
    """
    available = torch.bincount(targets, minlength=num_classes)
    smallest = int(available.min())
    if per_class is None and int(available.max()) == smallest:
        return torch.arange(targets.numel())
    keep = smallest if per_class is None else min(per_class, smallest)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for class_id in range(num_classes):
        members = torch.nonzero(targets == class_id).flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:keep]])
    return torch.sort(torch.cat(chosen)).values


# --------------------------------------------------------------------------- dataset sources
def prepare_fashion_mnist(root: Path, source: Path = fashion_mnist.DEBIAN_DIR) -> str:
    """Makes ``root/FashionMNIST/raw/`` hold the idx files torchvision reads (unpacked once from
    Debian's ``dataset-fashion-mnist``); returns where the files came from.

    Raises:
        DatasetUnavailable: If neither place holds the files.
    """
    raw = root / "FashionMNIST" / "raw"
    already = all((raw / name).is_file() for name in fashion_mnist.FILES)
    try:
        fashion_mnist.prepare_torchvision_raw(root, source_dir=source)
    except FileNotFoundError as err:
        raise DatasetUnavailable(f"{err} (`bash scripts/install.sh` installs it.)") from err
    return str(raw) if already else str(source)


def standin_images(num_classes: int, train: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Fashion-MNIST shaped like CIFAR, for smoke runs: (N, 3, 32, 32) uint8, targets, names.

    Images are padded from 28 to 32 px and repeated to three channels. With 10 classes the labels
    are Fashion-MNIST's; with 100, image ``k`` of label ``y`` gets pseudo-class ``10 * y + k % 10``
    (named ``"<class> <k % 10>"``), so a 100-class pipeline runs on installed data.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"a stand-in has 10 or 100 classes, got {num_classes}.")
    try:
        pixels, labels = fashion_mnist.load("train" if train else "test")
    except FileNotFoundError as err:
        raise DatasetUnavailable(str(err)) from err
    names = list(fashion_mnist.CLASS_NAMES)
    images = torch.from_numpy(pixels).unsqueeze(1)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()
    targets = torch.from_numpy(labels).long()
    if num_classes == 100:
        targets = targets * 10 + torch.arange(len(targets)) % 10
        names = [f"{name} {j}" for name in names for j in range(10)]
    return images, targets, names


def _torchvision_split(name: str, root: Path, train: bool, download: bool) -> Dataset:
    classes = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "mnist": torchvision.datasets.MNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }
    try:
        return classes[name](str(root), train=train, download=download)
    except RuntimeError as err:
        raise DatasetUnavailable(
            f"{name} not found under {root} ({err}). Put torchvision's files there, or pass "
            "--download to let torchvision fetch them where the network allows it."
        ) from err


def _tensor_split(dataset: Dataset) -> ImageSet:
    """The images of a torchvision MNIST-like or CIFAR-like dataset as (N, C, H, W) uint8."""
    data = dataset.data  # type: ignore[attr-defined]
    images = torch.as_tensor(np.asarray(data))
    if images.dim() == 3:  # MNIST family: (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    targets = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)  # type: ignore[attr-defined]
    return ImageSet(images.contiguous(), targets)


def _folder_split(path: Path) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as err:
        raise DatasetUnavailable(f"Cannot read the image folder {path}: {err}") from err


def folder_splits(path: Path) -> tuple[Path, Path]:
    """The training and evaluation folders of an ImageFolder dataset at ``path``.

    Expects ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``path/test/<class>/*``), as
    ImageNet-100 is usually laid out.
    """
    if not path.is_dir():
        raise DatasetUnavailable(f"--dataset folder: {path} is not a directory.")
    train = path / "train"
    evaluation = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
    if not train.is_dir() or evaluation is None:
        raise DatasetUnavailable(
            f"--dataset folder: {path} must hold a train/ folder and a val/ (or test/) folder, "
            "each with one subfolder of images per class."
        )
    return train, evaluation


def _preload_folder(
    dataset: torchvision.datasets.ImageFolder, indices: Tensor, image_size: int, workers: int
) -> ImageSet:
    """Decodes the chosen images once: shorter side to ``image_size``, centre crop, uint8."""
    dataset.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    loader = DataLoader(
        Subset(dataset, indices.tolist()), batch_size=256, num_workers=workers, shuffle=False
    )
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images.append(batch_images)
        targets.append(batch_targets)
    return ImageSet(torch.cat(images), torch.cat(targets).long())


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].double() / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _builtin_splits(
    name: str,
    root: Path,
    image_size: Optional[int],
    download: bool,
    standin: bool,
    notes: list[str],
) -> tuple[ImageSet, ImageSet, list[str], str]:
    """The training and test splits of a torchvision dataset (or its smoke stand-in), its class
    names and where it came from; a stand-in adds its note to ``notes``."""
    if image_size is not None and image_size != NATIVE_IMAGE_SIZE[name]:
        raise ValueError(
            f"--image-size {image_size} is not supported for {name}: its images stay at "
            f"their native {NATIVE_IMAGE_SIZE[name]} px."
        )
    if standin:
        if name not in ("cifar10", "cifar100"):
            raise ValueError(f"a stand-in replaces cifar10 or cifar100, not {name}.")
        num = 10 if name == "cifar10" else 100
        train_tensor = ImageSet(*standin_images(num, train=True)[:2])
        test_images, test_labels, classes = standin_images(num, train=False)
        test_tensor = ImageSet(test_images, test_labels)
        source = f"Fashion-MNIST standing in for {name} (smoke mode)"
        notes.append(
            f"Smoke mode: Fashion-MNIST padded to 32 px RGB stands in for {name}"
            + (" (100 pseudo-classes)" if num == 100 else "")
            + "; the accuracies mean nothing."
        )
    else:
        if name == "fashion-mnist":
            source = prepare_fashion_mnist(root)
        else:
            source = str(root)
        train_full = _torchvision_split(name, root, True, download)
        test_full = _torchvision_split(name, root, False, download)
        classes = list(train_full.classes)  # type: ignore[attr-defined]
        train_tensor, test_tensor = _tensor_split(train_full), _tensor_split(test_full)
    return train_tensor, test_tensor, classes, source


def load_long_tail_data(
    name: str,
    root: Path,
    folder: Optional[Path] = None,
    imbalance: float = 100.0,
    class_order: str = "natural",
    data_seed: int = 0,
    max_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
    probe_per_class: Optional[int] = 500,
    image_size: Optional[int] = None,
    download: bool = False,
    workers: int = 0,
    standin: bool = False,
) -> LongTailData:
    """Loads a dataset, subsamples its training split to a long tail, keeps the test balanced.

    Args:
        name: One of :data:`DATASETS`.
        root: Folder of torchvision's dataset files (Fashion-MNIST is unpacked here).
        folder: For ``folder``: the folder with ``train/`` and ``val/`` (or ``test/``).
        imbalance: Largest over smallest class size (>= 1; 1 keeps the split balanced).
        class_order: ``natural`` or ``permuted`` (which class gets which frequency rank).
        data_seed: Seed of the subsampling and the permutation (kept apart from training seeds
            so that every run sees the same images).
        max_per_class: Caps ``n_max`` (for quick runs and tests).
        test_per_class: Keep this many test images per class (None: all).
        probe_per_class: Labelled images per class for the linear probe, drawn from the full
            training split (None: as many as the smallest class has).
        image_size: Resize image folders to this size (default 224); built-in datasets keep
            their native size and reject another one.
        download: Let torchvision download MNIST or CIFAR when the files are missing.
        workers: DataLoader workers for decoding image folders.
        standin: For ``cifar10`` and ``cifar100``: load :func:`standin_images` (Fashion-MNIST
            shaped like CIFAR) instead of the CIFAR files, for smoke runs.

    Raises:
        DatasetUnavailable: Missing files or an unusable folder.
        ValueError: Bad imbalance or class order.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}.")
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {class_order!r}.")
    notes: list[str] = []
    if name == "folder":
        if folder is None:
            raise DatasetUnavailable("--dataset folder needs the folder's path.")
        train_dir, test_dir = folder_splits(folder)
        train_full = _folder_split(train_dir)
        test_full = _folder_split(test_dir)
        if train_full.classes != test_full.classes:
            raise DatasetUnavailable(
                f"{train_dir} and {test_dir} must have the same class subfolders."
            )
        classes = list(train_full.classes)
        train_targets = torch.as_tensor(train_full.targets, dtype=torch.long)
        test_targets = torch.as_tensor(test_full.targets, dtype=torch.long)
        source = str(folder)
    else:
        train_tensor, test_tensor, classes, source = _builtin_splits(
            name, root, image_size, download, standin, notes
        )
        train_targets, test_targets = train_tensor.targets, test_tensor.targets

    num_classes = len(classes)
    train_index, counts, ranks = long_tail_indices(
        train_targets, num_classes, imbalance, class_order, data_seed, max_per_class
    )
    test_index = balanced_indices(test_targets, num_classes, test_per_class, data_seed)
    # Its own stream: with data_seed + 1 it drew the permutations of the next data seed's subset.
    probe_seed = derive_seed(data_seed, "probe")
    probe_index = balanced_indices(train_targets, num_classes, probe_per_class, probe_seed)
    if test_index.numel() < test_targets.numel():
        per_class = test_index.numel() // num_classes
        notes.append(f"The test split was subsampled to {per_class} images per class.")

    if name == "folder":
        size = image_size or DEFAULT_FOLDER_IMAGE_SIZE
        train = _preload_folder(train_full, train_index, size, workers)
        test = _preload_folder(test_full, test_index, size, workers)
        probe = _preload_folder(train_full, probe_index, size, workers)
    else:
        train = ImageSet(train_tensor.images[train_index], train_tensor.targets[train_index])
        test = ImageSet(test_tensor.images[test_index], test_tensor.targets[test_index])
        probe = ImageSet(train_tensor.images[probe_index], train_tensor.targets[probe_index])
    mean, std = channel_stats(train.images)
    return LongTailData(
        name=name,
        classes=classes,
        train=train,
        train_source_index=train_index,
        test=test,
        probe=probe,
        class_counts=counts,
        class_rank=ranks,
        class_group=frequency_groups(ranks),
        mean=mean,
        std=std,
        imbalance=float(imbalance),
        class_order=class_order,
        data_seed=data_seed,
        source=source,
        notes=notes,
    )

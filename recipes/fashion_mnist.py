"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: the one reader the recipes share.

The package installs the four gzipped idx files under ``/usr/share/datasets/fashion-mnist/``.
torchvision's ``FashionMNIST(root, download=False)`` reads them once they are gunzipped into
``root/FashionMNIST/raw/`` (:func:`prepare_torchvision_raw`); :func:`load` does that in a
temporary folder and returns torchvision's arrays. torchvision's own download cannot stand in:
it needs the network, and Debian recompressed the files, so their md5 sums differ from
torchvision's list.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "DEBIAN_PACKAGE",
    "FILES",
    "SPLITS",
    "load",
    "prepare_torchvision_raw",
]

DEBIAN_PACKAGE = "dataset-fashion-mnist"
#: Where ``DEBIAN_PACKAGE`` installs the gzipped idx files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The split names of :func:`load` and the prefix of their files.
SPLITS = {"train": "train", "test": "t10k"}
#: The four idx files, without the ``.gz`` that the package adds (torchvision's raw names).
FILES = tuple(
    f"{prefix}-{kind}"
    for prefix in SPLITS.values()
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
)
#: Class names in label order, as ``torchvision.datasets.FashionMNIST.classes`` spells them.
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _not_installed(paths: list[Path], extra: str = "") -> FileNotFoundError:
    """The error for missing package files: which ones, and how to install them."""
    return FileNotFoundError(
        f"Fashion-MNIST is not installed: {', '.join(str(p) for p in paths)} not found. Install "
        f"the Debian package {DEBIAN_PACKAGE} (`sudo apt-get install {DEBIAN_PACKAGE}`)"
        f"{extra}."
    )


@functools.lru_cache(maxsize=4)
def _read(split: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's images and labels of one split, read from a temporary raw folder."""
    from torchvision.datasets import FashionMNIST

    with tempfile.TemporaryDirectory() as root:
        prepare_torchvision_raw(root, source)
        try:
            dataset = FashionMNIST(root, train=split == "train", download=False)
        except (AssertionError, RuntimeError, ValueError) as err:  # torchvision asserts
            raise ValueError(f"The idx files in {source} are not Fashion-MNIST: {err!r}") from err
    images, labels = dataset.data.numpy(), dataset.targets.numpy().astype(np.int64)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"The idx files in {source} are not Fashion-MNIST: images {images.dtype} "
            f"{images.shape}, labels {labels.shape}."
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load(
    split: str = "train",
    num_images: Optional[int] = None,
    source_dir: Optional[os.PathLike | str] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of Fashion-MNIST's ``train`` (60,000) or ``test`` (10,000) split.

    Read by ``torchvision.datasets.FashionMNIST`` (cached per process).

    Args:
        split: ``train`` or ``test`` (the package's ``t10k`` files).
        num_images: Keep the first N images, in file order (all if None).
        source_dir: Folder of the gzipped idx files (default: the Debian package's).

    Returns:
        Writable arrays: images as uint8 (N, 28, 28) and labels as int64 (N,) in [0, 10), in
        the order of the files.

    Raises:
        FileNotFoundError: The package is not installed; the message says how to install it.
        ValueError: Unknown split, more images asked for than the split has, or bad files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if num_images is not None and num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}.")
    source = (DEBIAN_DIR if source_dir is None else Path(source_dir)).resolve()
    images, labels = _read(split, source)
    if num_images is not None and num_images > len(images):
        raise ValueError(
            f"The {split} split holds only {len(images)} entries, {num_images} requested."
        )
    return images[:num_images].copy(), labels[:num_images].copy()


def prepare_torchvision_raw(
    root: os.PathLike | str, source_dir: Optional[os.PathLike | str] = None
) -> Path:
    """Makes ``torchvision.datasets.FashionMNIST(root, download=False)`` work offline.

    Gunzips the package's four idx files into ``<root>/FashionMNIST/raw/``. Files already there
    are kept as they are, so a second call does nothing and a user may put the idx files there
    by hand. Each file is written under a unique temporary name and renamed into place, so
    several processes (DDP ranks) may prepare the same root at once and an interrupted run
    leaves no half-written file under the final name.

    Args:
        root: The ``root`` that will be given to torchvision.
        source_dir: Folder of the gzipped idx files (default: the Debian package's).

    Returns:
        The ``raw`` folder.

    Raises:
        FileNotFoundError: Files missing from both places (nothing is created then); the
            message names the Debian package.
    """
    source = DEBIAN_DIR if source_dir is None else Path(source_dir)
    raw = Path(root) / "FashionMNIST" / "raw"
    missing = [name for name in FILES if not (raw / name).is_file()]
    if not missing:
        return raw
    absent = [source / f"{name}.gz" for name in missing if not (source / f"{name}.gz").is_file()]
    if absent:
        raise _not_installed(absent, f", or put the gunzipped idx files into {raw}")
    raw.mkdir(parents=True, exist_ok=True)
    for name in missing:
        handle, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=raw)
        try:
            with gzip.open(source / f"{name}.gz", "rb") as src, os.fdopen(handle, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, raw / name)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return raw

"""The shared Fashion-MNIST reader: the loader (torchvision's reader) and torchvision's raw folder."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision

from recipes import fashion_mnist

INSTALLED = all((fashion_mnist.DEBIAN_DIR / f"{name}.gz").is_file() for name in fashion_mnist.FILES)
needs_data = pytest.mark.skipif(
    not INSTALLED, reason=f"Debian package {fashion_mnist.DEBIAN_PACKAGE} not installed"
)


def write_idx(path: Path, array: np.ndarray, type_code: int, compress: bool) -> Path:
    """An idx file written by hand from the format's definition (big-endian header and data)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_source(
    folder: Path, pixels: dict[str, np.ndarray], labels: dict[str, np.ndarray]
) -> Path:
    """The four gzipped idx files of a made-up Fashion-MNIST, as the Debian package lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix in fashion_mnist.SPLITS.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", pixels[split], 0x08, compress=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[split], 0x08, compress=True)
    return folder


def test_load_reads_hand_written_files(tmp_path: Path) -> None:
    pixels = {
        s: np.arange(n * 28 * 28, dtype=np.uint8).reshape(n, 28, 28)
        for s, n in (("train", 3), ("test", 2))
    }
    labels = {"train": np.array([9, 0, 4], np.uint8), "test": np.array([1, 2], np.uint8)}
    source = write_source(tmp_path / "source", pixels, labels)
    for split in ("train", "test"):
        images, targets = fashion_mnist.load(split, source_dir=source)
        assert images.dtype == np.uint8 and targets.dtype == np.int64
        np.testing.assert_array_equal(images, pixels[split])
        np.testing.assert_array_equal(targets, labels[split])
        images[0, 0, 0] = 7  # writable, so torch.from_numpy and in-place edits work
    few, _ = fashion_mnist.load("train", num_images=2, source_dir=source)
    np.testing.assert_array_equal(few, pixels["train"][:2])  # the edit above did not stick
    with pytest.raises(ValueError, match="holds only 3 entries"):
        fashion_mnist.load("train", num_images=4, source_dir=source)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    flat = {"train": np.zeros((2, 3), np.uint8), "test": np.zeros((2, 3), np.uint8)}
    source = write_source(tmp_path / "flat", flat, {s: np.zeros(2, np.uint8) for s in flat})
    with pytest.raises(ValueError, match="not Fashion-MNIST"):
        fashion_mnist.load("train", source_dir=source)
    (source / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04 a zip file"))
    with pytest.raises(ValueError, match="not Fashion-MNIST"):
        fashion_mnist.load("train", source_dir=source)


@needs_data
@pytest.mark.parametrize("split,size", [("train", 60_000), ("test", 10_000)])
def test_load_installed_split(split: str, size: int) -> None:
    images, labels = fashion_mnist.load(split)
    assert images.shape == (size, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (size,) and labels.dtype == np.int64
    # Both splits are balanced over the 10 classes.
    counts = np.bincount(labels, minlength=len(fashion_mnist.CLASS_NAMES))
    assert counts.tolist() == [size // 10] * 10
    few_images, few_labels = fashion_mnist.load(split, num_images=5)
    np.testing.assert_array_equal(few_images, images[:5])
    np.testing.assert_array_equal(few_labels, labels[:5])
    with pytest.raises(ValueError, match=f"only {size} entries"):
        fashion_mnist.load(split, num_images=size + 1)


def test_load_rejects_an_unknown_split() -> None:
    with pytest.raises(ValueError, match="split must be one of train, test"):
        fashion_mnist.load("t10k")


def test_missing_directory_names_the_debian_package(tmp_path: Path) -> None:
    install = "apt-get install dataset-fashion-mnist"
    with pytest.raises(FileNotFoundError, match=install) as error:
        fashion_mnist.load("test", source_dir=tmp_path / "absent")
    assert "t10k-images-idx3-ubyte.gz" in str(error.value)
    with pytest.raises(FileNotFoundError, match=install):
        fashion_mnist.prepare_torchvision_raw(tmp_path / "root", source_dir=tmp_path / "absent")
    assert not (tmp_path / "root").exists()  # nothing half-made is left behind


@needs_data
def test_prepare_torchvision_raw_is_idempotent_and_torchvision_reads_it(tmp_path: Path) -> None:
    raw = fashion_mnist.prepare_torchvision_raw(tmp_path)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(fashion_mnist.FILES)
    stamps = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}

    # A second call keeps the files as they are and needs no source any more.
    assert fashion_mnist.prepare_torchvision_raw(tmp_path, source_dir=tmp_path / "absent") == raw
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == stamps

    for train, split in ((True, "train"), (False, "test")):
        dataset = torchvision.datasets.FashionMNIST(str(tmp_path), train=train, download=False)
        images, labels = fashion_mnist.load(split, num_images=1)
        np.testing.assert_array_equal(dataset.data[0].numpy(), images[0])
        assert dataset.targets[0].item() == labels[0]
    assert tuple(dataset.classes) == fashion_mnist.CLASS_NAMES


@needs_data
def test_prepare_torchvision_raw_fills_in_only_missing_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    kept = raw / fashion_mnist.FILES[0]
    kept.write_bytes(b"placed by hand")
    fashion_mnist.prepare_torchvision_raw(tmp_path)
    assert kept.read_bytes() == b"placed by hand"
    with gzip.open(fashion_mnist.DEBIAN_DIR / f"{fashion_mnist.FILES[1]}.gz") as f:
        assert (raw / fashion_mnist.FILES[1]).read_bytes() == f.read()
    assert not [p for p in os.listdir(raw) if p.endswith(".partial")]

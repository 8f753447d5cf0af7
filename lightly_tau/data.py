"""Datasets that hand the dataset index to the loss."""

from __future__ import annotations

from typing import Any, Sized

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a dataset so that each item ends with its integer index: ``(*dataset[i], i)``.

    The stateful losses key their per-sample state by this index. Works for torchvision datasets
    (``([x0, x1], target, i)`` with Lightly's ``SimCLRTransform``) and ``LightlyDataset``
    (``(sample, target, fname, i)``) alike, so a Lightly example reads ``batch[0]`` as before and
    ``batch[-1]`` for the index. An item that is not a tuple becomes ``(item, i)``.

    Examples:
        >>> dataset = IndexedDataset(torchvision.datasets.CIFAR10("data", transform=SimCLRTransform()))
        >>> (x0, x1), target, index = dataset[5]
        >>> index
        5
    """

    def __init__(self, dataset: Dataset) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError("IndexedDataset needs a map-style dataset with __len__.")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)

    def __getattr__(self, name: str) -> Any:
        # Forward attributes such as ``classes`` or ``targets`` to the wrapped dataset, but not
        # dunder names: the DataLoader calls ``__getitems__`` when present (``Subset`` has it),
        # and forwarding it would fetch batches from the wrapped dataset without the index.
        if name == "dataset" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self.dataset, name)

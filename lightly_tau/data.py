"""Datasets that hand the dataset index to the loss."""

from __future__ import annotations

from typing import Any, Callable, Sized

import torch
from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a dataset so that each item ends with its integer index: ``(*dataset[i], i)``.

    The stateful losses key their per-sample state by this index. Works for torchvision datasets
    (``([x0, x1], target, i)`` with Lightly's ``SimCLRTransform``) and ``LightlyDataset``
    (``(sample, target, fname, i)``) alike, so a Lightly example reads ``batch[0]`` as before and
    ``batch[-1]`` for the index. An item that is not a tuple becomes ``(item, i)``.

    Args:
        dataset: A map-style dataset (with ``__len__`` and ``__getitem__``): a torchvision
            dataset, a ``LightlyDataset``, a ``Subset``, your own. Other attributes (``classes``,
            ``targets``, ...) are forwarded to it.

    Raises:
        TypeError: If ``dataset`` has no ``__len__`` (an iterable-style dataset).

    Examples:
        >>> import torchvision
        >>> dataset = IndexedDataset(torchvision.datasets.FakeData(10, (3, 32, 32)))
        >>> image, target, index = dataset[5]
        >>> index, len(dataset)
        (5, 10)
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


class IndexedCollate:
    """Wraps a collate function so that it passes the index of an :class:`IndexedDataset` on.

    Collate functions written for three-field items, such as Lightly's ``MultiViewCollate``
    (``(views, target, filename)``), fail on the index as a fourth field. This one hands each
    item without its index to ``collate_fn`` and appends the batch's indices as an int64 tensor:
    the batch becomes ``(*collate_fn(items), index)``, so ``batch[0]`` is unchanged and
    ``batch[-1]`` is the index.

    Args:
        collate_fn: The collate function for the items without their index, e.g. Lightly's
            ``MultiViewCollate()``; called with a list of items, it returns the batch.

    Examples:
        >>> from torch.utils.data import default_collate
        >>> items = [(torch.zeros(2), 0, 7), (torch.ones(2), 1, 3)]  # (x, target, index)
        >>> batch = IndexedCollate(default_collate)(items)
        >>> batch[-1]  # the batch's indices
        tensor([7, 3])

        With Lightly: ``DataLoader(IndexedDataset(LightlyDataset(folder, transform=...)),
        collate_fn=IndexedCollate(MultiViewCollate()))``, then
        ``(x0, x1), index = batch[0], batch[-1]``.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        batch = self.collate_fn([item[:-1] for item in items])
        index = torch.tensor([item[-1] for item in items], dtype=torch.long)
        if isinstance(batch, tuple):
            return (*batch, index)
        return (batch, index)

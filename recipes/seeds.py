"""Seeds of the recipes' random streams, independent for every (seed, purpose, epoch, ...).

Adding the epoch (or 1) to a seed makes streams of neighbouring seeds overlap: with
``DistributedSampler``'s ``seed + epoch``, seed 1's first epoch is seed 0's second. Every seed
here comes from :class:`numpy.random.SeedSequence` over all its parts instead.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterator, Optional, Sized, Union

import numpy as np
import torch
from torch.utils.data import Sampler

Part = Union[int, str]


def derive_seed(seed: int, *parts: Part) -> int:
    """A 63-bit seed for the stream named by ``parts`` (strings and integers) of ``seed``.

    Examples:
        >>> derive_seed(0, "sampler", 1) != derive_seed(1, "sampler", 0)
        True
    """
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF]
    for part in parts:
        words.append(zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & 0xFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _process_group() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class SeededShuffleSampler(Sampler[int]):
    """A shuffled order per epoch from ``derive_seed(seed, "sampler", epoch)``, split over ranks.

    What ``DistributedSampler(shuffle=True, drop_last=False)`` does (indices padded to a multiple
    of the world size, rank r taking every world_size-th one from r), except that the order of
    each epoch is drawn from its own derived seed. The process group is read when iterating, so
    one sampler serves a single process and every rank of a Lightning DDP run (give the Trainer
    ``use_distributed_sampler=False``); Lightning calls ``set_epoch`` at every epoch start.
    """

    def __init__(
        self,
        data: Sized,
        seed: int,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        self.size = len(data)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _layout(self) -> tuple[int, int]:
        world, rank = _process_group()
        world = self.num_replicas or world
        rank = self.rank if self.rank is not None else rank
        return world, rank

    def __len__(self) -> int:
        return math.ceil(self.size / self._layout()[0])

    def __iter__(self) -> Iterator[int]:
        world, rank = self._layout()
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "sampler", self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        total = math.ceil(self.size / world) * world
        order += order[: total - self.size]
        return iter(order[rank:total:world])

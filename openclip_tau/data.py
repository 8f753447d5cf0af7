"""OpenCLIP training data that carries each sample's table index to the loss.

``open_clip_train`` builds its training set in ``open_clip_train.data`` and its training loop
unpacks every batch strictly as ``images, texts = batch``. The stateful losses also need the
index of each pair, so the training set is built by upstream's own functions with a few of the
names in ``open_clip_train.data`` swapped while it is built (:func:`indexed_train_data`):

- webdataset: ``to_tuple("image", "text")`` also keeps ``__key__`` and ``__url__``, and the
  time-seeded sample shuffle becomes one seeded by (seed, epoch, rank, worker); with
  ``--dataset-resampled`` the shard sampler is seeded the same way (upstream seeds it from the
  DataLoader's worker seed, which depends on how many epochs this process has run), so a resumed
  run sees the same samples in the same order as one that was not interrupted, with any number
  of data workers. The shard shuffle is seeded by (seed, epoch) (upstream: seed + epoch), and
  the loader draws its workers' base seed from a generator of its own: a persistent-worker
  loader draws it once, in the first epoch the process runs, and from the main generator that
  would shift every later random draw of the main process (dropout) in a resumed run;
- csv: the dataset also returns the row number; synthetic: the item number. Under torchrun the
  ``DistributedSampler``'s order is seeded by (--seed, epoch) (upstream: 0 + epoch), so the order
  follows ``--seed`` in one process and in several.

Every seeded stream is :func:`derive_seed` of a stream name and (seed, epoch, rank, worker, ...)
hashed together, never seed + epoch, so ``--seed s`` and ``--seed s+1`` share no order.

:class:`IndexedLoader` then maps each batch's keys (or row numbers) to table indices in the main
process, hands them to a callback, and yields ``(images, texts)`` as upstream expects.

Also here: the webdataset 1.0.2 end-of-shard fix for ``open_clip_train``'s own shard reader
(:func:`tarfile_to_samples_nothrow`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from open_clip_train import data as upstream_data
from torch import Tensor
from torch.utils.data import get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import tar_file_expander, url_opener

from openclip_tau.key_index import KeyIndex, MissingKeyError


class SampleKeyError(ValueError):
    """A training sample whose key cannot index the per-sample table (message: key and shard).

    ``python -m openclip_tau.train`` prints it as one line (the rank that read the sample) and
    exits with code 2.
    """


# ------------------------------------------------------------------ webdataset 1.0.2 fix
def _drop_end_of_shard_markers(files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    # webdataset 1.0.2 yields an empty dict after each shard; open_clip_train's grouper reads
    # filesample["fname"] and fails on it (KeyError: 'fname'). Its grouper already starts a new
    # sample when a key or a suffix repeats, so dropping the marker is all it needs.
    return (f for f in files if f)


def _closed_after_use(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    # webdataset 1.0.2 never closes the shard files it opens (ResourceWarning: unclosed file).
    # The expander asks for the next shard only when it is done with this one; the finally also
    # runs when the pipeline stops early (the generator is closed or collected).
    for source in sources:
        try:
            yield source
        finally:
            source["stream"].close()


def tarfile_to_samples_nothrow(
    src: Iterator[dict[str, Any]], handler: Optional[Callable[[Exception], bool]] = None
) -> Iterator[dict[str, Any]]:
    """``open_clip_train.data.tarfile_to_samples_nothrow`` that works with webdataset 1.0.2.

    Each shard's file is closed once its samples are read, or when the pipeline stops early.

    Args:
        src: Shard descriptions, each a dict with the shard's ``"url"``.
        handler: Called with each error while reading; returns True to go on. Default None:
            upstream's ``log_and_continue`` (logs the error and skips the shard's rest).

    Returns:
        The samples, one dict per key (``"__key__"``, ``"__url__"`` and one entry per file).
    """
    handler = handler or upstream_data.log_and_continue
    streams = _closed_after_use(url_opener(src, handler=handler))
    files = tar_file_expander(streams, handler=handler)
    return upstream_data.group_by_keys_nothrow(_drop_end_of_shard_markers(files), handler=handler)


# ------------------------------------------------------------------ determinism
def derive_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed of one random stream from integers (seed, epoch, rank, worker, ...).

    SHA-256 of the stream's name and the integers written out in full (any size and sign), so
    distinct streams and distinct tuples get unrelated seeds (``--seed 1`` at epoch 0 has
    nothing in common with ``--seed 0`` at epoch 1), the same on every platform.

    Args:
        stream: The stream's name (``"samples"``, ``"shards"``, ``"worker"``, ...).
        *parts: Integers of any size and sign, e.g. (seed, epoch, rank, worker).

    Returns:
        A seed in [0, 2^63).
    """
    text = ":".join([stream, *(str(int(p)) for p in parts)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seeds ``torch``, ``random`` and ``numpy`` (what OpenCLIP's augmentations draw from).

    Args:
        seed: In [0, 2^64) (NumPy gets its two 32-bit halves).
    """
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


class EpochSeededShuffle(wds.PipelineStage):
    """webdataset's buffered sample shuffle, seeded by (seed, epoch, rank, worker, pass).

    Replaces upstream's sample shuffle, which seeds from the clock. Inside a DataLoader worker it
    also seeds the worker's random generators at each pass, so random augmentations depend on the
    epoch, not on how many epochs this process has run: a resumed run repeats them.

    Args:
        bufsize: Shuffle buffer size, >= 1 (upstream's ``_SAMPLE_SHUFFLE_SIZE``).
        initial: Samples buffered before the first is yielded, in [1, bufsize].
        seed: The run's ``--seed``.
        shared_epoch: Upstream's ``SharedEpoch`` (its ``get_value()`` is the epoch).
    """

    def __init__(self, bufsize: int, initial: int, seed: int, shared_epoch: Any) -> None:
        self.bufsize = bufsize
        self.initial = initial
        self.seed = seed
        self.shared_epoch = shared_epoch
        self._epoch = -1
        self._pass = 0  # passes over the shards within one epoch (an epoch can wrap around)

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        """The samples of ``src`` shuffled in a buffer, seeded for this epoch and pass."""
        epoch = self.shared_epoch.get_value()
        self._pass = self._pass + 1 if epoch == self._epoch else 0
        self._epoch = epoch
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        parts = (self.seed, epoch, rank, worker, self._pass)
        if get_worker_info() is not None:
            seed_everything(derive_seed("worker", *parts))
        rng = random.Random(derive_seed("samples", *parts))
        return _shuffle(src, self.bufsize, self.initial, rng)


class EpochSeededShardShuffle(upstream_data.detshuffle2):
    """``open_clip_train.data.detshuffle2`` (the shard shuffle without resampling) seeded by
    (seed, epoch): the same order on every rank and worker (it runs before the shards are
    split between them). Upstream seeds it with seed + epoch.

    Its arguments are upstream's ``detshuffle2``'s (``bufsize``, ``initial``, ``seed``,
    ``epoch``: a ``SharedEpoch`` or an integer counted up at each pass).
    """

    def run(self, src: Iterator[Any]) -> Iterator[Any]:
        """The shards of ``src`` shuffled, seeded by (seed, epoch)."""
        if hasattr(self.epoch, "get_value"):
            epoch = self.epoch.get_value()
        else:  # upstream's own count when no shared epoch is given
            self.epoch += 1
            epoch = self.epoch
        rng = random.Random(derive_seed("shards", self.seed, epoch))
        return _shuffle(src, self.bufsize, self.initial, rng)


class EpochSeededResampledShards(upstream_data.ResampledShards2):
    """``open_clip_train.data.ResampledShards2`` (shards drawn with replacement) seeded by
    (seed, epoch, rank, worker).

    Upstream seeds it with the DataLoader worker's seed plus the epoch; that worker seed is drawn
    from the main process's generator when the (persistent) workers start, i.e. at the first
    epoch this process runs, so a run resumed at epoch k drew other shards than an uninterrupted
    one. Here the draw depends on the epoch only.

    Args:
        urls: The shard URLs, as for upstream's class.
        *args: Upstream's positional arguments.
        seed: The run's ``--seed``. Default 0.
        **kwargs: Upstream's keywords (``weights``, ``nshards``, ``worker_seed``, ``epoch``).
    """

    def __init__(self, urls: Any, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(urls, *args, **kwargs)
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        # The epoch upstream's __iter__ will use: a SharedEpoch's value, or its integer + 1.
        epoch = self.epoch.get_value() if hasattr(self.epoch, "get_value") else self.epoch + 1
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        self.rng.seed(derive_seed("resampled-shards", self.seed, epoch, rank, worker))
        self.deterministic = False  # seeded above; upstream's own seeding is skipped
        yield from super().__iter__()


class EpochSeededDistributedSampler(torch.utils.data.DistributedSampler):
    """``torch.utils.data.DistributedSampler`` whose order is seeded by (seed, epoch).

    Upstream's permutation is seeded by ``seed + epoch``, so ``--seed 1`` in epoch 0 would
    repeat ``--seed 0`` in epoch 1. Padding, truncation and the split between ranks are
    upstream's. Its arguments are ``DistributedSampler``'s (``seed`` is the run's ``--seed``).
    """

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return super().__iter__()
        generator = torch.Generator()
        generator.manual_seed(derive_seed("sampler", self.seed, self.epoch))
        indices = torch.randperm(len(self.dataset), generator=generator).tolist()
        if not self.drop_last:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        else:
            indices = indices[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


# ------------------------------------------------------------------ indexed datasets
_SharedEpoch = upstream_data.SharedEpoch  # the class itself, whatever is patched in later


class IndexedCsvDataset(upstream_data.CsvDataset):
    """Upstream's ``CsvDataset`` returning ``(image, text, row)``: the row number is the index."""

    def __getitem__(self, idx: int) -> tuple[Any, Any, int]:
        return (*super().__getitem__(idx), idx)


class IndexedSyntheticDataset(upstream_data.SyntheticDataset):
    """Upstream's ``SyntheticDataset`` returning ``(image, text, item)``."""

    def __getitem__(self, idx: int) -> tuple[Any, Any, int]:
        return (*super().__getitem__(idx), idx)


class _IndexedWebdataset:
    """Stands in for the ``webdataset`` module inside ``open_clip_train.data`` while the
    training set is built: keeps each sample's key and shard, and seeds the sample shuffle."""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed = seed
        self.rank = rank
        self.shared_epoch: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(wds, name)

    def record_shared_epoch(self, epoch: int = 0) -> Any:
        self.shared_epoch = _SharedEpoch(epoch)
        return self.shared_epoch

    def shuffle(self, bufsize: int = 1000, initial: int = 100, **kwargs: Any) -> Any:
        if kwargs or self.shared_epoch is None:
            raise RuntimeError(
                "open_clip_train's webdataset pipeline is not the one openclip_tau supports "
                "(open-clip-torch 3.3): unexpected sample shuffle."
            )
        return EpochSeededShuffle(bufsize, initial, self.seed, self.shared_epoch)

    def WebLoader(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - webdataset's name
        # The workers' base seed comes from this generator, not from the main process's: a
        # persistent-worker loader draws it only in the first epoch a process runs, so a draw
        # from the main generator would shift the model's random draws (dropout) after a resume.
        # (The workers' generators are seeded again by EpochSeededShuffle at every pass.)
        generator = torch.Generator().manual_seed(derive_seed("loader", self.seed, self.rank))
        return wds.WebLoader(*args, generator=generator, **kwargs)

    def to_tuple(self, *fields: str, **kwargs: Any) -> Any:
        if fields != ("image", "text") or kwargs:
            raise RuntimeError(
                "open_clip_train's webdataset pipeline is not the one openclip_tau supports "
                f"(open-clip-torch 3.3): it packs {fields}."
            )
        return wds.to_tuple("image", "text", "__key__", "__url__")


@contextlib.contextmanager
def patched(module: Any, **replacements: Any) -> Iterator[None]:
    """Temporarily replaces attributes of ``module`` (restored on exit, even on error).

    Args:
        module: Any object with the attributes (a module, usually).
        **replacements: Attribute name to its value while the context is active; each name
            must exist.

    Raises:
        AttributeError: ``module`` has no attribute of one of the names (nothing replaced).
    """
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def indexed_train_data(
    args: Any, preprocess_train: Callable, epoch: int, tokenizer: Any
) -> upstream_data.DataInfo:
    """The training set of ``args`` built by ``open_clip_train.data``, with an index per pair.

    Batches are ``(images, texts, index)`` for csv and synthetic data and
    ``(images, texts, keys, shard_urls)`` for webdataset; wrap the loader in
    :class:`IndexedLoader` before upstream's training loop sees it.

    Args:
        args: ``open_clip_train``'s parsed options (``train_data``, ``dataset_type``,
            ``seed``, ``rank``, ...).
        preprocess_train: The training transform.
        epoch: The epoch to start at, >= 0.
        tokenizer: The model's tokenizer.

    Returns:
        Upstream's ``DataInfo`` of the training set.

    Raises:
        RuntimeError: Upstream's webdataset pipeline is not the one supported
            (open-clip-torch 3.3): another sample shuffle or other fields packed.
    """
    fake_wds = _IndexedWebdataset(seed=args.seed, rank=getattr(args, "rank", 0))
    with patched(
        upstream_data,
        wds=fake_wds,
        SharedEpoch=fake_wds.record_shared_epoch,
        CsvDataset=IndexedCsvDataset,
        SyntheticDataset=IndexedSyntheticDataset,
        tarfile_to_samples_nothrow=tarfile_to_samples_nothrow,
        ResampledShards2=functools.partial(EpochSeededResampledShards, seed=args.seed),
        detshuffle2=EpochSeededShardShuffle,
        DistributedSampler=functools.partial(EpochSeededDistributedSampler, seed=args.seed),
    ):
        build = upstream_data.get_dataset_fn(args.train_data, args.dataset_type)
        return build(args, preprocess_train, is_train=True, epoch=epoch, tokenizer=tokenizer)


# ------------------------------------------------------------------ keys to indices
class SampleIndexer:
    """Maps a batch's sample identities to per-sample table indices, with errors naming the key.

    - row or item numbers (csv, synthetic) are the index;
    - webdataset keys go through a :class:`~openclip_tau.key_index.KeyIndex` when one is given,
      else are read as integers (img2dataset's keys are digit strings), as FastCLIP does.

    Called with a batch's identities (a tensor of row numbers, or a list of keys) and,
    for webdataset, the shards they came from (named in errors); returns the indices as int64.

    Args:
        num_samples: Table size, >= 1; every index must lie in [0, num_samples).
        key_index: Dense key map. Default None: keys are read as integers.

    Raises:
        SampleKeyError: (at a call) A key not in the key index, a key that is not an integer
            (without a key index), or an index outside [0, num_samples).
    """

    def __init__(self, num_samples: int, key_index: Optional[KeyIndex] = None) -> None:
        self.num_samples = num_samples
        self.key_index = key_index

    def __call__(self, ident: Any, urls: Optional[Sequence[str]] = None) -> Tensor:
        if isinstance(ident, Tensor):
            return self._checked(ident.long(), None, None)  # the key is the index itself
        keys = [str(k) for k in ident]
        if self.key_index is not None:
            try:
                index = torch.from_numpy(self.key_index.indices(keys))
            except MissingKeyError as err:
                shard = urls[keys.index(err.key)] if urls else "?"
                raise SampleKeyError(f"{err} (shard {shard})") from None
            return self._checked(index, keys, urls)
        values = []
        for k, key in enumerate(keys):
            try:
                values.append(int(key))
            except ValueError:
                raise SampleKeyError(
                    f"Sample key {key!r} (shard {urls[k] if urls else '?'}) is not an integer, so "
                    "it cannot index the per-sample table directly. Build a key index with "
                    "python -m openclip_tau.key_index --shards <pattern> --output <file> and "
                    "pass --tau-key-index <file>."
                ) from None
        return self._checked(torch.tensor(values, dtype=torch.long), keys, urls)

    def _checked(
        self, index: Tensor, keys: Optional[Sequence[str]], urls: Optional[Sequence[str]]
    ) -> Tensor:
        bad = ((index < 0) | (index >= self.num_samples)).nonzero()
        if len(bad):
            k = int(bad[0])
            key = keys[k] if keys is not None else str(int(index[k]))
            where = f" (shard {urls[k]})" if urls else ""
            raise SampleKeyError(
                f"Sample key {key!r}{where} gives index {int(index[k])}, outside the "
                f"per-sample table [0, {self.num_samples}). Pass --tau-num-samples larger than "
                "every key, or a key index built over these shards (--tau-key-index)."
            )
        return index


class IndexedLoader:
    """Yields ``(images, texts)`` from a loader of indexed batches, handing each batch's table
    indices to ``on_batch`` first; other attributes (``num_batches``, ...) are the loader's.

    Args:
        dataloader: A loader of batches built by :func:`indexed_train_data`:
            ``(images, texts, index)`` or ``(images, texts, keys, shard_urls)``.
        indexer: Maps each batch's identities to table indices.
        on_batch: Called with each batch's indices before the batch is yielded.

    Raises:
        RuntimeError: (while iterating) A batch of another number of fields.
        SampleKeyError: (while iterating) A key the indexer refuses.
    """

    def __init__(
        self, dataloader: Any, indexer: SampleIndexer, on_batch: Callable[[Tensor], None]
    ) -> None:
        self.dataloader = dataloader
        self.indexer = indexer
        self.on_batch = on_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.dataloader:
            if len(batch) == 3:
                images, texts, ident = batch
                urls = None
            elif len(batch) == 4:
                images, texts, ident, urls = batch
            else:
                raise RuntimeError(
                    f"Expected indexed batches of 3 or 4 fields, got {len(batch)}: the training "
                    "set was not built by openclip_tau.data.indexed_train_data."
                )
            self.on_batch(self.indexer(ident, urls))
            yield images, texts

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name: str) -> Any:
        if name == "dataloader":
            raise AttributeError(name)
        return getattr(self.dataloader, name)

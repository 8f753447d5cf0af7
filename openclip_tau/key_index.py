"""A dense map from webdataset sample keys to per-sample table indices, built once over the shards.

img2dataset names samples by sparse string keys (shard number then position, e.g. ``"000010023"``),
so they cannot index a per-sample table directly without wasting rows. This module lists the keys
of every shard once and writes them to a text file kept beside the shards::

    python -m openclip_tau.key_index --shards "/data/cc3m/{00000..00331}.tar" \\
        --output /data/cc3m/key_index.txt

File format (plain text, UTF-8): header lines start with ``#``; ``# shard <name> <count>`` lines
list the shards it was built from (by file name) in order; every other line is one key, and the
key on the k-th key line gets index k. Keys follow shard order, then the order inside each shard,
so index k can be traced back to its sample (and caption) by reading line k.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

# webdataset is imported where it is used: it imports torch, which ``--help`` does not need.

FORMAT_LINE = "# openclip_tau key index v1: line k after the header is the key of index k"


class MissingKeyError(ValueError):
    """A sample key that the key index does not contain.

    Args:
        key: The key (kept as :attr:`key`).
        message: The error message.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def expand_shards(shards: Union[str, Sequence[str]]) -> list[str]:
    """Shard paths from brace patterns, joined by ``::`` as in ``--train-data``, or a list.

    Args:
        shards: ``"/data/{00000..00009}.tar"`` (``::`` joins several patterns) or a list of
            patterns or paths.

    Returns:
        The shard paths or URLs, in order.

    Raises:
        ValueError: No shard matches.
    """
    if isinstance(shards, str):
        shards = shards.split("::")
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for pattern in shards:
        urls.extend(expand_urls(pattern))
    if not urls:
        raise ValueError(f"No shards match {shards!r}.")
    return urls


def shard_name(url: str) -> str:
    """The file name of a shard path or URL (what the index records).

    Args:
        url: A path or URL; a query string (``?...``) and trailing slashes are dropped.
    """
    return os.path.basename(url.split("?")[0].rstrip("/"))


class ShardReadError(ValueError):
    """A shard that is not a complete tar file (truncated, or another format)."""


def _member_names(url: str) -> Iterator[str]:
    """Names of the members of one tar shard, local (seeking past data) or remote (streamed).

    A local uncompressed shard cut short (a member's data past the end of the file, or no
    end-of-archive marker after the last member: ``tarfile`` lists such copies without
    complaint) raises :class:`tarfile.ReadError`.
    """
    if os.path.exists(url):
        # Offsets are positions in the file only when it is not compressed.
        size = None if _compressed(url) else os.path.getsize(url)
        with tarfile.open(url, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                end = member.offset_data + member.size
                if size is not None and end > size:
                    raise tarfile.ReadError(
                        f"member {member.name} ends at byte {end} of a {size}-byte file"
                    )
                yield member.name
            if size is not None:
                _check_end_of_archive(url, tar.offset, size)
    else:
        from webdataset import gopen

        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name


def _check_end_of_archive(url: str, offset: int, size: int) -> None:
    """Raises unless the members end in tar's end-of-archive marker (zero blocks to the end).

    ``tarfile`` stops listing, without an error, at a header cut short after the first member.
    """
    with open(url, "rb") as f:
        f.seek(offset)
        rest = f.read()
    if len(rest) < tarfile.BLOCKSIZE or rest.count(0) != len(rest):
        raise tarfile.ReadError(
            f"no end-of-archive marker after the member ending at byte {offset} of a "
            f"{size}-byte file"
        )


def _compressed(url: str) -> bool:
    with open(url, "rb") as f:
        magic = f.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"


def shard_keys(url: str) -> list[str]:
    """Sample keys of one shard in order, split from member names as webdataset does.

    Args:
        url: A local path (complete tar checked) or anything webdataset's ``gopen`` opens.

    Returns:
        The keys, each once, in the order of their first member (metadata members skipped).

    Raises:
        ShardReadError: The shard is truncated or not a tar file (the message names it).
    """
    try:
        return _shard_keys(url)
    except (tarfile.TarError, EOFError) as err:
        lines = [line.strip("- ") for line in str(err).splitlines() if line.strip()]
        # tarfile's "r:*" lists one reason per compression it tried: the tar one is the one.
        reason = next(
            (x[len("method tar: ") :] for x in lines if x.startswith("method tar: ")), None
        )
        reason = reason or "; ".join(lines)
        raise ShardReadError(
            f"Shard {url} is not a complete tar file (truncated, or not a tar): {reason}."
        ) from None


def _shard_keys(url: str) -> list[str]:
    from webdataset.tariterators import base_plus_ext

    keys: dict[str, None] = {}  # insertion-ordered set
    for name in _member_names(url):
        key, _ = base_plus_ext(name)
        # webdataset skips top-level metadata members such as __index__.
        if key is None or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        keys[key] = None
    return list(keys)


def build_key_index(shards: Union[str, Sequence[str]], output: Union[str, os.PathLike]) -> int:
    """Lists the keys of every shard and writes the key index to ``output``.

    Args:
        shards: Brace pattern(s) as given to ``--train-data`` (``::`` joins several), or a list
            of shard paths or URLs (anything webdataset's ``gopen`` opens).
        output: Path of the text file to write (see the module docstring for the format).

    Returns:
        The number of keys, which is the per-sample table size (``--tau-num-samples``).

    Raises:
        ValueError: If no shard matches, a shard holds no samples, two shards have the same file
            name, or a key occurs twice (keys must identify samples across all shards).
    """
    urls = expand_shards(shards)
    names = [shard_name(url) for url in urls]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Shard file names must be unique; repeated: {duplicates[:5]}.")
    seen: dict[str, str] = {}
    per_shard: list[tuple[str, list[str]]] = []
    for url, name in zip(urls, names):
        keys = shard_keys(url)
        if not keys:
            raise ValueError(f"Shard {url} holds no samples.")
        for key in keys:
            if key in seen:
                raise ValueError(
                    f"Key {key!r} occurs in shard {seen[key]} and again in shard {name}; "
                    "keys must be unique across shards to identify samples."
                )
            seen[key] = name
        per_shard.append((name, keys))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(FORMAT_LINE + "\n")
        for name, keys in per_shard:
            f.write(f"# shard {name} {len(keys)}\n")
        for _, keys in per_shard:
            f.write("\n".join(keys) + "\n")
    os.replace(tmp, output)  # never leave a half-written index under the final name
    return len(seen)


class KeyIndex:
    """A loaded key index: ``indices(keys)`` maps sample keys to table indices.

    Lookups use a sorted copy of the keys (bytes, 1 byte per character), so a map of 3 million
    img2dataset keys takes about 50 MB and a batch of keys costs one binary search.

    Attributes:
        keys: Keys in index order (``keys[k]`` is the key of index ``k``), as a list of str.
        shards: Shard file name to its number of samples, in build order.
        path: The file it was read from.

    Args:
        keys: Keys in index order, each once.
        shards: Shard file name to its number of samples, in build order.
        path: The file it was read from. Default ``""`` (built in memory).
    """

    def __init__(self, keys: Sequence[str], shards: dict[str, int], path: str = "") -> None:
        self.path = path
        self.shards = dict(shards)
        self._keys = np.array([k.encode() for k in keys], dtype=bytes)
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted = self._keys[self._order]

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[str]:
        return [k.decode() for k in self._keys.tolist()]

    def fingerprint(self) -> str:
        """SHA-256 of the keys in index order: equal exactly when every key has the same index.

        Stored in checkpoints, so that resuming with another key index (shards added, removed or
        reordered) is refused instead of attaching the saved state to other samples.
        """
        digest = hashlib.sha256()
        for key in self._keys.tolist():
            digest.update(key + b"\n")
        return "sha256:" + digest.hexdigest()

    def indices(self, keys: Iterable[str]) -> np.ndarray:
        """Table index of each key, as int64.

        Args:
            keys: Sample keys (anything ``str`` turns into one).

        Returns:
            The indices, shape (len(keys),), int64.

        Raises:
            MissingKeyError: A key that is not in the index (the first one; the message names
                the index file and says how to rebuild it).
        """
        query = np.array([str(k).encode() for k in keys], dtype=bytes)
        position = np.searchsorted(self._sorted, query)
        found = np.zeros(len(query), dtype=bool)
        inside = position < len(self._sorted)
        found[inside] = self._sorted[position[inside]] == query[inside]
        if not found.all():
            missing = query[~found][0].decode()
            raise MissingKeyError(
                missing,
                f"Sample key {missing!r} is not in the key index {self.path or '(in memory)'} "
                f"({len(self)} keys from {len(self.shards)} shards). Rebuild it over the "
                "training shards: python -m openclip_tau.key_index --shards ... --output ...",
            )
        return self._order[position].astype(np.int64)


def load_key_index(path: Union[str, os.PathLike]) -> KeyIndex:
    """Reads a key index written by :func:`build_key_index`.

    Args:
        path: The key index file.

    Returns:
        The loaded index.

    Raises:
        FileNotFoundError: No file at ``path`` (the message says how to build it).
        ValueError: The file is not a key index (first line) or is truncated (fewer keys
            than its header lists).
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Key index {path} does not exist; build it with "
            f"python -m openclip_tau.key_index --shards <pattern> --output {path}"
        )
    shards: dict[str, int] = {}
    keys: list[str] = []
    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\n")
        if first != FORMAT_LINE:
            raise ValueError(f"{path} is not an openclip_tau key index (first line {first!r}).")
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# shard "):
                name, count = line[len("# shard ") :].rsplit(" ", 1)
                shards[name] = int(count)
            elif line and not line.startswith("#"):
                keys.append(line)
    if sum(shards.values()) != len(keys):
        raise ValueError(
            f"Key index {path} is truncated: its header lists {sum(shards.values())} keys but "
            f"it holds {len(keys)}."
        )
    return KeyIndex(keys, shards, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m openclip_tau.key_index --shards PATTERN --output FILE``.

    Args:
        argv: The command line without the program name. Default None: ``sys.argv[1:]``.

    Returns:
        0 once the index is written.

    Raises:
        SystemExit: Code 2 with one line on stderr when the shards cannot be indexed (no
            match, a truncated shard, a repeated key or shard name), or for bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m openclip_tau.key_index",
        description="Build the key-to-index map of webdataset shards for openclip_tau.train "
        "(pass it as --tau-key-index).",
    )
    parser.add_argument(
        "--shards",
        required=True,
        help='Shards as a brace pattern, e.g. "/data/cc3m/{00000..00331}.tar" (join several '
        "with ::, as in --train-data).",
    )
    parser.add_argument(
        "--output", required=True, help="File to write, e.g. /data/cc3m/key_index.txt."
    )
    args = parser.parse_args(argv)
    try:
        count = build_key_index(args.shards, args.output)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"Wrote {count} keys to {args.output} (use --tau-key-index {args.output}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

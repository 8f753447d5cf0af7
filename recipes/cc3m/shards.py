"""img2dataset shards: finding them, their key format, and reading their captions.

img2dataset (``--output_format webdataset``) writes, per shard ``NNNNN``:

- ``NNNNN.tar`` with members ``<key>.jpg``, ``<key>.txt`` (the caption), ``<key>.json``;
- ``NNNNN.parquet``: one row per URL of the shard (also the failed ones), with ``key``,
  ``caption``, ``status`` (``success`` or why not), ``url``, sizes and errors;
- ``NNNNN_stats.json``: counts of successes and failures.

Keys are strings of digits, the shard number followed by the position in the shard
(``compute_key``). Failed downloads leave gaps, so keys are sparse, not dataset indices.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

from braceexpand import braceexpand

PathLike = Union[str, Path]

if TYPE_CHECKING:
    import pandas as pd


def compute_key(
    position: int, shard_id: int, oom_sample_per_shard: int = 4, oom_shard_count: int = 5
) -> str:
    """The key img2dataset gives the sample at ``position`` of shard ``shard_id``.

    ``oom_sample_per_shard`` is the number of digits of the shard size (4 for img2dataset's
    default of 10,000 samples per shard), ``oom_shard_count`` that of the shard count.
    """
    true_key = (10**oom_sample_per_shard) * shard_id + position
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


def find_shards(spec: PathLike) -> list[Path]:
    """The shard files named by ``spec``, sorted; raises ``FileNotFoundError`` naming what is missing.

    ``spec`` is a folder (all its ``.tar`` files), a brace pattern as OpenCLIP's
    ``--train-data`` takes (``/data/cc3m/{00000..00331}.tar``; every expanded file must
    exist), or a glob (``/data/cc3m/*.tar``).
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(
                f"no shards in {path}: the folder has no .tar files. Run the download step "
                "(recipes/cc3m/download.sh) or point to the folder img2dataset wrote."
            )
        return shards
    if "{" in text:
        names = list(braceexpand(text))
        missing = [name for name in names if not Path(name).is_file()]
        if len(missing) == len(names):
            raise FileNotFoundError(
                f"no shards match {text!r}: none of its {len(names)} files exists "
                f"(first: {names[0]})."
            )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(names)} shards of {text!r} are missing "
                f"(first missing: {missing[0]}); fix the pattern to the shards that exist."
            )
        return [Path(name) for name in names]
    if any(c in text for c in "*?["):
        shards = sorted(Path(name) for name in glob.glob(text))
        if not shards:
            raise FileNotFoundError(f"no shards match the glob {text!r}.")
        return shards
    if path.is_file():
        return [path]
    raise FileNotFoundError(
        f"shards not found: {text!r} is neither a folder, a file nor a pattern."
    )


def brace_pattern(shards: list[Path]) -> str:
    """A brace pattern for OpenCLIP's ``--train-data`` naming exactly ``shards``.

    Consecutive numeric names (img2dataset's) give ``folder/{00000..00041}.tar``; anything
    else is joined with ``::``, which OpenCLIP also accepts.
    """
    if not shards:
        raise ValueError("brace_pattern needs at least one shard.")
    folder = shards[0].parent
    stems = [s.stem for s in shards]
    same_folder = all(s.parent == folder for s in shards)
    numeric = all(stem.isdigit() and len(stem) == len(stems[0]) for stem in stems)
    if same_folder and numeric:
        numbers = [int(stem) for stem in stems]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            if len(stems) == 1:
                return str(shards[0])
            return f"{folder}/{{{stems[0]}..{stems[-1]}}}.tar"
    return "::".join(str(s) for s in shards)


def read_captions(shards: Iterable[Path]) -> pd.DataFrame:
    """Key and caption of every sample in ``shards`` (columns ``key``, ``caption``, ``shard``).

    Reads the ``.parquet`` file img2dataset writes beside each shard (rows with status
    ``success``), which is far faster than reading the tar files; shards without one are read
    with webdataset (their ``txt`` members).
    """
    import pandas as pd  # here, so that the command line (used by the shell scripts) starts fast

    frames = []
    for shard in shards:
        parquet = shard.with_suffix(".parquet")
        if parquet.is_file():
            table = pd.read_parquet(parquet, columns=["key", "caption", "status"])
            table = table[table["status"] == "success"][["key", "caption"]]
        else:
            table = pd.DataFrame(_tar_captions(shard), columns=["key", "caption"])
        table = table.assign(shard=shard.name)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["key", "caption", "shard"])
    captions = pd.concat(frames, ignore_index=True)
    captions["key"] = captions["key"].astype(str)
    captions["caption"] = captions["caption"].fillna("").astype(str)
    return captions


def _tar_captions(shard: Path) -> list[tuple[str, str]]:
    import webdataset as wds

    rows = []
    dataset = wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)
    for sample in dataset:
        # webdataset 1.0.2 yields an empty sample at the end of a shard; skip anything captionless.
        if "txt" not in sample or "__key__" not in sample:
            continue
        text = sample["txt"]
        rows.append((sample["__key__"], text.decode("utf-8") if isinstance(text, bytes) else text))
    return rows


def read_stats(shards: Iterable[Path]) -> Optional[dict[str, int]]:
    """Sums img2dataset's ``*_stats.json`` counts over ``shards``; None when a shard has none."""
    total: dict[str, int] = {}
    for shard in shards:
        stats_file = shard.with_name(f"{shard.stem}_stats.json")
        if not stats_file.is_file():
            return None
        stats = json.loads(stats_file.read_text())
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            total[name] = total.get(name, 0) + int(stats.get(name, 0))
    return total


def count_samples(shards: list[Path]) -> int:
    """Number of samples: from img2dataset's stats files, else by listing the tar members."""
    stats = read_stats(shards)
    if stats is not None:
        return stats["successes"]
    from openclip_tau.key_index import shard_keys

    return sum(len(shard_keys(str(shard))) for shard in shards)


def show(shards: str, /, count: bool = False) -> int:
    """Prints the brace pattern of a shard folder (for ``--train-data``), or its sample count.

    Args:
        shards: a shard folder, brace pattern or glob
        count: print the number of samples
    """
    try:
        found = find_shards(shards)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = read_stats(found)
    if stats is not None:
        print(
            f"{len(found)} shards: {stats['successes']} pairs of {stats['count']} URLs "
            f"({stats['failed_to_download']} failed downloads, "
            f"{stats['failed_to_resize']} failed resizes)",
            file=sys.stderr,
        )
    else:
        print(f"{len(found)} shards (no img2dataset stats files)", file=sys.stderr)
    print(count_samples(found) if count else brace_pattern(found))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recipes.cli_args import call

    description = (
        "Prints the OpenCLIP --train-data pattern of img2dataset shards on stdout (with --count: "
        "their number of samples, for --train-num-samples), and the download's counts from the "
        "*_stats.json files on stderr."
    )
    return call(show, argv, prog="python -m recipes.cc3m.shards", description=description)


if __name__ == "__main__":
    sys.exit(main())

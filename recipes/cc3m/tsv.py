"""Checks a CC3M URL list before img2dataset reads it: a TSV with ``url`` and ``caption`` columns.

Google's ``Train_GCC-training.tsv`` has no header (caption, then URL, on each line). img2dataset
needs named columns, so ``--headered-copy FILE`` writes a copy with the header
``caption<TAB>url`` when the input is such a headerless file. The command prints the path of the
file to give img2dataset (the input itself, or the copy), so a script can use it::

    URL_LIST=$(python -m recipes.cc3m.tsv Train_GCC-training.tsv --headered-copy cc3m.tsv)

Exit status 2 with a message naming what is missing when the file cannot be used.
"""

from __future__ import annotations

import csv
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REQUIRED_COLUMNS = ("url", "caption")


@dataclass
class TsvInfo:
    """What the checker found: the columns, the number of data rows, and the header's state."""

    path: Path
    columns: list[str]
    rows: int
    has_header: bool


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
    return count


def _looks_like_headerless_cc3m(fields: list[str]) -> bool:
    """Google's CC3M files: two fields per line, a caption and then an http(s) URL."""
    return len(fields) == 2 and fields[1].startswith(("http://", "https://"))


def check_tsv(path: Path, required: Sequence[str] = REQUIRED_COLUMNS) -> TsvInfo:
    """Reads the header of ``path``; raises ``ValueError`` naming missing columns or files.

    A headerless file in Google's CC3M layout is reported with ``has_header=False`` (and columns
    ``caption``, ``url``) instead of raising, so :func:`write_headered_copy` can fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        first = next(csv.reader(f, delimiter="\t"), None)
    if first is None:
        raise ValueError(f"URL list {path} is empty: expected a TSV with columns {list(required)}.")
    rows = _count_lines(path)
    columns = [c.strip() for c in first]
    missing = [c for c in required if c not in columns]
    if not missing:
        return TsvInfo(path, columns, rows - 1, has_header=True)
    if _looks_like_headerless_cc3m(first) and set(required) <= {"caption", "url"}:
        return TsvInfo(path, ["caption", "url"], rows, has_header=False)
    raise ValueError(
        f"URL list {path} has no column(s) {missing}: its header is {columns[:10]}. img2dataset "
        f"reads the columns {list(required)} (--url_col url --caption_col caption); rename the "
        "columns in the header, or give Google's headerless Train_GCC-training.tsv as it is."
    )


def write_headered_copy(info: TsvInfo, output: Path) -> Path:
    """Writes ``caption<TAB>url`` followed by the lines of a headerless CC3M file."""
    if info.has_header:
        raise ValueError(f"{info.path} already has a header; use it as it is.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as out, open(info.path, "rb") as src:
        out.write(b"caption\turl\n")
        shutil.copyfileobj(src, out, 1 << 20)
    return output


def prepare(tsv: Path, /, headered_copy: Optional[Path] = None) -> int:
    """Checks the URL list; prints the file img2dataset should read (exit status 2 on errors).

    Args:
        tsv: the URL list (e.g. Train_GCC-training.tsv)
        headered_copy: where to write a copy with a header if the input has none
    """
    try:
        info = check_tsv(tsv)
        if info.has_header:
            target = info.path
        elif headered_copy is None:
            raise ValueError(
                f"URL list {info.path} has no header (Google's CC3M layout: caption<TAB>url); "
                "pass --headered-copy FILE to write a copy with the header img2dataset needs."
            )
        else:
            target = write_headered_copy(info, headered_copy)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{info.rows} rows with columns {info.columns} in {info.path}", file=sys.stderr)
    print(target)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recipes.cli_args import RawDescription, call

    head, _, tail = __doc__.partition("\n\n")
    options = dict(description=head, epilog=tail, formatter_class=RawDescription)
    return call(prepare, argv, prog="python -m recipes.cc3m.tsv", **options)


if __name__ == "__main__":
    sys.exit(main())

"""Command lines generated from settings dataclasses with jsonargparse (light: for ``--help``).

Each field becomes ``--field-name`` (underscores as dashes), typed by its annotation (jsonargparse
checks ``PositiveInt``, ``Literal`` choices, ``Optional``, ...), with its default and the help
text of the class docstring's ``Args:`` entry (or ``field(metadata={"help": ...})``). A
``bool`` field is a switch (``--smoke``), a ``list[X]`` field takes its values space-separated
(``--seeds 0 1``; ``metadata={"nargs": "*"}`` allows none). Errors name the flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Optional

import docstring_parser
from jsonargparse import ArgumentParser as _ArgumentParser
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

__all__ = ["ArgumentParser", "FiniteFloat", "NonNegativeInt", "PositiveInt", "add_dataclass"]

FiniteFloat = restricted_number_type("FiniteFloat", float, [(">", -math.inf), ("<", math.inf)])


class ArgumentParser(_ArgumentParser):
    """jsonargparse's parser, whose errors name ``--the-flag`` rather than its key."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> typing.NoReturn:
        message = re.sub(r'Parser key "(\w+)"', lambda m: "--" + m[1].replace("_", "-"), message)
        super().error(message, *args, **kwargs)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_dataclass(
    parser: ArgumentParser, cls: type, title: Optional[str] = None, skip: tuple[str, ...] = ()
) -> None:
    """One option per field of dataclass ``cls`` in a group ``title`` (default: the docstring's
    first line)."""
    doc = docstring_parser.parse(cls.__doc__ or "")
    texts = {p.arg_name: p.description for p in doc.params}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or doc.short_description)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, meta = hints[f.name], f.metadata
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": _default(f),
            "help": meta.get("help", texts.get(f.name)),
        }
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        flag = "--" + meta.get("flag", f.name.replace("_", "-"))
        if hint is bool:
            group.add_argument(flag, action="store_true", **kwargs)
        elif typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            group.add_argument(flag, type=item, nargs=meta.get("nargs", "+"), **kwargs)
        else:
            group.add_argument(flag, type=hint, **kwargs)

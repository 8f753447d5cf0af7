"""Command lines generated from settings dataclasses with jsonargparse (light: for ``--help``).

Each field becomes ``--field-name`` (underscores as dashes), typed by its annotation (jsonargparse
checks ``PositiveInt``, ``Literal`` choices, ``Optional``, ...), with its default and the help
text of the class docstring's ``Args:`` entry (or ``field(metadata={"help": ...})``). A
``bool`` field is a switch (``--smoke``), a ``list[X]`` field takes its values space-separated
(``--seeds 0 1``, also ``Sequence[X]``; ``metadata={"nargs": "*"}`` allows none). Errors name the flag.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import re
import types
import typing
from argparse import RawDescriptionHelpFormatter
from typing import Any, Literal, Optional, Sequence

import docstring_parser
from jsonargparse import ArgumentParser as _ArgumentParser
from jsonargparse import DefaultHelpFormatter
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type

__all__ = [
    "ArgumentParser",
    "FiniteFloat",
    "NonNegativeInt",
    "PositiveInt",
    "add_dataclass",
    "call",
    "function_arguments",
    "function_parser",
]

FiniteFloat = restricted_number_type("FiniteFloat", float, [(">", -math.inf), ("<", math.inf)])


class RawDescription(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description and epilog kept as written."""


class ArgumentParser(_ArgumentParser):
    """jsonargparse's parser, whose errors name ``--the-flag`` rather than its key."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> typing.NoReturn:
        message = re.sub(r'Parser key "(\w+)"', lambda m: "--" + m[1].replace("_", "-"), message)
        head, required, names = message.partition("arguments are required: ")
        if required:
            flags = {a.dest: a.option_strings[0] for a in self._actions if a.option_strings}
            message = head + required + ", ".join(flags.get(n, n) for n in names.split(", "))
        super().error(message, *args, **kwargs)


def _parameters(source: Any) -> list[tuple[str, Any, Any, Any]]:
    """``(name, type, default, metadata)`` of each field of a dataclass, or each parameter of a
    function (``dataclasses.MISSING`` where there is no default; ``metadata["positional"]``
    for a positional-only parameter)."""
    hints = typing.get_type_hints(source)
    if dataclasses.is_dataclass(source):
        return [
            (f.name, hints[f.name], _default(f), f.metadata) for f in dataclasses.fields(source)
        ]
    empty = inspect.Parameter.empty
    return [
        (
            p.name,
            hints[p.name],
            dataclasses.MISSING if p.default is empty else p.default,
            {"positional": p.kind is p.POSITIONAL_ONLY},
        )
        for p in inspect.signature(source).parameters.values()
    ]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def add_dataclass(
    parser: ArgumentParser, source: Any, title: Optional[str] = None, skip: tuple[str, ...] = ()
) -> None:
    """One option per field of dataclass ``source`` (or parameter of function ``source``) in a
    group ``title`` (default: the docstring's first line); a positional-only parameter is a
    positional argument, a parameter without a default a required option."""
    doc = docstring_parser.parse(source.__doc__ or "")
    texts = {p.arg_name: p.description for p in doc.params}
    group = parser.add_argument_group(title or doc.short_description)
    for name, hint, default, meta in _parameters(source):
        if name in skip:
            continue
        kwargs: dict[str, Any] = {"help": meta.get("help", texts.get(name))}
        if meta.get("positional"):
            group.add_argument(name, type=hint, **kwargs)
            continue
        kwargs["dest"] = name
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        literal = [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal]
        if literal:  # Optional[Literal[...]]: its choices, as argparse shows them
            kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(literal[0]))) + "}"
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        flag = "--" + meta.get("flag", name.replace("_", "-"))
        if hint is bool:
            group.add_argument(flag, action="store_true", **kwargs)
        elif _sequence(hint):
            item, nargs = _sequence(hint)
            if isinstance(kwargs.get("default"), tuple):
                kwargs["default"] = list(kwargs["default"])
            group.add_argument(flag, type=item, nargs=meta.get("nargs", nargs), **kwargs)
        else:
            group.add_argument(flag, type=hint, **kwargs)


def _sequence(hint: Any) -> Optional[tuple[Any, Any]]:
    """``(item type, nargs)`` of a ``list[X]``, ``Sequence[X]``, ``tuple[X, ...]`` or
    ``tuple[X, X]`` hint (also inside ``Optional``); None for any other hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return _sequence(inner[0]) if len(inner) == 1 else None
    origin = typing.get_origin(hint)
    if origin in (list, collections.abc.Sequence):
        return args[0], "+"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0], "+"
    if origin is tuple and args and len(set(args)) == 1:
        return args[0], len(args)
    return None


def function_parser(function: Any, **parser: Any) -> ArgumentParser:
    """The parser of ``function``'s parameters (help from its docstring's ``Args:``);
    ``parser`` goes to :class:`ArgumentParser` (the description defaults to the docstring's
    first paragraph)."""
    first = (function.__doc__ or "").split("\n\n")[0]
    command = ArgumentParser(**{"description": " ".join(first.split()), **parser})
    add_dataclass(command, function, "arguments")
    return command


def function_arguments(
    command: ArgumentParser, function: Any, argv: Optional[Sequence[str]] = None
) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of ``function`` that ``argv`` gives (a
    ``tuple[...]`` parameter gets a tuple)."""
    values = command.parse_args(argv).as_dict()
    hints = typing.get_type_hints(function)
    for name, value in values.items():
        if isinstance(value, list) and tuple in _origins(hints[name]):
            values[name] = tuple(value)
    parameters = inspect.signature(function).parameters.values()
    positional = [values.pop(p.name) for p in parameters if p.kind is p.POSITIONAL_ONLY]
    return positional, values


def _origins(hint: Any) -> set[Any]:
    return {typing.get_origin(hint)} | {typing.get_origin(a) for a in typing.get_args(hint)}


def call(function: Any, argv: Optional[Sequence[str]] = None, **parser: Any) -> Any:
    """Calls ``function`` with its arguments from the command line ``argv`` (its parameters as
    options, help from its docstring's ``Args:``); ``parser`` goes to :class:`ArgumentParser`."""
    positional, values = function_arguments(function_parser(function, **parser), function, argv)
    return function(*positional, **values)

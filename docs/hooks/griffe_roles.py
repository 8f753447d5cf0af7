"""Griffe extension: the docstrings' Sphinx roles (``:class:`X```) shown as code in the site.

The docstrings use reStructuredText roles (``:class:``, ``:func:``, ``:meth:``, ``:mod:``,
``:attr:``), which Markdown would print literally; this turns each into inline code with the
name alone (``~`` prefixes dropped).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


class SphinxRolesAsCode(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)

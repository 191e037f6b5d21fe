"""A Griffe extension that reads two docstring conventions of nnx_peft's sources.

mkdocstrings renders the API reference from what Griffe parses (see ``mkdocs.yml``).
Griffe does not understand two conventions the sources follow:

- doctest sections titled ``Example:``, the Google style guide's singular form: Griffe's
  Google parser knows only ``Examples:`` and renders anything else as Markdown prose,
  which mangles ``>>>`` lines;
- ``#:`` comments on the lines above a module attribute, Sphinx's way of documenting
  one: Griffe ignores them, so ``WEIGHT_QTYPES`` and ``FROZEN_PARAMS`` would have no
  description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _attribute_comment(attr: griffe.Attribute) -> str | None:
    """The ``#:`` comment lines right above ``attr``'s assignment, joined, if any."""
    lines = attr.module.lines
    comment: list[str] = []
    index = (attr.lineno or 0) - 2  # the line above the assignment, 0-based
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return " ".join(comment) or None


class NnxPeftDocstrings(griffe.Extension):
    """Renames ``Example:`` sections to ``Examples:``; documents attributes from ``#:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is None and (comment := _attribute_comment(attr)):
            attr.docstring = griffe.Docstring(comment, lineno=attr.lineno, parent=attr)

"""Griffe extension for the API reference: reads the code's ``Example:`` docstring sections as doctest examples.

The package's docstrings title their doctests ``Example:`` (the Google style guide's own spelling). Griffe's Google
parser knows only ``Examples:`` and would render the doctests as prose; this extension renames the section title
before the docstrings are parsed, so the API pages show the examples as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class DoctestExamples(griffe.Extension):
    """Renames ``Example:`` section titles to ``Examples:`` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)

"""One error type for everything a user can get wrong.

The CLI turns a :class:`DistacError` into a single line on stderr and exit code 2; any other
exception is a bug in distac and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["DistacError", "closest"]


class DistacError(Exception):
    """A user-facing error. The message names the file, tensor or parameter at fault."""


def closest(name: str, options: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the closest valid names, or ``""``."""
    matches = difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""

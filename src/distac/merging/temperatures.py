"""``temperatures.json``: the per-task temperatures ``distac calibrate`` stores next to a merged model.

The format::

    {"format": "distac.temperatures/v1",
     "temperatures": {"<task>": T, ...},          # divide that task's logits by T
     "metrics": {"<task>": {...}, ...}}

It lives with the merge side because exporting per-task models reads it (to scale each head), and
the merge core must not depend on the conditioning code; ``distac calibrate`` writes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DistacError

__all__ = ["TEMPERATURES_FILE", "TEMPERATURES_FORMAT", "read_temperatures"]

TEMPERATURES_FILE = "temperatures.json"
TEMPERATURES_FORMAT = "distac.temperatures/v1"


def read_temperatures(path: str | Path) -> dict[str, float]:
    """The stored temperatures.

    Args:
        path: a ``temperatures.json``, or the folder holding one.

    Returns:
        ``{task: T}``; ``{}`` when there is no such file.

    Raises:
        DistacError: the file is not a distac temperatures file (naming it).

    Example:
        >>> read_temperatures("merged/")  # doctest: +SKIP
        {'mnist': 1.7}
    """
    p = Path(path)
    p = p / TEMPERATURES_FILE if p.is_dir() else p
    if not p.is_file():
        return {}
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistacError(f"'{p}' is not valid JSON: {e}") from e
    except OSError as e:
        raise DistacError(f"'{p}': cannot read the temperatures file: {e.strerror or e}") from e
    if not isinstance(obj, dict) or obj.get("format") != TEMPERATURES_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else None
        raise DistacError(f"'{p}' is not a distac temperatures file (format {got!r}, expected {TEMPERATURES_FORMAT})")
    temps = obj.get("temperatures")
    if not isinstance(temps, dict):
        raise DistacError(f"'{p}': 'temperatures' must be a mapping of task name to temperature")
    out: dict[str, float] = {}
    for k, v in temps.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise DistacError(f"'{p}': temperature of task '{k}' must be a finite number > 0, got {v!r}")
        out[str(k)] = float(v)
    return out

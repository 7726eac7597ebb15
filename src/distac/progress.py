"""The one progress helper every long loop in distac uses (merging, statistics, distillation, reproduce).

Built on tqdm. Bars are shown only on an interactive terminal and never when ``quiet``, so logs
and CI output stay clean. :class:`Progress` counts items (tensors, steps) and bytes together and
shows the byte rate, which is the number that matters for an I/O-bound merge.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "track"]

T = TypeVar("T")


def _enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


class Progress:
    """A bar over bytes (with rate) that also shows ``items done/total``.

    >>> with Progress(total_bytes=n, total_items=k, desc="merge", unit_items="tensors") as bar:  # doctest: +SKIP
    ...     bar.update(nbytes=..., items=1)
    """

    def __init__(
        self, *, total_bytes: int, total_items: int, desc: str, unit_items: str = "tensors", quiet: bool = False
    ):
        self.total_items = total_items
        self.items = 0
        self.unit_items = unit_items
        self._bar = tqdm(
            total=total_bytes,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            disable=not _enabled(quiet),
            dynamic_ncols=True,
            leave=False,
        )

    def update(self, *, nbytes: int = 0, items: int = 0) -> None:
        self.items += items
        if items:
            self._bar.set_postfix_str(f"{self.items}/{self.total_items} {self.unit_items}", refresh=False)
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", quiet: bool = False
) -> Iterator[T]:
    """Iterate with a bar (items only), e.g. ``for step in track(range(k), desc="distill", unit="step")``."""
    yield from tqdm(
        iterable, desc=desc, total=total, unit=unit, disable=not _enabled(quiet), dynamic_ncols=True, leave=False
    )

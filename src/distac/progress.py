"""The one progress helper every long loop in distac uses (merging, statistics, distillation, reproduce).

This is the only module that imports tqdm. Bars are shown only on an interactive terminal and
never when ``quiet``, so logs and CI output stay clean. Three shapes cover every loop:

* :class:`Progress`: bytes (with rate) and items together, for an I/O-bound merge;
* :class:`Counter`: a count (examples, steps) updated by hand, with an optional postfix of named
  values (a training loss), for loops whose unit is not one iteration of an iterable;
* :func:`track`: wrap an iterable, one tick per item.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["Counter", "Progress", "track"]

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


class Counter:
    """A bar over a count (examples, optimisation steps), advanced by hand, with named values shown after it.

    Args:
        total: the count at the end (None: unknown, the bar shows the count and the rate only).
        desc: what is counted, shown before the bar.
        unit: the unit of the count (``"ex"``, ``"step"``).
        initial: where the count starts (a resumed training run starts at its saved step).
        quiet: never show the bar.
        leave: keep the finished bar on the terminal.

    Example:
        >>> with Counter(steps, desc="condition", unit="step", initial=start) as bar:  # doctest: +SKIP
        ...     for step in range(start, steps):
        ...         bar.update(1, loss=f"{loss:.4g}")
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        quiet: bool = False,
        leave: bool = False,
    ):
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=not _enabled(quiet),
            dynamic_ncols=True,
            leave=leave,
        )

    def update(self, n: int = 1, **postfix: object) -> None:
        """Advance by ``n``; keyword arguments replace the values shown after the bar (e.g. ``loss=0.12``)."""
        if postfix:
            self.set_postfix(**postfix)
        self._bar.update(n)

    def set_postfix(self, **values: object) -> None:
        """Show ``name=value`` pairs after the bar without advancing it (refreshed with the next update)."""
        self._bar.set_postfix({k: str(v) for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Counter:
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

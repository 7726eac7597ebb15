"""Task vectors: the difference between a fine-tuned model and its base, as a small algebra.

The API follows mlfoundations/task_vectors (``+``, unary ``-``, scalar ``*``, ``sum()``,
``apply_to``) but works on plain state dicts, never on pickled modules.

Conventions that every part of distac shares:

* A state dict is ``dict[str, Tensor]``.
* Only floating-point entries have a task vector. Integer and bool buffers (position ids,
  ``num_batches_tracked``) are copied from the base, never averaged.
* *Shared* parameters are merged; *head* parameters (task-specific classification heads) are
  chosen by name patterns (default: none) and kept per task.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from .errors import DistacError
from .tensors import check_compatible

__all__ = ["TaskVector", "compile_head_pattern", "is_mergeable", "match_heads", "split_heads"]

StateDict = dict[str, Tensor]


def is_mergeable(t: Tensor) -> bool:
    """True for floating-point tensors: those have a task vector. Int/bool buffers do not."""
    return t.is_floating_point()


def compile_head_pattern(pattern: str) -> re.Pattern[str] | None:
    """The compiled regex of a ``re:`` head pattern (None for a glob); a bad one is a DistacError naming it.

    Example:
        >>> print(compile_head_pattern("re:head\\.").pattern)
        head\\.
    """
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except (re.error, RecursionError, OverflowError) as e:
        raise DistacError(f"heads pattern {pattern!r} is not a valid regular expression: {e}") from None


def match_heads(names: Iterable[str], patterns: Iterable[str] | None) -> set[str]:
    """Names that match any head pattern.

    A pattern is a shell glob matched against the whole name (``"classifier.*"``), or a regular
    expression searched anywhere in the name when prefixed with ``re:`` (``"re:head\\."``).
    """
    globs: list[str] = []
    regexes: list[str] = []
    for p in patterns or ():
        (regexes if p.startswith("re:") else globs).append(p)
    compiled = [c for p in regexes if (c := compile_head_pattern(p)) is not None]
    return {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs) or any(r.search(n) for r in compiled)}


def split_heads(state: Mapping[str, Tensor], patterns: Iterable[str] | None) -> tuple[StateDict, StateDict]:
    """Split a state dict into ``(shared, heads)`` by head name patterns."""
    heads = match_heads(state.keys(), patterns)
    return ({k: v for k, v in state.items() if k not in heads}, {k: v for k, v in state.items() if k in heads})


class TaskVector(Mapping[str, Tensor]):
    """τ = θ_ft − θ_0 over the floating-point entries of a state dict, in fp32.

    >>> tv = TaskVector.from_models(base, finetuned)      # doctest: +SKIP
    >>> merged = (0.4 * sum([tv_a, tv_b])).apply_to(base)  # doctest: +SKIP
    """

    def __init__(self, deltas: Mapping[str, Tensor]):
        self._d: StateDict = dict(deltas)

    # construction --------------------------------------------------------------------------
    @classmethod
    def from_models(cls, base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> TaskVector:
        """τ = finetuned − base for every floating-point entry (computed in fp32)."""
        check_compatible(base, finetuned, "fine-tuned model")
        return cls({k: finetuned[k].float() - b.float() for k, b in base.items() if is_mergeable(b)})

    # mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, norm={self.norm():.4g})"

    # algebra -------------------------------------------------------------------------------
    def _zip(self, other: TaskVector, op) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        if set(self._d) != set(other._d):
            diff = sorted(set(self._d) ^ set(other._d))
            raise DistacError(f"task vectors have different keys, e.g. {diff[:3]}")
        return TaskVector({k: op(v, other._d[k]) for k, v in self._d.items()})

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.add)

    def __radd__(self, other: object) -> TaskVector:
        # sum() starts from 0
        if isinstance(other, int | float) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._zip(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self._d.items()})

    def __mul__(self, c: float) -> TaskVector:
        if not isinstance(c, int | float):
            return NotImplemented
        return TaskVector({k: v * c for k, v in self._d.items()})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> TaskVector:
        return self * (1.0 / c)

    # measures ------------------------------------------------------------------------------
    def norm(self) -> float:
        """Global L2 norm over all entries (the DisTaC paper's ‖τ‖)."""
        return math.sqrt(sum(float((v.double() ** 2).sum()) for v in self._d.values()))

    def norms(self) -> dict[str, float]:
        """Per-tensor L2 norms."""
        return {k: float(v.double().norm()) for k, v in self._d.items()}

    def dot(self, other: TaskVector) -> float:
        return float(sum((v.double() * other._d[k].double()).sum() for k, v in self._d.items()))

    def cosine(self, other: TaskVector) -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def without(self, keys: Iterable[str]) -> TaskVector:
        drop = set(keys)
        return TaskVector({k: v for k, v in self._d.items() if k not in drop})

    # application ---------------------------------------------------------------------------
    def apply_to(self, base: Mapping[str, Tensor], scale: float = 1.0) -> StateDict:
        """θ = base + scale·τ. Entries without a delta are copied; dtypes follow the base."""
        out: StateDict = {}
        for k, b in base.items():
            d = self._d.get(k)
            out[k] = b.clone() if d is None else (b.float() + scale * d).to(b.dtype)
        return out

    def to_state_dict(self) -> StateDict:
        return dict(self._d)

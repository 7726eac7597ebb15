"""Bags of named tensors: the one read interface of the merge engine, and the one compatibility check.

A :class:`TensorSource` is read tensor by tensor, so a checkpoint on disk (``distac.io.Checkpoint``)
and an in-memory state dict (:class:`DictSource`) go through the same engine loop. Every member
is defined: the engine never probes for optional ones. A new source only has to implement
``label``, ``keys``, ``shape``, ``dtype`` and ``get``; :class:`SourceDefaults` supplies the rest
from those (reading whole tensors), and a reader that can do better (a row slice of a file, a read
straight into the caller's buffer) overrides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import DistacError

__all__ = ["DictSource", "RenamedSource", "SourceDefaults", "TensorSource", "check_compatible"]


@runtime_checkable
class TensorSource(Protocol):
    """Read access to one checkpoint (or statistics file), tensor by tensor."""

    #: names the source in messages (a path, or "model 1")
    label: str

    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without reading it."""
        ...

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's stored dtype, without reading it."""
        ...

    def get(self, name: str) -> Tensor:
        """The whole tensor, in its stored dtype."""
        ...

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor of rank >= 1 (a file reader reads only those bytes)."""
        ...

    def file_of(self, name: str) -> str | Path:
        """What to name in an error about ``name``: its file (one shard of a sharded model), or the label."""
        ...

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        """Copy the tensor (or ``rows``) into ``out``, converting the dtype; return the bytes read."""
        ...


class SourceDefaults:
    """The optional :class:`TensorSource` members, derived from ``label``/``get``.

    Inherit it in a source that has nothing better: ``get_rows`` slices the whole tensor,
    ``file_of`` is the label, and ``read_into`` copies what ``get_rows``/``get`` returns.
    """

    label: str

    def get(self, name: str) -> Tensor:  # pragma: no cover - defined by the subclass
        raise NotImplementedError

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.get(name)[start:stop]

    def file_of(self, name: str) -> str | Path:
        return self.label

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        raw = self.get(name) if rows is None else self.get_rows(name, *rows)
        out.copy_(raw)  # one pass: stored dtype -> out's dtype, straight into the buffer
        return raw.numel() * raw.element_size()


@dataclass
class DictSource(SourceDefaults):
    """A :class:`TensorSource` over an in-memory state dict.

    Example:
        >>> src = DictSource({"w": torch.zeros(2, 3)}, "base")
        >>> src.shape("w")
        (2, 3)
    """

    state: Mapping[str, Tensor]
    label: str = "model"

    def keys(self) -> list[str]:
        return list(self.state.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> Tensor:
        return self.state[name]


@dataclass
class RenamedSource:
    """A view of a :class:`TensorSource` under other tensor names (nothing is copied).

    ``names`` maps each name the view shows to the name it reads in ``source``, in the view's
    order. One wrapper serves every renaming: a key-prefix mapping (``bert.`` <-> none), a layer
    slice of a frankenmerge (output layer j reads layer i), an adapter's module names.

    Example:
        >>> src = RenamedSource(DictSource({"bert.w": torch.zeros(2)}, "ft"), {"w": "bert.w"})
        >>> src.keys(), src.shape("w")
        (['w'], (2,))
    """

    source: TensorSource
    names: Mapping[str, str]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.source.label

    def keys(self) -> list[str]:
        return list(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.names[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.names[name])

    def get(self, name: str) -> Tensor:
        return self.source.get(self.names[name])

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.source.get_rows(self.names[name], start, stop)

    def file_of(self, name: str) -> str | Path:
        return self.source.file_of(self.names[name])

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        return self.source.read_into(self.names[name], rows, out)


def _as_source(x: TensorSource | Mapping[str, Tensor], label: str) -> TensorSource:
    return DictSource(x, label) if isinstance(x, Mapping) else x


def _suffixes(key: str) -> list[str]:
    """``a.b.c`` -> ``["a.b.c", "b.c", "c"]``: the name and every dotted tail of it, longest first."""
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def prefix_difference(missing: list[str], extra: list[str]) -> tuple[str, str, int] | None:
    """The consistent prefix that tells a model's names from the base's, if there is one.

    A base saved as ``BertModel`` (``embeddings.…``) and a fine-tune saved as
    ``BertForSequenceClassification`` (``bert.embeddings.…``) differ by the prefix ``bert.``: each
    extra name of the model is a missing name of the base behind another dotted prefix. The pair
    (model's prefix, base's prefix) that explains the most names wins; it is reported when it
    explains at least half of the missing ones.

    Args:
        missing: the base's names the model lacks.
        extra: the model's names the base lacks.

    Returns:
        ``(model_prefix, base_prefix, count)`` or None.

    Example:
        >>> prefix_difference(["emb.w", "l0.w"], ["bert.emb.w", "bert.l0.w", "classifier.w"])
        ('bert.', '', 2)
    """
    by_tail: dict[str, list[str]] = {}
    for m in missing:
        for t in _suffixes(m):
            by_tail.setdefault(t, []).append(m)
    counts: dict[tuple[str, str], int] = {}
    for e in extra:
        # the longest shared dotted tail with a missing name, if exactly one name has it
        tail = next((t for t in _suffixes(e) if t in by_tail), None)
        if tail is None or len(by_tail[tail]) != 1:
            continue
        pair = (e[: len(e) - len(tail)], by_tail[tail][0][: len(by_tail[tail][0]) - len(tail)])
        counts[pair] = counts.get(pair, 0) + 1
    if not counts:
        return None
    (mp, bp), n = max(counts.items(), key=lambda kv: kv[1])
    return (mp, bp, n) if 2 * n >= len(missing) else None


def _prefix_hint(missing: list[str], extra: list[str], keys: set[str]) -> str | None:
    """The message for names that differ by a prefix: what it is, the mapping that fixes it, what is left."""
    found = prefix_difference(missing, extra)
    if found is None:
        return None
    mp, bp, n = found
    mapped = {e: bp + e[len(mp) :] for e in extra if e.startswith(mp) and bp + e[len(mp) :] in keys}
    left_extra = [e for e in extra if e not in mapped]
    left_missing = [m for m in missing if m not in set(mapped.values())]
    how = f"'{mp}' where the base has '{bp}'" if mp and bp else f"'{mp or bp}'"
    e, m = next(iter(mapped.items()))
    msg = (
        f"its tensors differ from the base's by the prefix {how} ({n} tensors, e.g. its '{e}' is the base's "
        f"'{m}'); map it with `prefix: {{'{mp}': '{bp}'}}` on this model's entry of the config"
    )
    if left_extra:
        heads = sorted({e.split(".")[0] + "." for e in left_extra})
        drop = ", ".join(f"'{h}': null" for h in heads[:3])
        msg += (
            f"; it also has {len(left_extra)} tensor(s) the base lacks, e.g. {left_extra[:3]}: a merge writes the "
            f"base's tensors only, so drop them with `prefix: {{'{mp}': '{bp}', {drop}}}`, or merge onto a base "
            "that has them (with `heads` patterns to keep each model's own)"
        )
    if left_missing:
        msg += f"; it also lacks {len(left_missing)} tensor(s) of the base, e.g. {left_missing[:3]}"
    return msg


def check_compatible(
    base: TensorSource | Mapping[str, Tensor],
    other: TensorSource | Mapping[str, Tensor],
    what: str | None = None,
    *,
    base_label: str = "the base",
    buffers_from_base: bool = False,
) -> None:
    """Raise a :class:`DistacError` naming the first key, shape or dtype kind that differs from the base.

    Both sides may be sources or state dicts. Shapes must be equal, and a floating-point tensor
    must stay floating point (its precision may differ: bf16 fine-tunes of an fp32 base merge).

    Args:
        base: the reference (the pre-trained model).
        other: the checkpoint to compare (a fine-tuned model).
        what: names ``other`` in the message (default: its label).
        base_label: names ``base`` in the message.
        buffers_from_base: a merge copies non-float tensors (``position_ids``, step counters) from
            the base, so ``other`` may lack them or hold ones the base lacks: older transformers
            saved ``position_ids``, newer ones do not.

    Example:
        >>> check_compatible({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, "model a")
        Traceback (most recent call last):
        distac.errors.DistacError: model a: tensor 'w' has shape (3,), the base has (2,)
    """
    b, o = _as_source(base, "base"), _as_source(other, what or "model")
    keys = b.keys()
    okeys = set(o.keys())
    missing, extra = [k for k in keys if k not in okeys], sorted(okeys - set(keys))
    if buffers_from_base:
        missing = [k for k in missing if b.dtype(k).is_floating_point]
        extra = [k for k in extra if o.dtype(k).is_floating_point]
        keys = [k for k in keys if k in okeys]
    if missing and extra:
        hint = _prefix_hint(missing, extra, set(b.keys()))
        if hint is not None:
            raise DistacError(f"{what or o.label}: {hint}")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
        if extra:
            parts.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
            if not missing:  # a head the base has no place for: a merge writes the base's tensors only
                drop = ", ".join(f"'{h}': null" for h in sorted({e.split(".")[0] + "." for e in extra})[:3])
                parts.append(
                    f"a merge writes the base's tensors only: leave them out with {drop} in this model's `prefix` "
                    "mapping of the config (e.g. `prefix: {" + drop + "}`), or merge onto a base that has them"
                )
        raise DistacError(f"{what or o.label}: " + "; ".join(parts))
    for k in keys:
        where = what or str(o.file_of(k))
        if tuple(o.shape(k)) != tuple(b.shape(k)):
            raise DistacError(f"{where}: tensor '{k}' has shape {tuple(o.shape(k))}, {base_label} has {b.shape(k)}")
        if o.dtype(k).is_floating_point != b.dtype(k).is_floating_point:
            raise DistacError(f"{where}: tensor '{k}' has dtype {o.dtype(k)}, {base_label} has {b.dtype(k)}")

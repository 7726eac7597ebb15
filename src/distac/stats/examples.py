"""Batches as the statistics collectors see them: inputs, optional labels, a data fingerprint.

Shared by the Fisher and the Gram collectors, so both count examples, cut the last batch and
fingerprint the data the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..nn.models import Batch, batch_size

__all__ = ["data_fingerprint_update", "split_labels", "take_examples"]


def split_labels(item: Any) -> tuple[Batch, Tensor | None]:
    """Separate inputs from labels: ``(x, y)`` tuples and dicts with a ``labels`` key carry labels.

    Example:
        >>> x, y = split_labels((torch.zeros(2, 3), [0, 1]))
        >>> y.tolist()
        [0, 1]
    """
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], torch.as_tensor(item[1])
    if isinstance(item, Mapping) and "labels" in item:
        x = {k: v for k, v in item.items() if k != "labels"}
        return x, torch.as_tensor(item["labels"])
    return item, None


def take_examples(batches: Iterable[Any], n_examples: int | None, h: Any) -> Iterator[tuple[Batch, Tensor | None, int]]:
    """Yield ``(x, y, b)`` per batch until ``n_examples`` examples (the last batch cut to fit).

    Args:
        batches: tensors, dicts of tensors, ``(x, y)`` pairs or dicts with ``labels``.
        n_examples: stop after this many examples (None: all).
        h: a hashlib object every ``x`` is fed to (:func:`data_fingerprint_update`).

    Returns:
        An iterator of ``(inputs, labels or None, batch size)``.
    """
    seen = 0
    for item in batches:
        if n_examples is not None and seen >= n_examples:
            return
        x, y = split_labels(item)
        b = batch_size(x)
        if n_examples is not None and seen + b > n_examples:
            b = n_examples - seen
            x = {k: v[:b] for k, v in x.items()} if isinstance(x, Mapping) else x[:b]
            y = None if y is None else y[:b]
        data_fingerprint_update(h, x)
        yield x, y, b
        seen += b


def data_fingerprint_update(h: Any, batch: Batch) -> None:
    """Feed a strided sample of a batch's values (at most 256 per tensor) into a blake2b hash."""
    tensors = [batch[k] for k in sorted(batch)] if isinstance(batch, Mapping) else [batch]
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())

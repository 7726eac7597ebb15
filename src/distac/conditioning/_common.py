"""Small helpers shared by diagnose, distill and calibrate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..nn.data import Inputs, check_fits, iter_batches
from ..nn.models import Batch, check_head_patterns, default_head_patterns
from ..taskvector import TaskVector, split_heads
from ..tensors import check_compatible

StateDict = dict[str, Tensor]


def resolve_heads(model: nn.Module, base: Mapping[str, Tensor], heads: Sequence[str] | None) -> list[str]:
    """The head patterns to use: the caller's (checked to match something) or the model's defaults."""
    patterns = list(heads) if heads is not None else default_head_patterns(model)
    check_head_patterns(list(base), patterns, "base model")
    return patterns


def check_model_state(model: nn.Module, base: Mapping[str, Tensor]) -> None:
    """The model's own state dict and ``base`` must have the same keys and shapes."""
    check_compatible(model.state_dict(), base, "base state dict (compared with the model's own parameters)")


def shared_vector(
    base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], heads: Sequence[str], what: str
) -> TaskVector:
    """τ over the shared (non-head) floating-point entries: the vector DisTaC measures and conditions."""
    check_compatible(base, finetuned, what)
    shared_base, _ = split_heads(base, heads)
    return TaskVector.from_models(shared_base, {k: finetuned[k] for k in shared_base})


def eval_batches(data: Any, batch_size: int, what: str) -> list[Batch]:
    """Evaluation batches from an :class:`Inputs`, a tensor, or an iterable of batches; never empty."""
    batches = iter_batches(data, batch_size)
    if not batches:
        raise DistacError(f"{what}: the dataset is empty")
    return batches


def label_tensor(labels: Any, what: str) -> Tensor:
    """Labels as one int64 tensor: a tensor, a sequence of per-batch tensors, or an :class:`Inputs` with labels.

    Fractional or non-finite labels are refused (``.long()`` would silently truncate 1.9 to 1).
    """
    if isinstance(labels, Inputs):
        if labels.labels is None:
            raise DistacError(f"{what}: the data has no labels")
        return _whole(labels.labels, what)
    if isinstance(labels, Tensor):
        return _whole(labels.reshape(-1), what)
    if isinstance(labels, Iterable):
        parts = [torch.as_tensor(y).reshape(-1) for y in labels]
        if not parts:
            raise DistacError(f"{what}: no labels")
        return _whole(torch.cat(parts), what)
    raise DistacError(f"{what}: labels must be a tensor or an iterable of label tensors, got {type(labels).__name__}")


def _whole(y: Tensor, what: str) -> Tensor:
    if y.is_floating_point():
        bad = ~(torch.isfinite(y) & (y == y.round()))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DistacError(
                f"{what}: row {i} holds {float(y[i])!r}; labels must be integer class ids (never rounded)"
            )
    return y.long()


def check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise DistacError(f"{name} must be > 0, got {value}")


def check_data_fits(model: nn.Module, data: Any, what: str) -> None:
    """Run two examples of ``data`` through ``model`` before a long job (names ``what`` on a mismatch)."""
    if isinstance(data, Inputs):
        inputs = data
    else:
        first = next(iter(data), None) if not isinstance(data, Tensor) else data
        if first is None:
            raise DistacError(f"{what}: the dataset is empty")
        inputs = Inputs(first, source=what) if not isinstance(first, Inputs) else first
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_fits(model, inputs, device=device)

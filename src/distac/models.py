"""Model adapters: how distac calls a classifier, whatever its kind.

A *batch* is a tensor or a dict of tensors (tokenizer output). A model is any ``nn.Module`` whose
forward returns logits, or a Hugging Face model whose output has ``.logits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "batch_size", "batch_to", "forward_logits"]

Batch = Tensor | Mapping[str, Tensor]


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Call ``model`` on a batch and return its logits, shape ``(B, C)``."""
    out: Any = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    return out


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move a batch (tensor or dict of tensors) to a device."""
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return batch.to(device)


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch."""
    if isinstance(batch, Mapping):
        return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
    return int(batch.shape[0])

"""Weight averaging and task arithmetic."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from ..errors import DistacError
from .base import Method, PerModel, Range, TensorContext

Weights = Annotated[float | list[float] | None, PerModel()]


def model_weights(weights: float | list[float] | None, n: int, like: Tensor) -> Tensor:
    """Per-model weights as a tensor broadcastable against ``(N, *S)``; None means all ones."""
    w = (
        torch.ones(n)
        if weights is None
        else torch.as_tensor(weights if isinstance(weights, list) else [weights] * n, dtype=torch.float32)
    )
    return w.to(like.device, like.dtype).reshape(n, *([1] * (like.dim() - 1)))


def average(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    weights: Weights = None,
) -> Tensor:
    """Weight averaging (model soup): θ = Σ_t w_t θ_t / Σ_t w_t.

    Uniform by default (Wortsman et al., Model soups, ICML 2022, arXiv 2203.05482). Weights are
    normalised to sum to one, like mergekit ``linear`` (``normalize: true``) and FusionBench
    ``weighted_average``. Written on task vectors, since mean_t θ_t = θ0 + mean_t τ_t.
    """
    w = model_weights(weights, deltas.shape[0], deltas)
    total = float(w.sum())
    if total == 0:
        raise DistacError(f"tensor '{ctx.name}': parameter 'weights' sums to zero, so it cannot be normalised")
    return (w * deltas).sum(0) / total


def task_arithmetic(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Annotated[float, Range()] = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023): θ = θ_0 + λ Σ_t w_t τ_t.

    Negation is a negative ``scale`` (or a negative per-model weight). ``scale`` defaults to 1.0
    like mergekit's ``lambda``; the paper selects λ on validation data (TIES recommends 0.4 without
    it; FusionBench defaults to 0.3).
    """
    w = model_weights(weights, deltas.shape[0], deltas)
    return scale * (w * deltas).sum(0)


METHODS = (
    Method(
        "average",
        average,
        summary="Weight averaging / uniform model soup.",
        paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
        notes="Weights normalised to sum to 1 (mergekit linear normalize: true, FusionBench weighted_average).",
    ),
    Method(
        "task_arithmetic",
        task_arithmetic,
        summary="θ0 + λ·Σ w_t τ_t; negation with λ < 0.",
        paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
        notes="scale 1.0 like mergekit lambda; FusionBench 0.3, TIES paper's no-validation value 0.4.",
    ),
)

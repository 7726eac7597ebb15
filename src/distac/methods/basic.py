"""Weight averaging and task arithmetic, and the per-model ``weights`` shared by most methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from .base import Number, PerModel, Range, TensorContext, merge_method

Weights = Annotated[float | list[float] | None, Number(), PerModel()]

#: the memory note of every row-chunked method: the engine hands it pieces of at most
#: ``DEFAULT_CHUNK_BYTES`` (16 MiB) of (N+1) fp32 inputs, so its working set does not grow with the tensor.
ROW_CHUNKED = "row-chunked: a few x the (N+1) x piece inputs (16 MiB pieces), whatever the tensor size"


def weights_sum_nonzero(params: Mapping[str, Any], n: int) -> str | None:
    """Check for methods that divide by Σ_t w_t: a zero sum has no normalised weights."""
    w = params.get("weights")
    if w is None or sum(w if isinstance(w, list) else [w] * n) != 0:
        return None
    return (
        f"parameter 'weights' = {w} sums to zero, so the weights cannot be normalised; give weights with a nonzero sum"
    )


def model_weights(weights: float | list[float] | None, n: int, like: Tensor) -> Tensor:
    """Per-model weights as a tensor broadcastable against ``(N, *S)``; None means all ones."""
    w = (
        torch.ones(n)
        if weights is None
        else torch.as_tensor(weights if isinstance(weights, list) else [weights] * n, dtype=torch.float32)
    )
    return w.to(like.device, like.dtype).reshape(n, *([1] * (like.dim() - 1)))


@merge_method(
    "average",
    summary="Weight averaging / uniform model soup.",
    paper="Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)",
    notes="Weights normalised to sum to 1 (mergekit linear normalize: true, FusionBench weighted_average).",
    memory=ROW_CHUNKED,
    checks=(weights_sum_nonzero,),
)
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
    ``weighted_average``; weights summing to zero are refused when the parameters are resolved.
    Written on task vectors, since mean_t θ_t = θ0 + mean_t τ_t.

    Memory: row-chunked; an (N, piece) weighted copy and the output beside the engine's inputs.
    """
    w = model_weights(weights, deltas.shape[0], deltas)
    return (w * deltas).sum(0) / float(w.sum())


@merge_method(
    "task_arithmetic",
    summary="θ0 + λ·Σ w_t τ_t; negation with λ < 0.",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)",
    notes="scale 1.0 like mergekit lambda; FusionBench 0.3, TIES paper's no-validation value 0.4.",
    memory=ROW_CHUNKED,
)
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

    Memory: row-chunked; an (N, piece) weighted copy and the output beside the engine's inputs.
    """
    w = model_weights(weights, deltas.shape[0], deltas)
    return scale * (w * deltas).sum(0)


@merge_method(
    "passthrough",
    summary="The one given model's tensor, optionally scaled: θ = scale·θ_1 (mergekit passthrough).",
    paper="mergekit passthrough (arcee-ai/mergekit, mergekit/merge_methods/passthrough.py)",
    min_models=1,
    max_models=1,
    notes="Exactly one model, as mergekit; scale multiplies the weights θ_1 (mergekit's per-model scale), "
    "not a task vector. Frankenmerges (slices of layers) are a config feature, not this method.",
    memory=ROW_CHUNKED,
)
def passthrough(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Annotated[float, Range()] = 1.0,
) -> Tensor:
    """Passthrough: the single model's tensor, θ = scale · θ_1 (mergekit ``passthrough``).

    mergekit takes exactly one input per tensor and returns it, multiplied by its optional
    ``scale`` (used in frankenmerges to damp a layer's output projection). ``scale`` multiplies
    the model's *weights*, not a task vector; 1.0 (the default) is mergekit's "no scale". Written
    on task vectors like every method, the result is scale·(θ0 + τ_1) − θ0 and the engine adds θ0
    back: exactly θ_1 (times ``scale``) when the base is all zeros, as for a mergekit config
    without ``base_model``; over a real base, θ_1 up to the fp32 rounding of θ0 + (θ_1 − θ0).

    Memory: row-chunked; the output (and a weighted copy when scale ≠ 1).
    """
    if scale == 1:
        return deltas[0].clone()
    return (base + deltas[0]).mul_(scale).sub_(base)

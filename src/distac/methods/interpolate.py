"""Interpolation in weight space: SLERP (two models) and Model Stock.

Both look at each tensor as a whole (a norm or an angle over all of its entries), so neither is
chunkable. They are written, like every method, as functions returning the merged *task vector*;
the engine adds the base back.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..errors import DistacError
from .base import Range, TensorContext, merge_method

__all__ = ["model_stock", "model_stock_ratio", "slerp"]

#: above this |cos| the two directions are treated as collinear and SLERP falls back to LERP
#: (mergekit and FusionBench use the same constant); also avoids dividing by sin Ω ≈ 0.
DOT_THRESHOLD = 0.9995
EPS = 1e-8

#: SLERP's fp64 dot product and norms are accumulated over blocks of rows, so the fp64 copies
#: are one block each, not three tensors.
SLERP_MEMORY = "whole tensor: the engine's (N+1) x largest inputs, the output and two fp32 copies (θ_1, θ_2)"


@merge_method(
    "slerp",
    summary="Spherical interpolation between two fine-tuned models (LERP when nearly collinear).",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; mergekit/FusionBench slerp",
    chunkable=False,
    min_models=2,
    max_models=2,
    notes="Interpolates θ_1 → θ_2 (mergekit interpolates base → other model). t=0.5 default (FusionBench); "
    "0.9995 LERP threshold, eps 1e-8 (both anchors).",
    memory=SLERP_MEMORY,
)
def slerp(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    t: Annotated[float, Range(0, 1)] = 0.5,
) -> Tensor:
    """Spherical linear interpolation between the two *full* weights θ_1 = θ0 + τ_1 and θ_2 = θ0 + τ_2.

    Shoemake (1985), as used for model merging by mergekit ``slerp`` and FusionBench ``slerp``:
    with v0, v1 the flattened tensors and cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩ (a norm ≤ 1e-8 is not
    normalised),

        θ = sin((1−t)Ω)/sin Ω · θ_1 + sin(tΩ)/sin Ω · θ_2,   or (1−t)·θ_1 + t·θ_2 if |cos Ω| > 0.9995.

    ``t`` defaults to 0.5 (FusionBench; mergekit requires it). Difference from mergekit: mergekit
    interpolates from the *base model* to one other model (its ``base_model`` is v0); distac
    interpolates between the two fine-tuned models and uses θ0 only to form them, so
    ``t = 0`` returns θ_1 and ``t = 1`` returns θ_2. mergekit's per-layer ``t`` gradients are not
    supported. The angle is computed in fp64.

    Memory: whole tensor; θ_1 and θ_2 in fp32 and the output; the fp64 dot product and norms are
    accumulated over blocks of rows, so no whole fp64 copy is made.
    """
    v0 = base + deltas[0]
    v1 = base + deltas[1]
    n0, n1, dot = _norms_and_dot(v0, v1)
    dot = dot / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        c0, c1 = 1 - t, t
    else:
        omega = math.acos(dot)
        s = math.sin(omega)
        c0, c1 = math.sin((1 - t) * omega) / s, math.sin(t * omega) / s
    # in place: c0·v0 + c1·v1 − θ0 rounded exactly as the out-of-place expression, without 3 temporaries
    return v0.mul_(c0).add_(v1.mul_(c1)).sub_(base)


#: elements per block of SLERP's fp64 reductions (8 MiB of fp64 per operand)
_FP64_BLOCK = 1 << 20


def _norms_and_dot(v0: Tensor, v1: Tensor) -> tuple[float, float, float]:
    """‖v0‖, ‖v1‖ and ⟨v0, v1⟩ in fp64, reading the fp32 tensors in blocks.

    A tensor of at most one block is reduced whole, as ever; a larger one block by block, so only
    two blocks are ever in fp64 instead of three whole fp64 copies (6 × the fp32 tensor). The
    block sums round differently from one whole sum, by fp64 ulps: far below what the fp32
    coefficients derived from them can resolve.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() <= _FP64_BLOCK:
        x, y = a.double(), b.double()
        return float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y)), float((x * y).sum())
    sq0 = sq1 = dot = 0.0
    for i in range(0, a.numel(), _FP64_BLOCK):
        x, y = a[i : i + _FP64_BLOCK].double(), b[i : i + _FP64_BLOCK].double()
        sq0 += float(x.square().sum())
        sq1 += float(y.square().sum())
        dot += float(x.mul_(y).sum())
    return math.sqrt(sq0), math.sqrt(sq1), dot


def model_stock_ratio(deltas: Tensor) -> Tensor:
    """Model Stock's interpolation ratio t = N·cos / (1 + (N−1)·cos) for one tensor (0-d tensor).

    cos is the mean over model pairs of cos∠(τ_i, τ_j) on the flattened tensor, each clamped to
    [−1, 1] with the norm product clamped to ≥ 1e-6 (mergekit's convention). FusionBench instead
    averages the pairwise *angles* (in degrees) and takes the cosine of the mean; for N = 2 the
    two agree.
    """
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            c = (flat[i] @ flat[j]) / (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append(c.clamp(-1, 1))
    cos = torch.stack(cosines).mean()
    return n * cos / (1 + (n - 1) * cos)


@merge_method(
    "model_stock",
    summary="t·mean(θ_t) + (1−t)·θ0 with t from the mean pairwise cosine of the task vectors.",
    paper="Jang et al., Model Stock, ECCV 2024 (arXiv 2403.19522)",
    chunkable=False,
    min_models=2,
    notes="Mean of pairwise cosines (mergekit); FusionBench averages angles for N > 2.",
    memory="whole tensor: the engine's (N+1) x largest inputs and the output; the cosines need no copy",
)
def model_stock(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
) -> Tensor:
    """Model Stock, per tensor: θ = t·mean_t θ_t + (1 − t)·θ0, i.e. Δ = t · mean_t τ_t.

    Jang, Yun, Han, ECCV 2024 (arXiv 2403.19522); no official code, so distac follows mergekit's
    ``model_stock`` (see :func:`model_stock_ratio`). Like mergekit and FusionBench, no guard for
    cos ≤ 0 (t ≤ 0 extrapolates towards or beyond θ0); a cos of exactly −1/(N−1) makes t infinite
    and is reported as an error naming the tensor. mergekit's ``filter_wise`` (per-row t) is not
    offered. A single-element tensor (``logit_scale``, a 0-d parameter) has no angle (its cosine is
    ±1, and −1 with two models makes t infinite), so it is averaged (t = 1), as FusionBench plain-
    averages its ``ignore_keys`` such as ``logit_scale``. No parameters.

    Memory: whole tensor; the pairwise dot products read the task vectors in place.
    """
    if deltas[0].numel() == 1:
        return deltas.mean(0)
    t = model_stock_ratio(deltas)
    if not torch.isfinite(t):
        raise DistacError(
            f"model_stock: tensor '{ctx.name}': the ratio is not finite (pairwise cosines average to {float(t)}); "
            "the task vectors point in opposite directions; merge these models with another method"
        )
    return t * deltas.mean(0)

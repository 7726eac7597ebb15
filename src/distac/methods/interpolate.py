"""Interpolation in weight space: SLERP (two models), Model Stock, and mergekit's NuSLERP,
Multi-SLERP and Karcher mean.

All look at each tensor as a whole (a norm or an angle over all of its entries), so none is
chunkable. They are written, like every method, as functions returning the merged *task vector*;
the engine adds the base back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from ..errors import DistacError
from .base import Count, Range, TensorContext, merge_method
from .basic import Weights, model_weights, weights_sum_nonzero

__all__ = ["karcher", "karcher_mean", "model_stock", "model_stock_ratio", "multislerp", "nuslerp", "slerp"]

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


# ----------------------------------------------------------------------------------------------
# mergekit's spherical methods: NuSLERP, Multi-SLERP, Karcher mean
# ----------------------------------------------------------------------------------------------
#: the vectors these methods move on the sphere are the task vectors the engine hands them: θ_t − θ0
#: with a base, the weights θ_t themselves when the base is all zeros (a mergekit config without
#: ``base_model``), which is exactly mergekit's choice in each case.
_ON_DELTAS = (
    "On the task vectors with a base (mergekit with base_model), on the weights when the base is zeros "
    "(mergekit without base_model)."
)


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """mergekit's ``nuslerp`` on two tensors: SLERP along the last dim (dim 0 if ``row_wise``), or of the whole.

    Unit vectors use norms clamped to ≥ 1e-7; pairs with 1 − cos² ≤ 1e-16 (parallel or
    antiparallel, or a zero vector) are interpolated linearly.
    """
    eps = 1e-8
    shape = v0.shape
    flatten = flatten or v0.dim() == 0  # a scalar is its own flattened vector
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    # torch.norm, not linalg.vector_norm: mergekit's own calls, so the results are mergekit's bits
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    del u0, u1
    # mergekit computes both branches and picks with where; computing only the branch every vector
    # takes (always so for the flattened tensor) gives the same values with fewer copies
    if bool(collinear.all()):
        res = (1 - t) * v0 + t * v1
    else:
        theta = torch.acos(torch.where(collinear, 0, cos))
        res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
        if bool(collinear.any()):
            res = torch.where(collinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@merge_method(
    "nuslerp",
    summary="SLERP of two task vectors (or weights without a base), whole tensor, per row or per column.",
    paper="mergekit nuslerp (arcee-ai/mergekit, mergekit/merge_methods/nuslerp.py); Shoemake, SIGGRAPH 1985",
    chunkable=False,
    min_models=2,
    max_models=2,
    notes="t = w_2/(w_1+w_2) from the per-model weights, as mergekit (weights default 1, 1: t = 0.5); "
    "exact collinearity test (1-cos² ≤ 1e-16), not slerp's 0.9995. " + _ON_DELTAS,
    memory="whole tensor: the engine's (N+1) x largest inputs, the output and a few fp32 copies (unit vectors, terms)",
)
def nuslerp(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    weights: Weights = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """NuSLERP (mergekit ``nuslerp``): spherical interpolation of τ_1 → τ_2 with t = w_2 / (w_1 + w_2).

    mergekit's source is the reference (no paper; SLERP is Shoemake 1985). With a base the two
    *task vectors* are interpolated and θ0 added back (mergekit with ``base_model``); with an
    all-zeros base (a mergekit config without one) the weights themselves. ``nuslerp_flatten``
    (default True) interpolates the whole flattened tensor; False interpolates each row along the
    last dim, or each column (vectors along dim 0) with ``nuslerp_row_wise``. Unlike ``slerp`` the
    fallback to linear interpolation is only for exactly collinear pairs (1 − cos² ≤ 1e-16) or a
    zero vector. ``weights`` default to (1, 1), i.e. t = 0.5, which is also mergekit's t when
    |w_1 + w_2| < 1e-6.

    Memory: whole tensor; unit-vector copies of both task vectors and the SLERP terms in fp32.
    """
    w = [1.0, 1.0] if weights is None else (weights if isinstance(weights, list) else [weights, weights])
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    return _nuslerp_pair(t, deltas[0], deltas[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


def _normalized_weights_sum_nonzero(params: Mapping[str, Any], n: int) -> str | None:
    """Multi-SLERP divides the weights by their sum only with ``normalize_weights``."""
    return weights_sum_nonzero(params, n) if params["normalize_weights"] else None


@merge_method(
    "multislerp",
    summary="Barycentric interpolation of N task vectors (or weights) on the hypersphere, whole tensor.",
    paper="mergekit multislerp (arcee-ai/mergekit, mergekit/merge_methods/multislerp.py; "
    "goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    chunkable=False,
    checks=(_normalized_weights_sum_nonzero,),
    notes="Weights default 1 each, normalised (normalize_weights). " + _ON_DELTAS,
    memory="whole tensor: the engine's (N+1) x largest inputs, the output and about 2N + 3 fp32 copies "
    "(the unit vectors, turned into tangents in place, and one N x largest temporary)",
)
def multislerp(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    weights: Weights = None,
    normalize_weights: bool = True,
    eps: Annotated[float, Range(0)] = 1e-8,
) -> Tensor:
    """Multi-SLERP (mergekit ``multislerp``): a weighted mean on the unit sphere, scaled to the mean norm.

    mergekit's source and its author's note are the reference. Each flattened task vector
    (weights, without a base) is divided by its norm + eps; the weighted mean m of the unit
    vectors is normalised; the unit vectors are projected to the tangent space at m and averaged
    with the weights (g); the result is exp_m(g) = m·cos‖g‖ + g·sin‖g‖/‖g‖ (‖g‖ + eps), times the
    weighted mean of the norms. ``normalize_weights`` (default True) divides the weights by their
    sum. One model returns it unchanged; a weighted mean of unit vectors with norm < eps (antipodal
    inputs) falls back to the weighted sum for two models and is an error for more (mergekit's rule).

    Memory: whole tensor; the unit vectors (turned into their tangents in place) and one
    N x largest temporary in fp32.
    """
    n = deltas.shape[0]
    if n == 1:
        return deltas[0].clone()
    flat = deltas.reshape(n, -1)
    w = model_weights(weights, n, flat).reshape(n)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if n == 2:
            return (deltas[0] * w[0] + deltas[1] * w[1]).view(deltas.shape[1:])
        raise DistacError(
            f"multislerp: tensor '{ctx.name}': the weighted mean of the unit task vectors is zero (antipodal "
            "vectors whose weights cancel); give other weights"
        )
    mean = mean / mean_norm
    # the tangents overwrite the unit vectors (same bits as units − dots·mean), one N x largest copy fewer
    tangents = units.sub_((units * mean).sum(-1, keepdim=True) * mean)
    g = (tangents * w.view(-1, 1)).sum(0)
    g_norm = torch.norm(g) + eps
    result = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
    return (result * (norms.squeeze(-1) * w).sum()).view(deltas.shape[1:])


def karcher_mean(points: Iterable[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """mergekit's ``karcher_merge_tensors`` with uniform weights: the Karcher mean direction times the mean norm.

    ``points``: the N tensors (an (N, *S) tensor, or any iterable of them: a generator keeps only
    their unit vectors alive). The points are normalised (a zero one stays zero and those with a
    norm ≤ ``tol`` are left out of the direction); the mean direction starts at the normalised
    weighted Euclidean mean (or the first valid unit vector when that is ≤ ``tol``) and moves by
    the Riemannian gradient Σ_t α_t·θ_t/sin θ_t·(u_t − cos θ_t·m) through the exponential map, at
    most ``max_iter`` times, until the gradient's norm is below ``tol``. The result is the mean
    direction times Σ_t α_t‖x_t‖ (α_t = 1/N, over all points).

    Example:
        >>> karcher_mean(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
        tensor([2.1213, 2.1213])
    """
    first: Tensor | None = None
    norms: list[Tensor] = []
    units: list[Tensor] = []
    for p in points:
        first = p if first is None else first
        norms.append(torch.linalg.vector_norm(p))
        units.append(torch.zeros_like(p) if float(norms[-1]) == 0.0 else p / norms[-1])
    n = len(units)
    if first is None:
        raise ValueError("karcher_mean needs at least one point")
    if n == 1:
        return first.clone()
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(first)
    total = sum(alphas[i] for i in valid)
    weighted = [(alphas[i] / total, units[i]) for i in valid]
    mean = torch.zeros_like(first)
    for a, u in weighted:
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = weighted[0][1].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in weighted:
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(a * nm for a, nm in zip(alphas, norms, strict=True))
    return scale * mean


@merge_method(
    "karcher",
    summary="Karcher (Riemannian) mean of the N models' weights on the hypersphere, scaled to their mean norm.",
    paper=(
        "Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; mergekit karcher, after "
        "'Functionality-Oriented LLM Merging on the Fisher-Rao Manifold' (arXiv 2603.04972, cited by mergekit's docs)"
    ),
    chunkable=False,
    notes="Uniform weights, max_iter 10, tol 1e-5, as mergekit. The mean is of the weights θ_t: the base is only "
    "the reference (a mergekit config's base_model is averaged in as one more point, as mergekit gathers it).",
    memory="whole tensor: the engine's (N+1) x largest inputs, the output and N + 4 fp32 copies "
    "(the unit vectors, the first weights, mean, tangent)",
)
def karcher(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    max_iter: Annotated[int, Count(1)] = 10,
    tol: Annotated[float, Range(0)] = 1e-5,
) -> Tensor:
    """Karcher mean (mergekit ``karcher``): the Riemannian centre of mass of the weights on the unit sphere.

    Karcher (1977); mergekit's ``karcher_merge_tensors`` is the reference (see :func:`karcher_mean`):
    each tensor θ_t is split into its norm and direction, the directions' Karcher mean is found by
    at most ``max_iter`` (10) gradient steps until the step is below ``tol`` (1e-5), and the result
    is that direction times the mean norm. mergekit's ``karcher`` takes no base model, so this
    averages the weights θ_t = θ0 + τ_t (re-formed in fp32) and returns the result minus θ0; with
    an all-zeros base (a mergekit config) the weights are the task vectors. mergekit gathers a
    config's ``base_model`` with the models, so a mergekit config reading adds it as a point.
    One model is returned unchanged.

    Memory: whole tensor; the N unit vectors (each θ_t is formed and normalised in turn), the mean
    and the tangent in fp32.
    """
    if deltas.shape[0] == 1:
        return deltas[0].clone()
    # the weights θ_t one at a time: only their unit vectors stay alive
    return karcher_mean((base + d for d in deltas), max_iter=max_iter, tol=tol).sub_(base)

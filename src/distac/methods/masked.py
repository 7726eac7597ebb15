"""Masked task arithmetic: Breadcrumbs (per-row magnitude bands) and Consensus (TALL masks).

Members of the task-arithmetic family of :mod:`distac.methods.sparse` (its module docstring has the
table of steps and the shared conventions): they reuse its weighting, election, disjoint merge,
thresholds and row blocks, and differ only in the mask they apply to the task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from .base import PerModel, Range, TensorContext, merge_method
from .basic import ROW_CHUNKED, Weights, model_weights
from .sparse import (
    _FAMILY_NOTES,
    Density,
    MergeFn,
    Scale,
    Scope,
    _blockwise,
    _column,
    _combine,
    _per_model,
    _trim_planner,
    magnitude_thresholds,
    trim_magnitude,
)

__all__ = ["breadcrumbs", "breadcrumbs_mask", "breadcrumbs_ties", "consensus_mask", "consensus_ta", "consensus_ties"]

#: Breadcrumbs ranks each row along the last dim, so rows of the first dim are independent: the
#: sort indices, ranks and masks (~6 (N, rows, ...) temporaries, int64 among them) live per block.
BREADCRUMBS_MEMORY = (
    "whole tensor: the engine's (N+1) x largest inputs and the output; the per-row ranks in blocks of rows "
    "(a few x 4 MiB), except for a 1-D tensor (one row: ~6 x N x its size)"
)


def breadcrumbs_mask(deltas: Tensor, *, density: float | list[float], gamma: float) -> Tensor:
    """Model Breadcrumbs: per row (last dim), drop the top ``gamma`` fraction by |τ|, keep the next ``density``.

    Davari & Belilovsky, ECCV 2024 (arXiv 2312.06795), official ``TaskVectorMiddleKeep``
    (remove first): with row length L, the entries whose descending-magnitude rank lies in
    ``[int(γL), int(γL) + int(βL))`` are kept. 0-d tensors are returned unchanged, 1-d tensors are
    one row. mergekit's ``breadcrumbs`` ranks over the whole tensor instead of per row, and its
    ``density`` is the final keep fraction with ``1 - density - gamma`` removed from the bottom.
    Ties in magnitude are broken by position (stable sort); the official ``topk`` breaks them
    arbitrarily.
    """
    if deltas.dim() <= 1:  # a scalar per model: untouched, as in the official code
        return deltas.clone()
    n, length = deltas.shape[0], deltas.shape[-1]
    order = torch.sort(deltas.abs(), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(length, device=deltas.device).expand_as(order))
    lo = int(length * gamma)
    hi = _column([lo + int(length * d) for d in _per_model(density, n)], ranks)
    keep = (ranks >= lo) & (ranks < hi)
    return torch.where(keep, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))


# ----------------------------------------------------------------------------------------------
# parameter checks beyond each parameter's own range (run by Method.resolve)
# ----------------------------------------------------------------------------------------------
def _k_at_most_n(params: Mapping[str, Any], n: int) -> str | None:
    """Consensus: more required votes than models would keep nothing and return the base model."""
    if params["k"] <= n:
        return None
    k = params["k"]
    return f"parameter 'k' = {k} is larger than the number of models ({n}), so no weight could be kept; use k <= {n}"


def _band_fits_row(params: Mapping[str, Any], n: int) -> str | None:
    """Breadcrumbs: the kept band [γL, (γ + density)L) must fit in the row, else density is not what is kept."""
    worst = max(_per_model(params["density"], n))
    if params["gamma"] + worst <= 1:
        return None
    return (
        f"parameters 'gamma' ({params['gamma']}) + 'density' ({worst}) exceed 1: the kept band would run past the "
        "end of each row; lower density to at most 1 - gamma"
    )


@merge_method(
    "breadcrumbs",
    summary="Per-row mask dropping the top gamma and keeping the next density by |τ|, then task arithmetic.",
    paper="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)",
    # rows lie along the last dim; a 1-D tensor is one row, so a chunk could split it
    chunkable=False,
    notes="Masks per row along the last dim (official); mergekit masks per whole tensor. " + _FAMILY_NOTES,
    memory=BREADCRUMBS_MEMORY,
    checks=(_band_fits_row,),
)
def breadcrumbs(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 0.2,
    gamma: Annotated[float, Range(0, 1, hi_open=True)] = 0.1,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Model Breadcrumbs: θ = θ0 + λ Σ_t w_t · mask_t ⊙ τ_t, mask per row (see :func:`breadcrumbs_mask`).

    Davari & Belilovsky, ECCV 2024 (arXiv 2312.06795). ``density`` = β (``top_k_keep``) and
    ``gamma`` = γ (``top_k_remove``); defaults β = 0.2, γ = 0.1 from the official README example
    (its α is 0.4; distac's ``scale`` defaults to 1.0 like the rest of the family). mergekit masks
    per tensor, with ``gamma`` 0.01 and ``density`` 1.0 by default. Not in FusionBench.

    Memory: whole tensor (each row is ranked whole), but the sort, ranks and mask are computed
    over 4 MiB blocks of rows, so only the engine's (N+1) inputs and the output are tensor-sized.
    """
    return _blockwise(
        deltas,
        lambda d: _combine(
            breadcrumbs_mask(d, density=density, gamma=gamma), weights=weights, elect=False, merge_fn="sum", scale=scale
        ),
    )


@merge_method(
    "breadcrumbs_ties",
    summary="Breadcrumbs masks, then TIES sign election and disjoint merge.",
    paper="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)",
    chunkable=False,
    notes="mergekit's breadcrumbs_ties masks per tensor and sums (merge_fn=sum). " + _FAMILY_NOTES,
    memory=BREADCRUMBS_MEMORY,
    checks=(_band_fits_row,),
)
def breadcrumbs_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 0.2,
    gamma: Annotated[float, Range(0, 1, hi_open=True)] = 0.1,
    merge_fn: MergeFn = "mean",
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and disjoint merge (mergekit ``breadcrumbs_ties``).

    Masks as in :func:`breadcrumbs` (per row, official); election and merge as in :func:`ties`.
    mergekit masks per tensor and merges with ``normalize: false`` (``merge_fn="sum"``).

    Memory: as :func:`breadcrumbs` (whole tensor, ranks in 4 MiB blocks of rows).
    """
    return _blockwise(
        deltas,
        lambda d: _combine(
            breadcrumbs_mask(d, density=density, gamma=gamma),
            weights=weights,
            elect=True,
            merge_fn=merge_fn,
            scale=scale,
        ),
    )


def consensus_mask(deltas: Tensor, mtl: Tensor, *, tall_lambda: float | list[float], k: float) -> Tensor:
    """TALL masks and their consensus, shape ``S`` (bool).

    Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024
    (arXiv 2405.07813): m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|} (strict), consensus = 1{Σ_t m_t ≥ k}.
    """
    lam = _column(_per_model(tall_lambda, deltas.shape[0]), deltas)
    tall = deltas.abs() > lam * (mtl.unsqueeze(0) - deltas).abs()
    return tall.sum(0) >= k


Lambda = Annotated[float | list[float], Range(0), PerModel()]


@merge_method(
    "consensus_ta",
    summary="Task arithmetic restricted to weights that at least k TALL masks select.",
    paper="Wang et al., Localizing Task Information (TALL masks / Consensus), ICML 2024 (arXiv 2405.07813)",
    notes="tall_lambda defaults to 0.4, the middle of the official per-task validation grid {0.2..0.6}; "
    "mergekit's removed consensus_ta used k=1, λ=1.",
    memory=ROW_CHUNKED,
    checks=(_k_at_most_n,),
)
def consensus_ta(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    k: Annotated[int, Range(0)] = 2,
    tall_lambda: Lambda = 0.4,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Consensus Task Arithmetic: θ = θ0 + α · (m_cons ⊙ τ_MTL), τ_MTL = Σ_t w_t τ_t.

    Wang et al., ICML 2024 (arXiv 2405.07813), official ``tall_masks``. ``k`` = ``prun_thre_k``
    (default 2: drops weights used by fewer than two tasks; k = 0 is TA, k > T gives θ0).
    ``tall_lambda``: the official code picks λ_t ∈ {0.2, …, 0.6} per task on validation data; the
    default 0.4 is the middle of that grid, since a data-free merge cannot search it. α is searched
    on validation in {0.1, …, 1.0} officially; ``scale`` defaults to 1.0 like task arithmetic.
    Weights scale each τ_t before the masks. mergekit's former ``consensus_ta`` (removed in a2dda31)
    used k = 1 and λ = 1 with masks per tensor; since all the masks are elementwise, distac's
    per-tensor computation equals the official flattened one.

    Memory: row-chunked (the masks are element-wise); a weighted copy and the masks per piece.
    """
    x = model_weights(weights, deltas.shape[0], deltas) * deltas
    mtl = x.sum(0)
    return scale * torch.where(consensus_mask(x, mtl, tall_lambda=tall_lambda, k=k), mtl, torch.zeros_like(mtl))


@merge_method(
    "consensus_ties",
    summary="Consensus mask applied to the TIES (top density, disjoint sum) multi-task vector.",
    paper="Wang et al., Localizing Task Information (TALL masks / Consensus), ICML 2024 (arXiv 2405.07813)",
    prepass=_trim_planner("density"),
    notes="Official use_ties: TIES k=20 with dis-sum for τ_MTL; TALL masks use the untrimmed τ_t.",
    memory=ROW_CHUNKED,
    checks=(_k_at_most_n,),
)
def consensus_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    k: Annotated[int, Range(0)] = 2,
    tall_lambda: Lambda = 0.4,
    density: Density = 0.2,
    scope: Scope = "global",
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Consensus TIES: as :func:`consensus_ta` with τ_MTL = TIES(top ``density``, disjoint *sum*, λ = 1).

    Wang et al., ICML 2024 (arXiv 2405.07813), official ``use_ties``: the multi-task vector is TIES
    with k = 20 and "dis-sum"; the TALL masks compare it with the *untrimmed* τ_t.

    Memory: row-chunked; the weighted and trimmed copies and the masks per piece.
    """
    x = model_weights(weights, deltas.shape[0], deltas) * deltas
    thr = magnitude_thresholds(deltas, density=density, scope=scope, ctx=ctx)
    mtl = _combine(trim_magnitude(deltas, thr), weights=weights, elect=True, merge_fn="sum", scale=1.0)
    return scale * torch.where(consensus_mask(x, mtl, tall_lambda=tall_lambda, k=k), mtl, torch.zeros_like(mtl))

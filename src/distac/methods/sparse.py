"""The task-arithmetic family as one composition of small pure steps.

Every method here and in :mod:`distac.methods.masked` (Breadcrumbs, Consensus) is
``scale · merge(elect(weights · sparsify(τ)))`` with one choice per column (the idea of mergekit's
``GeneralizedTaskArithmetic``, written as a table instead of classes):

=================  ==========================  ===========  =============================
method             sparsify                    elect        merge
=================  ==========================  ===========  =============================
task_arithmetic    none                        none         sum          (``basic.py``)
ties               magnitude (global|tensor)   mass         disjoint mean | sum
dare_linear        DARE random drop            none         sum
dare_ties          DARE, then magnitude        mass         disjoint mean | sum
della              MAGPRUNE (rank-scaled DARE)  mass         disjoint weighted mean | sum
della_linear       MAGPRUNE (rank-scaled DARE)  none         sum | weighted mean
breadcrumbs        per-row middle band         none         sum
breadcrumbs_ties   per-row middle band         mass         disjoint mean | sum
consensus_ta       none; TALL consensus mask   none         sum, masked
consensus_ties     magnitude; TALL consensus   mass         disjoint sum, masked
=================  ==========================  ===========  =============================

Conventions shared by the family (each function's docstring adds its own):

* ``weights`` (per model, default all 1) multiply each *sparsified* task vector before the sign
  election, so they act like mergekit's ``weight``. ``merge_fn="mean"`` divides by the *count* of
  agreeing entries (official TIES / peft); ``merge_fn="weighted_mean"`` by the sum of their
  weights (mergekit ``normalize: true``, DELLA's default); the two agree for unit weights. A
  negative weight negates a task.
* ``density`` is always the fraction *kept* (mergekit/peft ``density``; MergeLM's
  ``weight_mask_rate`` and FusionBench's ``sparsity_ratio`` are ``1 - density``; TIES's "top-k%"
  is ``density = k/100``).
* ``scale`` is the λ/α applied last.

Parameter names elsewhere:

==============  ===================  ==============================  ================================
distac          mergekit             FusionBench                     official / MergeLM
==============  ===================  ==============================  ================================
density         density              1 − sparsity_ratio (DARE);      k/100 (TIES ``topk``);
                                     threshold/100 (TIES)            1 − weight_mask_rate (DARE)
trim_density    (none: no trim)      threshold/100 (dare_ties)       1 − param_value_mask_rate
scope           always "tensor"      always "global"                 "global" (TIES, TALL)
merge_fn        normalize            merge_func                      "dis-mean" / "dis-sum"
                (weighted_mean)
epsilon         epsilon              (no DELLA)                      ε (DELLA)
rescale         rescale (L1)         rescale (1/density)             (DELLA: 1/p_i)
scale           lambda               scaling_factor                  λ / α
weights         weight               (none)                          (none)
seed            global set_seed      (global RNG)                    seed (MergeLM)
k, tall_lambda  k, lambda (removed)  (no Consensus merge)            prun_thre_k, tall_mask_lambda
gamma           gamma                (no Breadcrumbs)                top_k_remove (β = top_k_keep)
==============  ===================  ==============================  ================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from ..errors import DistacError
from ..merging.kth import magnitude_threshold
from .base import OneOf, PerModel, Prepass, Range, TensorContext, merge_method
from .basic import ROW_CHUNKED, Weights, model_weights
from .rng import keep_where, stream_key, uniform

__all__ = [
    "dare",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "disjoint_merge",
    "elect_sign",
    "magprune",
    "model_keys",
    "ties",
    "trim_magnitude",
]

Density = Annotated[float | list[float], Range(0, 1, lo_open=True), PerModel()]
Scope = Annotated[str, OneOf(("global", "tensor"))]
MergeFn = Annotated[str, OneOf(("mean", "sum", "weighted_mean"))]
#: the merge of the methods without sign election: a plain sum, or divided by Σ_t w_t (mergekit normalize)
LinearMergeFn = Annotated[str, OneOf(("sum", "weighted_mean"))]
Epsilon = Annotated[float | list[float], Range(0, 1, hi_open=True), PerModel()]
Scale = Annotated[float, Range()]
Seed = Annotated[int | list[int], Range(0), PerModel()]


def _per_model(v: float | list[float], n: int) -> list[float]:
    return [float(x) for x in v] if isinstance(v, list | tuple) else [float(v)] * n


def model_keys(seed: int | list[int], name: str, n: int) -> list[tuple[int, int]]:
    """Per-model DARE stream keys: ``(seed, name, t)`` for a scalar seed, ``(seed[t], name)`` for a list."""
    if isinstance(seed, list | tuple):
        return [stream_key(int(s), name) for s in seed]
    return [stream_key(int(seed), name, t) for t in range(n)]


def _column(values: list[float], like: Tensor) -> Tensor:
    """Per-model scalars shaped ``(N, 1, ..., 1)`` to broadcast against ``(N, *S)``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# sparsify steps: (N, *S) -> (N, *S), zeros where dropped
# ----------------------------------------------------------------------------------------------
def magnitude_thresholds(deltas: Tensor, *, density: float | list[float], scope: str, ctx: TensorContext) -> Tensor:
    """Per-model thresholds, shape (N,): the engine's global pre-pass, or this tensor's own.

    ``scope="global"`` (official TIES ``topk_values_mask`` over the flattened model, FusionBench,
    TALL, DisTaC) reads ``ctx.thresholds``; ``scope="tensor"`` (mergekit, peft) uses the threshold
    of this tensor alone: the engine's, computed over the row chunks of a tensor it splits (two-pass
    radix selection), else :func:`distac.merging.kth.magnitude_threshold` on the whole tensor. Both
    equal ``torch.kthvalue`` on ``|τ|`` bit for bit.
    """
    if scope == "global":
        if ctx.thresholds is None:
            raise DistacError(
                f"tensor '{ctx.name}': scope='global' needs the global magnitude thresholds of the engine's "
                "pre-pass; call the method through distac.merge, or use scope='tensor'"
            )
        return ctx.thresholds.to(deltas.device, deltas.dtype)
    if ctx.thresholds is not None:
        return ctx.thresholds.to(deltas.device, deltas.dtype)
    if tuple(deltas.shape[1:]) != tuple(ctx.shape):
        raise DistacError(
            f"tensor '{ctx.name}': scope='tensor' got a row chunk without the tensor's thresholds; "
            "the engine computes them for the tensors it splits"
        )
    dens = _per_model(density, deltas.shape[0])
    return torch.tensor(
        [magnitude_threshold(deltas[i], d) for i, d in enumerate(dens)], dtype=deltas.dtype, device=deltas.device
    )


def trim_magnitude(deltas: Tensor, thresholds: Tensor) -> Tensor:
    """TIES trim: keep ``|τ_t| >= threshold_t`` (ties at the threshold are kept, as in the official code).

    Dropped entries become +0.0. For fp32 (what the engine passes) this is computed on the bit
    patterns, 4.6x faster than ``torch.where`` on the CPU and equal to it bit for bit for finite
    inputs (the engine rejects NaN/Inf): for non-negative floats the int32 pattern is monotone in
    the value, so ``|τ| >= thr`` is ``(bits(τ) & 0x7FFFFFFF) - bits(thr) >= 0`` (no overflow: both
    lie in [0, 2**31)), whose sign, spread by an arithmetic shift, masks ``bits(τ)``.
    """
    thr = thresholds.reshape(-1, *([1] * (deltas.dim() - 1)))
    if deltas.dtype != torch.float32:
        return torch.where(deltas.abs() >= thr, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))
    # -inf (keep all) and -0.0 are the same as +0.0 for |τ| >= thr, and have non-negative bits
    thr = thr.to(deltas.device, torch.float32)
    thr_bits = torch.where(thr > 0, thr, torch.zeros((), device=thr.device)).view(torch.int32)
    bits = deltas.view(torch.int32)
    out = torch.bitwise_and(bits, 0x7FFFFFFF)  # bits of |τ|
    out.sub_(thr_bits).bitwise_right_shift_(31)  # -1 (all ones) where |τ| < thr, else 0
    return out.bitwise_not_().bitwise_and_(bits).view(torch.float32)


def dare(deltas: Tensor, *, density: float | list[float], seed: int | list[int], ctx: TensorContext) -> Tensor:
    """DARE drop-and-rescale: δ̃_t = m_t ⊙ δ_t / density_t, with m_t ~ Bernoulli(density_t).

    Yu et al., "Language Models are Super Mario", ICML 2024 (arXiv 2311.03099). The rescale is the
    exact ``1/(1-p)`` of the official MergeLM code and peft; mergekit (its current ``dare``) instead
    rescales to match the L1 norm of the kept entries, so its results differ.

    Entry ``j`` of model ``t`` is kept when ``u < density_t`` with ``u`` from
    :func:`distac.methods.rng.uniform` keyed by ``(seed, ctx.name, t)`` (or ``(seed[t], ctx.name)`` when
    ``seed`` is a per-model list, see :func:`model_keys`) at counter ``ctx.offset + j``: the mask
    does not depend on tensor order, row chunking, process or device, and with a seed list
    permuted along with the models, not on the model order either.
    """
    n = deltas.shape[0]
    dens, keys = _per_model(density, n), model_keys(seed, ctx.name, n)
    out = torch.empty_like(deltas)
    for i, d in enumerate(dens):
        # = torch.where(uniform(...) < d, δ, 0) bit for bit, without materialising the uniforms
        keep_where(keys[i], ctx.offset, d, deltas[i], out=out[i])
        if d != 1:
            # where(keep, δ, 0) / d = where(keep, δ/d, 0) exactly: δ/d, not δ·(1/d), as the reference.
            # d as a 0-dim tensor on out's device: PyTorch's CUDA kernel turns division by a Python
            # scalar into multiplication by its reciprocal, which rounds differently from the CPU's δ/d
            out[i].div_(torch.tensor(d, dtype=out.dtype, device=out.device))
    return out


def magprune(
    deltas: Tensor,
    *,
    density: float | list[float],
    epsilon: float | list[float],
    rescale: bool,
    seed: int | list[int],
    ctx: TensorContext,
) -> Tensor:
    """DELLA's MAGPRUNE: drop τ_t entries at random, the larger ones with the smaller probability.

    Deep et al., "DELLA-Merging", 2024 (arXiv 2406.11617), as mergekit's ``della_magprune``
    computes it. Along each line of dim 1 (each row of a matrix; a 0-d or 1-D tensor is one
    line) the entries are ranked by |τ| ascending, r ∈ {1..L}; entry ``j`` of model ``t`` is kept
    with probability p = (density − ε) + 2ε·(r − 1)/(L − 1), so the keep rate over a line is
    ``density``. A line of one entry (L = 1: mergekit's division 0/0) is kept with p = density.
    Kept entries keep their value; with ``rescale`` each model's pruned tensor is then multiplied
    by ‖τ_t‖₁ / ‖pruned τ_t‖₁ (mergekit ``rescale: true``; none when either norm is below 1e-7),
    without it they are not rescaled (mergekit ``rescale: false``). A model with density ≥ 1 is
    returned unchanged. The DELLA paper rescales each kept entry by 1/p instead.

    Randomness: the uniforms of :func:`distac.methods.dare` (same keys, same counters), and an
    entry is kept when u < p. With ε = 0 (p = density everywhere) the kept entries are exactly
    DARE's. Ties in |τ| are ranked by position (stable sort); mergekit's argsort breaks them
    arbitrarily.
    """
    n = deltas.shape[0]
    dens, eps, keys = _per_model(density, n), _per_model(epsilon, n), model_keys(seed, ctx.name, n)
    out = torch.empty_like(deltas)
    for i in range(n):
        if dens[i] >= 1:
            out[i] = deltas[i]
            continue
        _magprune_one(deltas[i], out[i], dens[i], eps[i], keys[i], ctx.offset)
        if rescale:
            before, after = deltas[i].abs().sum(), out[i].abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                out[i].mul_(before / after)
    return out


def _magprune_one(d: Tensor, out: Tensor, density: float, epsilon: float, key: tuple[int, int], offset: int) -> None:
    """One model's MAGPRUNE mask applied into ``out``, in blocks of whole lines (rows of dim 0)."""
    lines = d.reshape(1, -1) if d.dim() < 2 else d
    dst = out.view(lines.shape)
    row = lines[:1].numel()
    step = max(1, _BLOCK_ELEMS // max(1, row))
    for r in range(0, lines.shape[0], step):
        x = lines[r : r + step]
        u = uniform(key, offset + r * row, x.numel(), device=x.device).view(x.shape)
        # x·mask, as mergekit's ``tensor * mask``: a dropped entry becomes ±0 with the sign of x
        torch.mul(x, u < _keep_probabilities(x, density, epsilon), out=dst[r : r + step])


def _keep_probabilities(x: Tensor, density: float, epsilon: float) -> Tensor:
    """p = (density − ε) + 2ε·(rank − min)/(max − min) along dim 1, in mergekit's fp32 operations."""
    length = x.shape[1]
    if length == 1:
        return torch.full_like(x, density)
    order = torch.sort(x.abs(), dim=1, stable=True).indices
    shape = [1] * x.dim()
    shape[1] = length
    ranks = torch.empty_like(x)
    ranks.scatter_(1, order, torch.arange(1, length + 1, dtype=x.dtype, device=x.device).view(shape).expand_as(x))
    lo, hi = ranks.amin(dim=1, keepdim=True), ranks.amax(dim=1, keepdim=True)
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


# ----------------------------------------------------------------------------------------------
# elect and merge steps
# ----------------------------------------------------------------------------------------------
def elect_sign(x: Tensor) -> Tensor:
    """TIES sign election by mass: γ = sgn(Σ_t x_t), shape ``S``, with +1 where Σ_t x_t = 0.

    Where Σ_t x_t = 0 the official ``resolve_zero_signs(..., "majority")`` uses the sign of the sum of
    all elected signs *of the whole flattened model*, a statistic the streaming engine does not have
    when it merges a tensor (or a row chunk of one). A majority over the piece at hand would make the
    result depend on chunking (bf16 inputs cancel exactly often enough to show it), so distac uses
    +1, as the DisTaC repository's fallback (sgn Σ|·|) effectively does. This differs from the
    official code only where nonzero entries cancel exactly *and* the model's majority sign is
    negative. mergekit (0.1.5, ``get_mask``: ``sum >= 0``) and peft (``calculate_majority_sign_mask``:
    ``where(sum >= 0, 1, -1)``) elect +1 there too, so the positive entries are merged.
    """
    # = where(sign(s) == 0, 1, sign(s)) for every non-NaN s (s = -0.0 included), without a where
    return (x.sum(0) >= 0).to(x.dtype).mul_(2).sub_(1)


def disjoint_merge(x: Tensor, sign: Tensor, merge_fn: str, weights: Tensor | None = None) -> Tensor:
    """TIES disjoint merge: combine only the entries whose sign agrees with the elected one.

    ``"mean"``: Σ_{t∈A} x_t / max(|A|, 1) (official TIES, MergeLM, peft); ``"sum"``: Σ_{t∈A} x_t
    (FusionBench ``merge_func: sum``, the TALL/Consensus multi-task vector, mergekit with
    ``normalize: false``); ``"weighted_mean"``: Σ_{t∈A} x_t / Σ_{t∈A} w_t, a zero divisor read as 1
    (mergekit ``normalize: true``), with ``weights`` the (N, 1, ..., 1) column of w_t (None: all 1,
    which is ``"mean"``).
    """
    # Without torch.where (2.3 ns per entry on the CPU, unvectorised), same bits for finite x:
    # with s = +1 where sign > 0 and -1 elsewhere, x_t agrees iff y_t = s·x_t > 0 (s·x_t is exact);
    # clamp(y, min=0) zeroes the others, and s·Σ_t clamp(y_t) = Σ_{t∈A} x_t in the same order
    # (negation is exact). + 0.0 turns a -0.0 total (no agreeing entry) into the +0.0 that the
    # where-based sum gives; it changes no other value.
    s = (sign > 0).to(x.dtype).mul_(2).sub_(1)
    y = (x * s).clamp_(min=0)
    total = y.sum(0).mul_(s).add_(0.0)
    if merge_fn == "sum":
        return total
    if merge_fn == "weighted_mean" and weights is not None:
        # mergekit's divisor Σ_t w_t·[t ∈ A], where a zero divisor (no agreeing entry, or weights
        # cancelling) becomes 1; with unit weights it is the count below, value for value
        den = (weights * (y > 0)).sum(0)
        return total / den.masked_fill_(den == 0, 1)
    # count in x.dtype: a bool sum accumulates in int64, 5x slower on CPU (exact for counts < 2^24)
    return total / (y > 0).sum(0, dtype=x.dtype).clamp(min=1)


#: elements of (N, rows, ...) per block in :func:`_blockwise` (4 MiB of fp32). Smaller than the
#: engine's 16 MiB pieces on purpose: the TIES tail's ~5 temporaries of a 16 MiB piece overflow
#: glibc's heap trim threshold, so every piece re-faulted its memory from the kernel (4.6 M page
#: faults, 11 s of system time on the 1 GB per-tensor merge); in 4 MiB blocks they are reused
#: (0.1 M faults) and stay in cache.
_BLOCK_ELEMS = 1 << 20


def _blockwise(deltas: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(deltas)`` computed over blocks of rows, for a row-wise ``fn: (N, *S) -> S``.

    Once per-tensor thresholds are known the rest of TIES is element-wise, and Breadcrumbs works
    on each row alone, but their masks and weighted copies are (N, *S) temporaries; on a whole
    embedding matrix they cost several times the inputs. Blocks of rows (the first dim of ``S``)
    cap them at a few × 4 MiB, whatever the tensor's size.
    """
    if deltas.dim() < 2 or deltas.numel() <= _BLOCK_ELEMS:
        return fn(deltas)
    rows = deltas.shape[1]
    step = max(1, _BLOCK_ELEMS // max(1, deltas[:, :1].numel()))
    out = torch.empty(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for r in range(0, rows, step):
        out[r : r + step] = fn(deltas[:, r : r + step])
    return out


def _combine(
    sparse: Tensor, *, weights: float | list[float] | None, elect: bool, merge_fn: str, scale: float
) -> Tensor:
    """The last three columns of the table: weight, (elect + disjoint merge | sum), scale."""
    # unit weights and scale 1 are skipped: 1·x = x exactly, and each costs a pass and a copy
    w = None if weights is None else model_weights(weights, sparse.shape[0], sparse)
    x = sparse if w is None else w * sparse
    if elect:
        merged = disjoint_merge(x, elect_sign(x), merge_fn, w)
    else:
        merged = x.sum(0)
        if merge_fn == "weighted_mean":
            merged = merged / _weight_sum(w, x)
    return merged if scale == 1 else scale * merged


def _weight_sum(w: Tensor | None, x: Tensor) -> Tensor:
    """mergekit's ``normalize`` divisor without election: Σ_t w_t, read as 1 when |Σ_t w_t| < 1e-8."""
    total = (
        torch.full((1,) * (x.dim() - 1), float(x.shape[0]), dtype=x.dtype, device=x.device) if w is None else w.sum(0)
    )
    return total.masked_fill_(total.abs() < 1e-8, 1)


def _trim_elect_merge(
    x: Tensor, thresholds: Tensor, *, weights: float | list[float] | None, merge_fn: str, scale: float
) -> Tensor:
    """TIES after the thresholds are known: trim, weight, elect, disjoint merge, scale — in row blocks."""
    return _blockwise(
        x,
        lambda d: _combine(trim_magnitude(d, thresholds), weights=weights, elect=True, merge_fn=merge_fn, scale=scale),
    )


# ----------------------------------------------------------------------------------------------
# what the engine must do first: exact magnitude thresholds (the pre-pass classes are at the end)
# ----------------------------------------------------------------------------------------------
def _trim_prepass(params: Mapping[str, Any], n: int, key: str, transform=None) -> Prepass:
    return Prepass(density=_per_model(params[key], n), transform=transform, scope=params["scope"])


def _trim_planner(key: str) -> Any:
    """Pre-pass planner: exact thresholds of ``params[key]``, over the model or per tensor (``scope``)."""

    def plan(params: Mapping[str, Any], n: int) -> Prepass | None:
        return _trim_prepass(params, n, key)

    return plan


def _dare_ties_prepass(params: Mapping[str, Any], n: int) -> Prepass | None:
    def dared(base: Tensor, deltas: Tensor, ctx: TensorContext) -> Tensor:
        # the trim threshold is a quantile of the DARE'd (dropped and rescaled) task vector
        return dare(deltas, density=params["density"], seed=params["seed"], ctx=ctx)

    return _trim_prepass(params, n, "trim_density", dared)


_FAMILY_NOTES = (
    "density = fraction kept (MergeLM weight_mask_rate = FusionBench sparsity_ratio = 1 - density); "
    "weights multiply the sparsified task vectors before sign election; merge_fn='mean' divides by "
    "the count of agreeing entries (official/peft), 'weighted_mean' by their summed weights (mergekit normalize)."
)


# ----------------------------------------------------------------------------------------------
# registered methods
# ----------------------------------------------------------------------------------------------
@merge_method(
    "ties",
    summary="Trim to the top density by |τ| (global or per tensor), elect sign by mass, disjoint mean/sum.",
    paper="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)",
    prepass=_trim_planner("density"),
    notes="Official defaults (global top 20%, dis-mean, λ=1). FusionBench: merge_fn=sum, scale=0.3. "
    "mergekit/peft: scope=tensor. Zero elected sign -> +1 (official: whole-model majority). " + _FAMILY_NOTES,
    memory=ROW_CHUNKED,
)
def ties(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 0.2,
    scope: Scope = "global",
    merge_fn: MergeFn = "mean",
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """TIES-Merging: θ = θ0 + λ · disjoint_merge(elect(w ⊙ trim(τ))).

    Yadav et al., NeurIPS 2023 (arXiv 2306.01708). Trim keeps the top ``density`` fraction of |τ_t|
    (``|τ| >= threshold``, ties kept), over the whole task vector (``scope="global"``, official) or
    per tensor (``scope="tensor"``, mergekit/peft); elect by mass; disjoint mean or sum.

    Defaults are the official recipe without validation data: k = 20 (``density=0.2``), mass
    election, disjoint mean, λ = 1. FusionBench uses ``merge_fn="sum"`` with ``scale=0.3``;
    mergekit ``ties`` trims per tensor with density 1.0 (no trim) unless set, and divides by the
    sum of the agreeing weights (``merge_fn="weighted_mean"``); the DisTaC repository keeps the
    top 10% (``density=0.1``).

    Memory: row-chunked (the engine's pieces; per-tensor thresholds come from its pre-pass), and
    the trim/elect/merge temporaries live in 4 MiB blocks of rows.
    """
    thr = magnitude_thresholds(deltas, density=density, scope=scope, ctx=ctx)
    return _trim_elect_merge(deltas, thr, weights=weights, merge_fn=merge_fn, scale=scale)


@merge_method(
    "dare_linear",
    summary="DARE random drop with exact 1/density rescale, then task arithmetic.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    notes="Counter-based RNG keyed by (seed, tensor name, model index), or (seed_t, tensor name) for a "
    "per-model seed list: independent of tensor order, chunking and device. "
    "mergekit rescales by L1 matching; official/peft/FusionBench by 1/density. " + _FAMILY_NOTES,
    memory=ROW_CHUNKED,
)
def dare_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 0.9,
    seed: Seed = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """DARE + task arithmetic: θ = θ0 + λ Σ_t w_t · m_t ⊙ τ_t / density_t.

    Yu et al., ICML 2024 (arXiv 2311.03099). ``density`` is the keep probability 1 − p; the
    default 0.9 is the official MergeLM CLI's ``weight_mask_rate`` 0.1 (its GLUE grid is
    p ∈ {0.1, …, 0.9}; FusionBench uses p = 0.5, mergekit density 1.0 = no drop). ``seed`` 0 as in
    MergeLM's LLM scripts (a list gives one seed per model, see :func:`dare`). The rescale
    is exactly 1/density (official, peft); mergekit matches L1 norms instead. Randomness: see :func:`dare`.

    Memory: row-chunked; the DARE'd copy (N x piece) and the output.
    """
    return _combine(
        dare(deltas, density=density, seed=seed, ctx=ctx), weights=weights, elect=False, merge_fn="sum", scale=scale
    )


@merge_method(
    "dare_ties",
    summary="DARE, then TIES (trim to trim_density, elect, disjoint merge) on the DARE'd task vectors.",
    paper="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)",
    prepass=_dare_ties_prepass,
    notes="Global trim threshold computed on the DARE'd deltas. mergekit dare_ties = trim_density=1, "
    "merge_fn=sum, L1 rescale; FusionBench: density 0.5, merge_fn=sum, scale 0.5. " + _FAMILY_NOTES,
    memory=ROW_CHUNKED,
)
def dare_ties(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 0.9,
    trim_density: Density = 0.2,
    scope: Scope = "global",
    merge_fn: MergeFn = "mean",
    seed: Seed = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """DARE-TIES: DARE (keep ``density``, rescale 1/density), then TIES on the DARE'd vectors.

    Yu et al., ICML 2024 (arXiv 2311.03099), MergeLM ``mask_merging`` with ``ties``: the TIES trim
    keeps the top ``trim_density`` fraction of the *DARE'd* task vector (its global threshold comes
    from the engine's pre-pass over the DARE'd deltas), then mass election and disjoint mean.

    Names: ``density`` = MergeLM 1 − ``weight_mask_rate`` = mergekit/peft ``density`` = FusionBench
    1 − ``sparsity_ratio``; ``trim_density`` = MergeLM 1 − ``param_value_mask_rate`` = FusionBench
    ``threshold``/100 (default 0.2 = its 20). mergekit's ``dare_ties`` has no magnitude trim (set
    ``trim_density=1``), uses ``merge_fn="sum"`` and L1-matched rescaling; FusionBench uses
    ``merge_fn="sum"`` and ``scale=0.5``.

    Memory: row-chunked; the DARE'd copy (N x piece), then TIES in 4 MiB blocks of rows.
    """
    dropped = dare(deltas, density=density, seed=seed, ctx=ctx)
    thr = magnitude_thresholds(dropped, density=trim_density, scope=scope, ctx=ctx)
    return _trim_elect_merge(dropped, thr, weights=weights, merge_fn=merge_fn, scale=scale)


def _della_band(params: Mapping[str, Any], n: int) -> str | None:
    """DELLA: the keep probabilities density ± epsilon must lie in (0, 1) for every model that prunes."""
    for d, e in zip(_per_model(params["density"], n), _per_model(params["epsilon"], n), strict=True):
        if d < 1 and not (d - e > 0 and d + e < 1):
            return (
                f"parameters 'density' ({d}) and 'epsilon' ({e}): the keep probabilities density ± epsilon must lie "
                f"in (0, 1); use an epsilon below {min(d, 1 - d):g}"
            )
    return None


#: DELLA ranks lines of dim 1 (whole rows) and rescales by a whole-tensor L1 norm, so it is not chunkable
DELLA_MEMORY = (
    "whole tensor: the engine's (N+1) x largest inputs, the pruned copy (N x largest) and the output; "
    "ranks and draws in blocks of rows (a few x 4 MiB), except for a 1-D tensor (one row)"
)
_DELLA_NOTES = (
    "mergekit della/della_linear: same MAGPRUNE probabilities, L1 rescale (rescale=True), weighted_mean = "
    "normalize: true; counter-based draws (DARE's stream) instead of torch.bernoulli; a 1-entry row keeps "
    "with p = density (mergekit: 0/0). The paper rescales by 1/p per entry. " + _FAMILY_NOTES
)


@merge_method(
    "della",
    summary="MAGPRUNE (random drop, smaller |τ| dropped more often), L1 rescale, TIES sign election, merge.",
    paper="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling, 2024 (arXiv 2406.11617); mergekit della",
    chunkable=False,
    checks=(_della_band,),
    notes="Defaults are mergekit's (density 1 = no pruning, epsilon 0.15, rescale, normalize). " + _DELLA_NOTES,
    memory=DELLA_MEMORY,
)
def della(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    rescale: bool = True,
    merge_fn: MergeFn = "weighted_mean",
    seed: Seed = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """DELLA: θ = θ0 + λ · disjoint_merge(elect(w ⊙ MAGPRUNE(τ))).

    Deep et al., 2024 (arXiv 2406.11617), as mergekit's ``della`` computes it: MAGPRUNE
    (:func:`magprune`: per row, keep probabilities from density − ε for the smallest |τ| to
    density + ε for the largest, then the L1 rescale), weights, TIES election by mass (+1 where
    the sum is 0), disjoint merge. Defaults are mergekit's: ``density`` 1.0 (no pruning unless
    set), ``epsilon`` 0.15, ``rescale`` True, and ``merge_fn="weighted_mean"`` (mergekit
    ``normalize: true``: divide by the summed weights of the agreeing models; ``"mean"`` divides
    by their count, equal for unit weights; ``"sum"`` is ``normalize: false``). ``scale`` is
    mergekit's ``lambda``. The draws are DARE's counter-based ones (:func:`dare`, ``seed``), so a
    merge is reproducible; mergekit draws from torch's global RNG. Equal to mergekit's output
    given the same Bernoulli draws (the tests replay them), except that a row of length 1 keeps
    with probability ``density`` where mergekit fails.

    Memory: whole tensor (rows are ranked whole and the rescale is a whole-tensor L1 norm); the
    pruned copy of the N task vectors, and ranks and draws per 4 MiB block of rows.
    """
    pruned = magprune(deltas, density=density, epsilon=epsilon, rescale=rescale, seed=seed, ctx=ctx)
    return _blockwise(pruned, lambda d: _combine(d, weights=weights, elect=True, merge_fn=merge_fn, scale=scale))


@merge_method(
    "della_linear",
    summary="MAGPRUNE (random drop, smaller |τ| dropped more often), L1 rescale, then task arithmetic.",
    paper="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based "
    "Sampling, 2024 (arXiv 2406.11617); mergekit della_linear",
    chunkable=False,
    checks=(_della_band,),
    notes="Defaults are mergekit's (density 1 = no pruning, epsilon 0.15, rescale, no normalize). " + _DELLA_NOTES,
    memory=DELLA_MEMORY,
)
def della_linear(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    density: Density = 1.0,
    epsilon: Epsilon = 0.15,
    rescale: bool = True,
    merge_fn: LinearMergeFn = "sum",
    seed: Seed = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
) -> Tensor:
    """Linear DELLA: θ = θ0 + λ Σ_t w_t · MAGPRUNE(τ_t) (divided by Σ_t w_t with ``weighted_mean``).

    Deep et al., 2024 (arXiv 2406.11617), as mergekit's ``della_linear`` computes it: MAGPRUNE
    (:func:`magprune`) without sign election. Defaults are mergekit's: ``density`` 1.0,
    ``epsilon`` 0.15, ``rescale`` True, ``merge_fn="sum"`` (mergekit ``normalize: false``;
    ``"weighted_mean"`` divides by Σ_t w_t, read as 1 when |Σ_t w_t| < 1e-8, like
    ``normalize: true``). With ``epsilon=0`` and ``rescale=False`` the kept entries are exactly
    :func:`dare_linear`'s with the same ``seed`` (DARE divides them by the density, this does not).

    Memory: whole tensor (rows are ranked whole and the rescale is a whole-tensor L1 norm); the
    pruned copy of the N task vectors, and ranks and draws per 4 MiB block of rows.
    """
    pruned = magprune(deltas, density=density, epsilon=epsilon, rescale=rescale, seed=seed, ctx=ctx)
    return _blockwise(pruned, lambda d: _combine(d, weights=weights, elect=False, merge_fn=merge_fn, scale=scale))


# ----------------------------------------------------------------------------------------------
# what the engine must do for each
# ----------------------------------------------------------------------------------------------

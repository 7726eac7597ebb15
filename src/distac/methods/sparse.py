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
breadcrumbs        per-row middle band         none         sum
breadcrumbs_ties   per-row middle band         mass         disjoint mean | sum
consensus_ta       none; TALL consensus mask   none         sum, masked
consensus_ties     magnitude; TALL consensus   mass         disjoint sum, masked
=================  ==========================  ===========  =============================

Conventions shared by the family (each function's docstring adds its own):

* ``weights`` (per model, default all 1) multiply each *sparsified* task vector before the sign
  election, so they act like mergekit's ``weight``. The disjoint mean divides by the *count* of
  agreeing entries (official TIES / peft), not by the sum of their weights (mergekit
  ``normalize: true``); the two agree for unit weights. A negative weight negates a task.
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
merge_fn        normalize (mean)     merge_func                      "dis-mean" / "dis-sum"
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
from .rng import keep_where, stream_key

__all__ = [
    "dare",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "elect_sign",
    "model_keys",
    "ties",
    "trim_magnitude",
]

Density = Annotated[float | list[float], Range(0, 1, lo_open=True), PerModel()]
Scope = Annotated[str, OneOf(("global", "tensor"))]
MergeFn = Annotated[str, OneOf(("mean", "sum"))]
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
            # where(keep, δ, 0) / d = where(keep, δ/d, 0) exactly: δ/d, not δ·(1/d), as the reference
            out[i].div_(d)
    return out


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
    negative. mergekit and peft leave the sign 0, which drops the coordinate.
    """
    # = where(sign(s) == 0, 1, sign(s)) for every non-NaN s (s = -0.0 included), without a where
    return (x.sum(0) >= 0).to(x.dtype).mul_(2).sub_(1)


def disjoint_merge(x: Tensor, sign: Tensor, merge_fn: str) -> Tensor:
    """TIES disjoint merge: combine only the entries whose sign agrees with the elected one.

    ``"mean"``: Σ_{t∈A} x_t / max(|A|, 1) (official TIES, MergeLM, peft); ``"sum"``: Σ_{t∈A} x_t
    (FusionBench ``merge_func: sum``, the TALL/Consensus multi-task vector, mergekit with
    ``normalize: false``).
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
    x = sparse if weights is None else model_weights(weights, sparse.shape[0], sparse) * sparse
    merged = disjoint_merge(x, elect_sign(x), merge_fn) if elect else x.sum(0)
    return merged if scale == 1 else scale * merged


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
    "weights multiply the sparsified task vectors before sign election; the disjoint mean divides by "
    "the count of agreeing entries (official/peft), not by their summed weights (mergekit normalize)."
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
    sum of the agreeing weights; the DisTaC repository keeps the top 10% (``density=0.1``).

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


# ----------------------------------------------------------------------------------------------
# what the engine must do for each
# ----------------------------------------------------------------------------------------------

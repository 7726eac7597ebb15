"""Curvature-weighted merging: uncertainty-based gradient matching, Fisher merging and RegMean.

The statistics come from :mod:`distac.stats` (``distac stats fisher|gram``) and reach these
functions through the engine as ``ctx.stats``: ``"fisher"`` (N, *S) on the **sum** scale,
``"base_fisher"`` (S) and ``"gram"`` (N, d, d). See docs/curvature.md for the conventions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from torch import Tensor

from ..errors import DistacError
from .base import STATISTICS, OneOf, PerModel, Prepass, Range, TensorContext, merge_method
from .basic import ROW_CHUNKED, Weights, model_weights, weights_sum_nonzero

__all__ = ["fisher", "gradient_matching", "missing_stats_error", "regmean"]


def missing_stats_error(method: str, stat: str, name: str) -> DistacError:
    """The error for a tensor that arrives without the statistic a method needs, with the fix."""
    cmd, arg = STATISTICS[stat]
    return DistacError(
        f"method '{method}' needs the '{stat}' statistic of every model for tensor '{name}', and at least one "
        f"is missing; compute it with `{cmd}` and pass it ({arg} in Python, the model's '{stat}' entry in "
        "YAML), or keep the tensor out of the merge with heads=[...]"
    )


def _curvature(ctx: TensorContext, stat: str, method: str) -> Tensor:
    h = ctx.stats.get(stat)
    if h is None:
        raise missing_stats_error(method, stat, ctx.name)
    # a cheap guard at merge time too: sidecars built by hand bypass check_stats
    if not torch.isfinite(h).all() or (h < 0).any():
        raise DistacError(f"method '{method}': the '{stat}' statistic of tensor '{ctx.name}' is negative, NaN or Inf")
    return h


# ----------------------------------------------------------------------------------------------
# uncertainty-based gradient matching
# ----------------------------------------------------------------------------------------------
@merge_method(
    "gradient_matching",
    summary="θ0 + Σ α_t H̄⁻¹(H0+H_t)τ_t, H̄ = H0 + Σ α_s H_s (diagonal Fishers, sum scale).",
    paper="Daheim et al., Model Merging by Uncertainty-Based Gradient Matching, ICLR 2024 (arXiv 2310.12808)",
    chunkable=True,
    stats=("fisher", "base_fisher?"),
    notes="Not in FusionBench/mergekit/peft. Fishers must be on the sum scale; prior δ0 defaults to 1e-12.",
    memory=ROW_CHUNKED + "; plus the (N+1) x piece Fishers",
)
def gradient_matching(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Annotated[float | list[float], PerModel(), Range()] = 1.0,
    prior: Annotated[float, Range(0)] = 1e-12,
    clamp: Annotated[float | None, Range(0, lo_open=True)] = None,
) -> Tensor:
    """Uncertainty-based gradient matching (Daheim et al., ICLR 2024), diagonal curvature.

    θ = θ_0 + Σ_t α_t H̄⁻¹ (H_0 + H_t) τ_t,  H̄ = H_0 + Σ_s α_s H_s,  H_0 = base_fisher + δ_0.

    * ``fishers``: H_t on the **sum** scale (N_t × mean Fisher); ``base_fisher`` (optional) H_0 from
      the base model's own data, same scale; ``prior`` δ_0 is added to H_0 (official script: 1e-12).
    * ``scale``: α, shared (official, default 1.0) or one per task. H_0 → ∞ gives task arithmetic
      with α; H_0 = 0 gives the Fisher-weighted task-vector average, independent of a shared α.
    * Task removal: a negative α_t. Where H̄ ≤ 0 the formula is meaningless; distac stops and names
      the tensor and the largest safe α, unless ``clamp`` is set: then H̄ ← max(H̄, clamp) (an
      absolute precision floor on the sum-Fisher scale; the paper's guard is unpublished).
    * Elements where every H_t and H_0 are exactly 0 get ratio 1 (task arithmetic), as the
      official code's δ_0 > 0 would give.

    Not in FusionBench/mergekit/peft; a community mergekit port hard-codes H_0 = 1.

    Memory: row-chunked; the N Fishers of the piece and a few piece-sized temporaries.
    """
    n = deltas.shape[0]
    h = _curvature(ctx, "fisher", "gradient_matching")
    h0 = torch.zeros_like(base)
    if "base_fisher" in ctx.stats:
        h0 = h0 + _curvature(ctx, "base_fisher", "gradient_matching")
    h0 = h0 + prior
    a = model_weights(scale, n, deltas)
    hbar = h0 + (a * h).sum(0)
    flat = (hbar == 0) & (h == 0).all(0) & (h0 == 0)
    if bool((a < 0).any()):
        bad = (hbar <= 0) & ~flat
        if bool(bad.any()):
            if clamp is None:
                raise DistacError(_unsafe_alpha_message(ctx.name, h0, h, a, int(bad.sum())))
            hbar = torch.where(flat, hbar, hbar.clamp(min=clamp))
    num = (a * (h0 + h) * deltas).sum(0)
    safe = torch.where(flat, torch.ones_like(hbar), hbar)
    return torch.where(flat, (a * deltas).sum(0), num / safe)


def _unsafe_alpha_message(name: str, h0: Tensor, h: Tensor, a: Tensor, n_bad: int) -> str:
    """Name the tensor and the largest safe magnitude of the negative α's (others fixed).

    H̄ = H_0 + P − c·Q with P = Σ_{α>0} α H, Q = Σ_{α<0} |α| H; H̄ > 0 everywhere iff c < min (H_0+P)/Q.
    """
    pos = (a.clamp(min=0) * h).sum(0)
    q = ((-a).clamp(min=0) * h).sum(0)
    ratio = torch.where(q > 0, (h0 + pos) / q.clamp(min=torch.finfo(q.dtype).tiny), torch.full_like(q, float("inf")))
    c = float(ratio.min())
    alphas = [float(x) for x in a.reshape(-1)]
    safe = [round(x * c, 6) if x < 0 else x for x in alphas]
    head = (
        f"gradient_matching: H̄ = H_0 + Σ α_t H_t ≤ 0 at {n_bad} element(s) of tensor '{name}' "
        f"(scale = {alphas if len(set(alphas)) > 1 else alphas[0]})"
    )
    if not 0 < c < float("inf"):  # H_0 = 0 there, or only zero-scale tasks have curvature there
        return head + "; no negative scale is safe where H_0 = 0: pass a prior (prior=...) or base_fisher, or set clamp"
    shown = safe if len(set(alphas)) > 1 else safe[0]
    return (
        head + f"; the largest safe negative scale(s) for this tensor, exclusive: {shown} (other tensors may "
        "need less), or set clamp=<min precision> to floor H̄"
    )


# ----------------------------------------------------------------------------------------------
# Fisher merging
# ----------------------------------------------------------------------------------------------
def _fisher_prepass(params: Mapping[str, Any], n: int) -> Prepass | None:
    return Prepass(stat_norms=("fisher",)) if params["normalize"] else None


def _weights_nonnegative_some_positive(params: Mapping[str, Any], n: int) -> str | None:
    """Fisher weights are the coefficients of a weighted average: negative or all-zero ones mean nothing."""
    w = params.get("weights")
    values = [1.0] * n if w is None else (w if isinstance(w, list) else [w] * n)
    if min(values) >= 0 and max(values) > 0:
        return None
    return f"parameter 'weights' = {w} must be >= 0 with at least one > 0 (they weight an average); fix the weights"


@merge_method(
    "fisher",
    summary="Σ c_i F̃_i θ_i / Σ c_i F̃_i with c_i/‖F_i‖ and a 1e-6 floor on the target.",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv 2111.09832)",
    chunkable=True,
    prepass=_fisher_prepass,
    stats=("fisher",),
    notes="FusionBench adds 1e-6 to every Fisher and squares batch gradients; official floors only the target.",
    memory=ROW_CHUNKED + "; plus the N x piece Fishers",
    checks=(_weights_nonnegative_some_positive,),
)
def fisher(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    weights: Weights = None,
    normalize: bool = True,
    floor: Annotated[float, Range(0)] = 1e-6,
    favor_target_model: bool = True,
) -> Tensor:
    """Fisher merging (Matena & Raffel, NeurIPS 2022): θ = Σ_i c_i F̃_i θ_i / Σ_i c_i F̃_i.

    Written on task vectors (Σ c F̃ θ_0 / Σ c F̃ = θ_0), which is exact wherever Σ c F̃ > 0.

    * ``weights``: c_i (default uniform, which cancels).
    * ``normalize`` (official default True): c_i ← c_i / ‖F_i‖₂, the global L2 norm over all
      merged tensors of model i (an engine pre-pass), so Fishers on different scales are comparable.
    * ``floor`` (official 1e-6): F̃ = max(F, floor), applied to the **first model only** when
      ``favor_target_model`` (official default), so a parameter no donor cares about keeps the
      target's value; to every model otherwise. The floor is absolute, so it interacts with the
      Fisher's scale: the official code uses mean Fishers (``distac stats fisher --scale mean``).
    * Elements where Σ c F̃ = 0 (floor 0 and zero curvature) take the first model's value.

    FusionBench/MergeLM differ: they *add* 1e-6 to every model's Fisher and estimate F from squared
    batch gradients; their normalisation is equivalent after the ratio. The official code copies
    the head from the target; distac keeps heads per model (``heads=``).

    Memory: row-chunked; the N Fishers of the piece and a few piece-sized temporaries.
    """
    n = deltas.shape[0]
    f = _curvature(ctx, "fisher", "fisher")
    c = model_weights(weights, n, deltas)
    if normalize:
        norms = ctx.norms.get("fisher")
        if norms is None:
            raise missing_stats_error("fisher", "fisher", ctx.name)
        if bool((norms <= 0).any()):
            i = int((norms <= 0).nonzero()[0])
            raise DistacError(f"fisher: the Fisher of model {i} is zero everywhere; it cannot be normalised")
        c = c / norms.to(c).reshape(c.shape)
    if favor_target_model:
        f = torch.cat([f[:1].clamp(min=floor), f[1:]])
    else:
        f = f.clamp(min=floor)
    den = (c * f).sum(0)
    num = (c * f * deltas).sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), deltas[0])


# ----------------------------------------------------------------------------------------------
# RegMean
# ----------------------------------------------------------------------------------------------
def _input_dim(shape: tuple[int, ...], d: int, layout: str, name: str) -> int:
    """Which weight dimension is the layer input: 1 for (out, in) ``nn.Linear``, 0 for (in, out) Conv1D."""
    match = [i for i, s in enumerate(shape) if s == d]
    if len(shape) != 2 or not match:
        raise DistacError(f"regmean: the Gram of '{name}' is {d}×{d}, which fits no dimension of its weight {shape}")
    if len(match) == 2:  # square: only the layout says which side is the input
        return 1 if layout == "out_in" else 0
    return match[0]


@merge_method(
    "regmean",
    summary="Per linear layer (ΣG̃_i)⁻¹ΣG̃_i W_i; other tensors averaged.",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 (arXiv 2212.09849)",
    chunkable=False,
    stats=("gram",),
    notes="α=0.1 (most official configs; FusionBench CLIP 0.95). Grams exclude padding rows; ridge if singular.",
    memory="whole tensor: the engine's (N+1) x largest inputs, an fp64 copy of the N task vectors of a linear "
    "layer (2N x largest) and the N Grams (d x d each, fp64)",
    checks=(weights_sum_nonzero,),
)
def regmean(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    reduce_nondiag: Annotated[float, Range(0, 1)] = 0.1,
    weights: Weights = None,
    layout: Annotated[str, OneOf(("out_in", "in_out"))] = "out_in",
    ridge: Annotated[float, Range(0, lo_open=True)] = 1e-6,
) -> Tensor:
    """RegMean (Jin et al., ICLR 2023): W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_i per linear layer.

    G̃_i = w_i (α G_i + (1−α) diag(G_i)), α = ``reduce_nondiag``; W_i in (in, out) orientation.
    On task vectors: τ* = (Σ G̃_i)⁻¹ Σ G̃_i τ_i, exact since (Σ G̃)⁻¹ Σ G̃ W_0 = W_0.

    * α default 0.1: the value of 4 of the 6 official configs (RoBERTa/T5/DeBERTa emotion, RoBERTa
      NER) and of FusionBench's base config. FusionBench uses 0.95 for CLIP and 0.6 for GPT-2; α = 1
      is the exact least-squares merge (official DistilBERT GLUE).
    * Tensors without a Gram (biases, LayerNorm, embeddings) get the (weighted) average, as official.
    * ``layout``: orientation of *square* weights, "out_in" (``nn.Linear``) or "in_out" (HF
      ``Conv1D``, GPT-2); non-square weights are oriented by matching the Gram size. The Gram
      sidecar records each layer's layout (``distac stats gram`` prints which to use).
    * ``weights``: w_i, the official ``model_coeffs`` (uniform by default).
    * Singular Σ G̃ (short or padding-dominated data): distac adds ``ridge``·mean(diag Σ G̃)·I to
      the system, split over the models as w_i/Σw, i.e. shrinks towards the weighted average, and
      multiplies the ridge by 10 until the Cholesky factorisation succeeds. The official code uses
      a plain inverse (no ridge). The solve runs in float64.

    Memory: whole tensor; an fp64 copy of the N task vectors of a linear layer (2N x its fp32
    size) and the N Grams in fp64; other tensors are averaged.
    """
    n = deltas.shape[0]
    w = model_weights(weights, n, deltas).reshape(n)
    g = ctx.stats.get("gram")
    if g is None:
        return (w.reshape(n, *([1] * (deltas.dim() - 1))) * deltas).sum(0) / w.sum()
    if not torch.isfinite(g).all() or (g.diagonal(dim1=-2, dim2=-1) < 0).any():
        raise DistacError(f"regmean: the Gram of tensor '{ctx.name}' has NaN/Inf or a negative diagonal")
    din = _input_dim(tuple(base.shape), g.shape[-1], layout, ctx.name)
    stacked = _fp64_stacked(deltas, din)
    g = g.double()
    diag = torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))
    gt = w.double().reshape(n, 1, 1) * (reduce_nondiag * g + (1 - reduce_nondiag) * diag)
    a = gt.sum(0)
    d = a.shape[0]
    # b = Σ_i G̃_i τ_i = einsum("nij,njk->ik", G̃, τ), computed as torch does it: one (d, d·N) @ (d·N, out)
    # product with the inputs ordered (j, n); ``stacked`` already has that layout, so no copy is made
    b = gt.permute(1, 2, 0).reshape(d, d * n) @ stacked.reshape(d * n, -1)
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        del stacked  # only the ridge fallback reads the task vectors again
        out = torch.cholesky_solve(b, l)
    else:
        out = _solve_with_ridge(a, b, stacked, w.double(), ridge)
    return (out.T if din == 1 else out).to(deltas.dtype)


def _fp64_stacked(deltas: Tensor, din: int) -> Tensor:
    """The task vectors in fp64, input dim first: a contiguous (in, N, out) tensor filled model by model.

    Holds 2N × the fp32 task vectors. ``deltas.double()``, its transpose and the einsum's own
    reordered copy held three times that.
    """
    n = deltas.shape[0]
    stacked = torch.empty((deltas.shape[1 + din], n, deltas.shape[2 - din]), dtype=torch.float64, device=deltas.device)
    for i in range(n):
        stacked[:, i].copy_(deltas[i].T if din == 1 else deltas[i])
    return stacked


def _solve_with_ridge(a: Tensor, b: Tensor, stacked: Tensor, w: Tensor, ridge: float) -> Tensor:
    """Solve a X = b by Cholesky; if a is singular, add r·I to a and r·(weighted mean of τ) to b."""
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, l)
    scale = float(a.diagonal().mean())
    r = ridge * (scale if scale > 0 else 1.0)
    tau = stacked.permute(1, 0, 2).contiguous()  # (N, in, out), the layout the average was defined on
    avg = (w.reshape(-1, 1, 1) * tau).sum(0) / w.sum()
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(20):
        l, info = torch.linalg.cholesky_ex(a + r * eye)
        if int(info) == 0:
            return torch.cholesky_solve(b + r * avg, l)
        r *= 10
    raise DistacError("regmean: the Gram system stays singular even with a large ridge (NaN in the Grams?)")

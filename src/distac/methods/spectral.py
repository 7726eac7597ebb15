"""Spectral merges of 2-D task vectors: TSV-M, Iso-C and Iso-CTS.

Each needs the whole matrix (an SVD), so none is chunkable. The SVDs run in fp32 on the device the
tensor is on (the GPU when the engine computes there).

Which tensors: every 2-D tensor is merged spectrally, *including* 2-D embeddings (token and
position embeddings are SVD'd by the official TSV and Iso code too); every other tensor (biases,
LayerNorm, conv kernels, scalars) gets the **mean** of the task vectors, as in the official code.
The official code additionally averages keys containing ``text_projection`` (open_clip's CLIP);
distac has no name-based exclusion list: pass such tensors as ``heads`` if they are task-specific,
or merge them with another method. Per-model ``weights`` are not offered: these methods are not
linear in the task vectors (scale the task vectors beforehand if you need FusionBench's list-α).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from .base import OneOf, Range, TensorContext, merge_method

__all__ = ["iso_c", "iso_cts", "polar", "tsv_m"]

Scale = Annotated[float, Range()]

_COVERAGE = (
    "2-D tensors (embeddings included) are merged spectrally; other tensors get the mean of the task "
    "vectors. No text_projection exclusion: pass such tensors as heads. No per-model weights."
)

#: An SVD of an m×n matrix (r = min(m, n)) returns U (m×r) and Vᵀ (r×n), together one matrix's
#: size when m ≫ n, and LAPACK's workspace is about as much again.
SVD_MEMORY = "whole tensor: the engine's (N+1) x largest inputs, the output, and a few x largest for the SVDs"


def polar(a: Tensor) -> Tensor:
    """Orthogonal polar factor (nearest matrix with orthonormal columns/rows): ``P Qᵀ`` for ``a = P S Qᵀ``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _top_svd(x: Tensor, k: int, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets ``(U (m×k), S (k), Vᵀ (k×n))`` by exact or randomized SVD."""
    if method == "lowrank":
        # Halko et al. randomized range finder; oversample by 10 and take 4 power iterations so the
        # top k triplets are accurate even when the spectrum decays slowly.
        q = min(k + 10, min(x.shape))
        # svd_lowrank draws its test matrix from torch's global RNG: fork it and fix the seed so the
        # merge is reproducible and the caller's RNG state is left untouched
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(x, q=q, niter=4)
        return u[:, :k], s[:k], v[:, :k].mT
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


@merge_method(
    "tsv_m",
    summary="Task Singular Vectors: top r/T singular triplets per task, orthogonalised, recombined.",
    paper="Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv 2412.00081)",
    chunkable=False,
    notes="scale (α) 1.0 as FusionBench; svd='lowrank' uses torch.svd_lowrank. " + _COVERAGE,
    memory=SVD_MEMORY,
)
def tsv_m(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Scale = 1.0,
    svd: Annotated[str, OneOf(("exact", "lowrank"))] = "exact",
) -> Tensor:
    """TSV-M (Task Singular Vectors: Merge), per 2-D tensor.

    Gargiulo et al., CVPR 2025 (arXiv 2412.00081), official ``compute_and_sum_svd_mem_reduction``:

    1. τ_t = U_t Σ_t V_tᵀ, keep the top k = ⌊r/T⌋ triplets of each task (r = min(m, n));
    2. concatenate them into U (m×r), σ (r), Vᵀ (r×n); the last r − T·k slots stay zero;
    3. orthogonalise: U⊥ = polar(U), V⊥ᵀ = polar(Vᵀ);
    4. Δ = U⊥ diag(σ) V⊥ᵀ;  θ = θ0 + α·Δ.

    Non-2-D tensors: α · mean_t τ_t. With T = 1, Δ = τ (up to SVD round-off). If r < T then k = 0 and
    the matrix's merged task vector is zero, as in the official code. ``scale`` = α, default 1.0
    (FusionBench ``alpha: 1``; the official code sweeps {0.1, …, 3.0} on validation).
    ``svd="lowrank"`` computes each task's top k triplets with ``torch.svd_lowrank`` (randomized,
    with a fixed seed in a forked RNG, so reproducible) instead of a full SVD: faster for large
    matrices when k ≪ r, approximate.

    Memory: whole tensor; beside the engine's inputs, the concatenated U (m×r) and Vᵀ (r×n), one SVD at
    a time, and their polar factors (each SVD's workspace is released before the next).
    """
    n = deltas.shape[0]
    if deltas.dim() != 3:
        return scale * deltas.mean(0)
    m, cols = deltas.shape[1:]
    r = min(m, cols)
    k = r // n
    if k == 0:
        return deltas.new_zeros(m, cols)
    u_cat = deltas.new_zeros(m, r)
    s_cat = deltas.new_zeros(r)
    vh_cat = deltas.new_zeros(r, cols)
    for t in range(n):
        u, s, vh = _top_svd(deltas[t], k, svd)
        u_cat[:, t * k : (t + 1) * k] = u
        s_cat[t * k : (t + 1) * k] = s
        vh_cat[t * k : (t + 1) * k] = vh
        del u, s, vh  # the views keep the full factors alive: release them before the next SVD
    # = scale * (polar(U) * σ) @ polar(Vᵀ), the same operations in place, each input freed once used
    left = polar(u_cat)
    del u_cat
    left.mul_(s_cat).mul_(scale)
    return left @ polar(vh_cat)


@merge_method(
    "iso_c",
    summary="Isotropic merging: SVD of Σ τ_t with all singular values set to their mean.",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025 (arXiv 2502.04959)",
    chunkable=False,
    notes="Arithmetic mean of the spectrum (official, FusionBench). " + _COVERAGE,
    memory=SVD_MEMORY,
)
def iso_c(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Scale = 1.0,
) -> Tensor:
    """Iso-C: flatten the spectrum of the summed task vector, per 2-D tensor.

    Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025 (arXiv 2502.04959), official ``iso_c``: Δ = Σ_t τ_t = U Σ Vᵀ,
    Δ_iso = σ̄ · U Vᵀ with σ̄ the arithmetic mean of all r singular values (FusionBench too; sd-mecha's
    port used a geometric mean). Non-2-D tensors: mean_t τ_t. θ = θ0 + α·Δ_iso, ``scale`` = α
    default 1.0 (FusionBench; the official code sweeps α ∈ {0.1, …, 3.0}).

    Memory: whole tensor; Σ_t τ_t, its SVD factors and the output.
    """
    if deltas.dim() != 3:
        return scale * deltas.mean(0)
    u, s, vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    out = u @ vh
    del u
    return out.mul_(scale * s.mean())  # = scale * s.mean() * (u @ vh)


@merge_method(
    "iso_cts",
    summary="Isotropic merging in common + task-specific subspaces (Iso-CTS).",
    paper="Marczak et al., No Task Left Behind: Isotropic Model Merging, ICML 2025 (arXiv 2502.04959)",
    chunkable=False,
    notes="common_space_fraction 0.8, scale 1.0 (FusionBench). " + _COVERAGE,
    memory=SVD_MEMORY,
)
def iso_cts(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    scale: Scale = 1.0,
    common_space_fraction: Annotated[float, Range(0, 1)] = 0.8,
) -> Tensor:
    """Iso-CTS: common subspace of Σ τ_t plus task-specific subspaces, then an isotropic spectrum.

    Marczak et al., ICML 2025 (arXiv 2502.04959), official ``iso_cts``, per 2-D tensor (r = min(m, n)):

    1. k_c = ⌊r·f⌋; the task budget s = round((r − k_c)/T)·T (Python's round, as the official code);
       k_c = r − s; each task gets n = s/T directions (when the rounding gives s > r, which makes the
       official k_c negative, distac uses s − T);
    2. common: the top k_c triplets of Σ_t τ_t;
    3. task t: the top n triplets of τ_t − U_c U_cᵀ τ_t;
    4. concatenate [task blocks, common block] into U, σ, Vᵀ; orthogonalise U and Vᵀ (polar);
    5. Δ = mean(σ) · U⊥ V⊥ᵀ;  θ = θ0 + α·Δ.

    Non-2-D tensors: α · mean_t τ_t (official). ``common_space_fraction`` f default 0.8 and
    ``scale`` α default 1.0 follow FusionBench (the official code sweeps α).

    Memory: whole tensor; one task's projection and SVD at a time, the concatenated factors and
    their polar factors.
    """
    t_count = deltas.shape[0]
    if deltas.dim() != 3:
        return scale * deltas.mean(0)
    m, cols = deltas.shape[1:]
    r = min(m, cols)
    kc = int(r * common_space_fraction)
    budget = round((r - kc) / t_count) * t_count
    if budget > r:  # rounding up past r (e.g. r=7, T=2) would make k_c negative in the official code
        budget -= t_count
    kc = r - budget
    per_task = budget // t_count
    u, s, vh = torch.linalg.svd(deltas.sum(0), full_matrices=False)
    uc, sc, vhc = u[:, :kc], s[:kc], vh[:kc]
    us, ss, vhs = [], [], []
    for t in range(t_count):
        specific = deltas[t] - uc @ (uc.mT @ deltas[t])
        ut, st, vht = torch.linalg.svd(specific, full_matrices=False)
        del specific
        # copies of the leading columns, so each task's full factors are freed before the next SVD
        us.append(ut[:, :per_task].clone())
        ss.append(st[:per_task].clone())
        vhs.append(vht[:per_task].clone())
        del ut, st, vht
    u_all = torch.cat([*us, uc], dim=1)
    del us, uc, u
    s_all = torch.cat([*ss, sc])
    vh_all = torch.cat([*vhs, vhc], dim=0)
    out = polar(u_all)
    del u_all
    out = out @ polar(vh_all)
    return out.mul_(scale * s_all.mean())  # = scale * s_all.mean() * (polar(U) @ polar(Vᵀ))

"""WUDI-Merging: per weight matrix, the merged task vector that least disturbs each task's own inputs.

Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via
Task Vectors", ICML 2025 (arXiv 2503.08099); official code ``nathanielyvo/WUDI-Merging``
(``vit/wudi_main.py``, ``nlp_roberta/lamassu.py``). For a weight matrix with task vectors τ_t (m×n,
``nn.Linear`` layout: rows are outputs, columns inputs) the method minimises

    L(τ_m) = Σ_t w_t ‖(τ_m − τ_t) τ_tᵀ‖_F²,   w_t = 1/‖τ_t‖_F²,

starting from τ_m = Σ_t τ_t, with ``iters`` steps of Adam (official: 300 steps, lr 1e-5 for ViT and
2e-5 for RoBERTa, betas (0.9, 0.999), eps 1e-8, weight decay 0), and θ = θ0 + τ_m (no α).

**The fast form.** L is quadratic in τ_m. With A = Σ_t w_t τ_tᵀτ_t (n×n) and
B = Σ_t w_t τ_t τ_tᵀτ_t (m×n), computed once, ∇L = 2(τ_m A − B): each Adam step is one
``addmm`` whatever N, where the official loop does 3N batched (m×n)·(n×m) products per step.
The optimiser is ``torch.optim.Adam`` itself, fed that gradient, so the steps are the official ones
up to floating-point round-off (tested against :func:`wudi_adam_plain`, the official loop's form).
One caveat: Adam normalises each entry's gradient, so an entry whose gradient is within round-off of
zero steps ±lr on the last bit. On large matrices a few such entries end up to 2·lr per step apart
from the official loop (as they would between two GPUs running the official code); every other
entry agrees to fp32 round-off.
Everything runs on the tensor's device (the GPU when the engine computes there).

**The closed form** (``solver="closed_form"``): the minimiser τ_m = B A⁺, with A⁺ the Moore–Penrose
pseudo-inverse of the symmetric A (float64 eigendecomposition, eigenvalues below n·ε₆₄·λ_max
treated as zero). No ridge: a ridge would bias the minimiser. The pseudo-inverse picks, among all
minimisers, the one Adam started at Σ_t τ_t would converge to, because every row of Σ_t τ_t and of
B already lies in A's row space (the span of the τ_t's rows), where the minimiser is unique.

**How far Adam goes.** Adam's step per entry is about ``lr`` while that entry's gradient keeps its
sign (|m̂|/√v̂ ≈ 1), smaller when it oscillates, and never more than a few ``lr`` (Cauchy–Schwarz on
Adam's two averages bounds |m̂|/√v̂ by 3.7 for the first 300 steps with the default betas). So after
``iters`` steps every entry is within about ``lr·iters`` of the plain sum Σ_t τ_t (3e-3 at the ViT
defaults), whatever the gradient's scale. Under norm mismatch (one τ_t scaled up by s) the plain sum
carries an excess (s − 1)·τ_t per entry that WUDI cannot remove once it exceeds that budget: the
result stays close to task arithmetic with α = 1, dominated by the large task, which is why WUDI
loses most of its accuracy under norm mismatch and gains the most from conditioning the task
vectors first. The closed form has no such budget: it is the exact minimiser, however far it lies
from the sum.

**Which tensors** (``targets`` and ``others``):

* ``targets``: name patterns (shell globs, or ``re:`` regexes searched in the name, as for
  ``heads``) of the tensors WUDI optimises; only 2-D tensors among them are optimised. The default
  :data:`BLOCK_LINEAR_WEIGHTS` selects every 2-D ``…weight`` inside a numbered block
  (``resblocks.3.``, ``layers.3.``, ``layer.3.``, ``h.3.``): in a transformer those are exactly the
  attention and MLP projections (norms are 1-D; embeddings, patch convolutions, projections and
  heads live outside the blocks). For open_clip's ViT these are the four official keys
  ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``.
  ``"*"`` selects every 2-D tensor (FusionBench).
* ``others``: what every other tensor gets: ``"base"`` (official: it stays at θ0; the result adds
  −0.0, the exact identity, so its bits are θ0's) or ``"mean"`` (FusionBench: mean_t τ_t).

The official code therefore is the default (``targets`` = block weights, ``others="base"``);
FusionBench's ``wudi`` is ``targets="*"``, ``others="mean"`` (its ``exclude_keys`` are the tensors
you leave out of ``targets``, or pass as ``heads``).

Edge cases: a task with τ_t = 0 gets w_t = 0 (its loss term is zero; the official 1/0 gives NaN),
so N = 1 returns τ_1 unchanged. Transposed layouts (GPT-2's ``Conv1D``, weight n×m) put the inputs
on the other side: WUDI then decorrelates the wrong subspace; leave them out of ``targets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from ..taskvector import match_heads
from .base import Count, OneOf, Patterns, Range, TensorContext, merge_method

__all__ = [
    "BLOCK_LINEAR_WEIGHTS",
    "wudi",
    "wudi_adam",
    "wudi_adam_plain",
    "wudi_closed_form",
    "wudi_loss",
    "wudi_quadratic",
    "wudi_weights",
]

#: the default ``targets``: a 2-D ``…weight`` (or ``…_weight``) under a numbered path component,
#: i.e. a linear layer inside a repeated block
BLOCK_LINEAR_WEIGHTS = r"re:(^|\.)\d+\..*weight$"

#: Adam's defaults in ``torch.optim.Adam``, which the official code uses
_BETAS = (0.9, 0.999)
_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# the pieces of the objective
# ----------------------------------------------------------------------------------------------
def wudi_weights(deltas: Tensor) -> Tensor:
    """w_t = 1/‖τ_t‖_F² for ``deltas`` of shape (N, m, n); 0 for a task vector that is exactly zero.

    Example:
        >>> wudi_weights(torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]]))
        tensor([0.0400, 0.0000])
    """
    sq = torch.square(torch.linalg.vector_norm(deltas.reshape(deltas.shape[0], -1), dim=-1))
    # a zero task vector contributes a zero loss term; 1/0 would turn the whole loss into NaN
    return torch.where(sq > 0, 1.0 / sq.clamp_min(torch.finfo(sq.dtype).tiny), 0.0)


def wudi_quadratic(deltas: Tensor, weights: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A = Σ_t w_t τ_tᵀτ_t (n×n) and B = Σ_t w_t τ_t τ_tᵀτ_t (m×n), so that ∇L(τ_m) = 2(τ_m A − B).

    Computed one task at a time in ``dtype`` (one m×n copy alive). B's product is taken in the
    cheaper order: (τ τᵀ) τ costs 2m²n, τ (τᵀτ) reuses A's n×n term and costs mn².

    Args:
        deltas: the task vectors, (N, m, n).
        weights: w_t, (N,).
        dtype: the precision of A and B (float64 for the closed form).

    Returns:
        ``(A, B)``.
    """
    _, m, n = deltas.shape
    a = deltas.new_zeros((n, n), dtype=dtype)
    b = deltas.new_zeros((m, n), dtype=dtype)
    for t in range(deltas.shape[0]):
        w = float(weights[t])
        if w == 0.0:
            continue
        # a fresh copy, not a view: BLAS rounds differently for an input at another alignment, and
        # the engine's (N+1, ...) buffer puts task t at an offset; with a copy the bits do not depend on it
        tau = deltas[t].to(dtype, copy=True)
        gram = tau.mT @ tau
        a.add_(gram, alpha=w)
        b.add_((tau @ tau.mT) @ tau if m < n else tau @ gram, alpha=w)
    return a, b


def wudi_loss(merged: Tensor, deltas: Tensor, weights: Tensor | None = None) -> Tensor:
    """The literal objective Σ_t w_t ‖(τ_m − τ_t) τ_tᵀ‖_F², as the official loop computes it.

    Example:
        >>> d = torch.randn(3, 4, 5)
        >>> float(wudi_loss(d[0], d[:1]))
        0.0
    """
    w = wudi_weights(deltas) if weights is None else weights
    inner = torch.matmul(merged.unsqueeze(0) - deltas, deltas.transpose(1, 2))
    return torch.sum(torch.square(inner) * w.view(-1, 1, 1))


# ----------------------------------------------------------------------------------------------
# the three solvers: fast Adam, the official loop (reference), the closed form
# ----------------------------------------------------------------------------------------------
def wudi_adam(deltas: Tensor, *, iters: int = 300, lr: float = 1e-5) -> Tensor:
    """WUDI by Adam on the quadratic form: ``iters`` steps, each one ``addmm``; returns τ_m (m×n).

    Args:
        deltas: the task vectors of one matrix, (N, m, n), fp32, on any device.
        iters: Adam steps (official 300).
        lr: Adam's learning rate (official 1e-5 ViT, 2e-5 RoBERTa).

    Returns:
        The merged task vector, same dtype and device as ``deltas``.

    Example:
        >>> d = torch.randn(3, 8, 6)
        >>> torch.allclose(wudi_adam(d, iters=0), d.sum(0))
        True
    """
    w = wudi_weights(deltas)
    if int((w > 0).sum()) <= 1:
        # One non-zero task: Σ_t τ_t is the exact minimiser (L = 0), and the official loop's gradient
        # there is exactly zero. The quadratic form's τ_m A − B is only zero up to round-off, and
        # Adam, which normalises the gradient, would turn that round-off into lr-sized steps.
        return deltas.sum(0)
    a, b = wudi_quadratic(deltas, w, deltas.dtype)
    merged = torch.nn.Parameter(deltas.sum(0))
    merged.grad = torch.empty_like(merged)
    # the fused kernel: one pass per step; torch's default per-op Adam took 0.16 s a step on a
    # 768×768 CPU matrix (13× the fused 0.012 s), as much as the step's matmul
    fused = deltas.device.type in ("cpu", "cuda")
    opt = torch.optim.Adam([merged], lr=lr, betas=_BETAS, eps=_EPS, weight_decay=0, fused=fused)
    with torch.no_grad():
        for _ in range(iters):
            torch.addmm(b, merged, a, beta=-2.0, alpha=2.0, out=merged.grad)  # 2(τ_m A − B)
            opt.step()
    return merged.detach()


def wudi_adam_plain(deltas: Tensor, *, iters: int = 300, lr: float = 1e-5) -> Tensor:
    """The official loop: autograd through :func:`wudi_loss` at every step (reference for tests and benchmarks).

    Same signature and result as :func:`wudi_adam` (up to round-off); ~N·m/n times slower per step.
    """
    w = wudi_weights(deltas)
    merged = torch.nn.Parameter(deltas.sum(0))
    opt = torch.optim.Adam([merged], lr=lr, betas=_BETAS, eps=_EPS, weight_decay=0)
    for _ in range(iters):
        loss = wudi_loss(merged, deltas, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merged.detach()


def wudi_closed_form(deltas: Tensor) -> Tensor:
    """The exact minimiser τ_m = B A⁺ (WUDI-CFS), computed in float64; returns ``deltas``' dtype.

    A⁺ is the pseudo-inverse of the symmetric A: eigenvalues below n·ε₆₄·λ_max count as zero
    (see the module docstring for why this is the minimiser Adam would reach).

    Example:
        >>> d = torch.randn(3, 8, 6)
        >>> m = wudi_closed_form(d)
        >>> a, b = wudi_quadratic(d.double(), wudi_weights(d.double()), torch.float64)
        >>> bool((m.double() @ a - b).abs().max() < 1e-4)
        True
    """
    a, b = wudi_quadratic(deltas, wudi_weights(deltas), torch.float64)
    evals, evecs = torch.linalg.eigh(a)
    cutoff = evals.max().clamp_min(0.0) * a.shape[0] * torch.finfo(torch.float64).eps
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    return (((b @ evecs) * inv) @ evecs.mT).to(deltas.dtype)


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
def is_target(name: str, shape: Sequence[int], targets: str | Sequence[str]) -> bool:
    """Whether WUDI optimises tensor ``name``: 2-D and matched by a ``targets`` pattern."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    return len(shape) == 2 and bool(match_heads([name], patterns))


@merge_method(
    "wudi",
    summary="WUDI-Merging: per linear weight, Adam (or the closed form) on Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²/‖τ_t‖².",
    paper="Cheng et al., Whoever Started the Interference Should End It (WUDI-Merging), ICML 2025 (arXiv 2503.08099)",
    chunkable=False,
    notes="Official defaults: 300 Adam steps, lr 1e-5 (RoBERTa 2e-5), only the linear weights inside "
    "numbered blocks, other tensors at θ0; FusionBench: targets='*', others='mean' (iter_num 400 in its "
    "config).",
    memory="whole tensor: the (N+1) m×n inputs plus A (n×n), B, τ_m, its gradient and Adam's two moments "
    "(5 m×n); closed form: A, B and A's eigenvectors in float64",
)
def wudi(
    base: Tensor,
    deltas: Tensor,
    *,
    ctx: TensorContext,
    iters: Annotated[int, Count(0)] = 300,
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-5,
    solver: Annotated[str, OneOf(("adam", "closed_form"))] = "adam",
    targets: Annotated[str | list[str], Patterns()] = BLOCK_LINEAR_WEIGHTS,
    others: Annotated[str, OneOf(("base", "mean"))] = "base",
) -> Tensor:
    """WUDI-Merging (Cheng et al., ICML 2025): per target matrix, minimise Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²/‖τ_t‖².

    Target tensors (2-D, matched by ``targets``; default: the linear weights inside numbered
    blocks, as the official code) get τ_m from ``iters`` Adam steps at ``lr`` started at Σ_t τ_t
    (``solver="adam"``, official 300 / 1e-5) or the exact minimiser B A⁺ (``solver="closed_form"``,
    iters and lr unused). Every other tensor stays at θ0 (``others="base"``, official) or gets
    mean_t τ_t (``others="mean"``, FusionBench, with ``targets="*"``). No scale: θ = θ0 + τ_m.
    See :mod:`distac.methods.wudi` for the fast form, the closed form and what the lr·iters
    budget of Adam implies under norm mismatch.

    Memory: whole tensor; beside the engine's (N+1) inputs, A (n×n), B, τ_m, its gradient and Adam's two
    moments (5 m×n) per target matrix; the closed form holds A, B and A's eigenvectors in float64.
    """
    if is_target(ctx.name, ctx.shape, targets) and deltas.dim() == 3:
        return wudi_closed_form(deltas) if solver == "closed_form" else wudi_adam(deltas, iters=iters, lr=lr)
    if others == "mean":
        return deltas.mean(0)
    # −0.0 is the exact additive identity (x + −0.0 == x bit for bit, −0.0 included): θ stays θ0
    return torch.full_like(base, -0.0)

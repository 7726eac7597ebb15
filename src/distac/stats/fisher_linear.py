"""The Fisher shortcut for models whose selected parameters are all plain ``nn.Linear`` layers.

A Linear layer's per-example gradient is δ_nᵀ X_n (δ: gradient at its output, X: its input, rows =
positions), so with 2-D inputs Σ_n (δ_n x_nᵀ)² = (δ²)ᵀ(x²) is one matmul and no per-example
gradient is ever materialised. The Fisher collector checks the shortcut against the generic
``vmap`` path on the first batch before it trusts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["linear_batch", "linear_owners"]


def linear_owners(model: nn.Module, sel: Mapping[str, Tensor]) -> dict[str, nn.Linear] | None:
    """``{module name: nn.Linear}`` when every selected parameter is the weight or bias of a plain
    ``nn.Linear`` used by no other module (no ties); None otherwise."""
    owner: dict[str, str] = {}
    mods: dict[str, nn.Linear] = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:  # exact type: subclasses may bypass forward (MultiheadAttention.out_proj)
            mods[name] = m
            for pn in ("weight", "bias"):
                if getattr(m, pn, None) is not None:
                    owner[f"{name}.{pn}" if name else pn] = name
    if not sel or any(k not in owner for k in sel):
        return None
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    if any(uses.get(id(p), 0) > 1 for k, p in model.named_parameters() if k in sel):
        return None
    return {owner[k]: mods[owner[k]] for k in sel}


def _cotangents(z: Tensor, y: Tensor, u: Tensor, estimator: str) -> list[Tensor]:
    """Output gradients whose squared pullbacks sum to the estimator's per-example Fisher."""
    prob = torch.softmax(z.detach(), -1)
    if estimator == "exact":
        evals, evecs = torch.linalg.eigh(torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :])
        return list((evecs[..., 1:] * evals[:, None, 1:].clamp(min=0).sqrt()).unbind(-1))  # C−1 × (B, C)
    if estimator == "sampled":  # the same inverse-CDF draw as the vmap path
        cdf = prob.cumsum(-1)
        y = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=prob.shape[-1] - 1)
    return [prob - nn.functional.one_hot(y, prob.shape[-1]).to(prob)]  # ∂(−log p_y)/∂z


def _squared(a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Σ over examples of the squared per-example weight and bias gradients of one layer."""
    a, d = a.float(), d.float()
    if a.dim() == 2:
        return (d * d).T @ (a * a), (d * d).sum(0)
    # (B, ..., features): sum over positions inside each example first
    a, d = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
    return torch.einsum("bto,bti->boi", d, a).pow(2).sum(0), d.sum(1).pow(2).sum(0)


def linear_batch(
    owners: Mapping[str, nn.Linear],
    logits: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    y: Tensor,
    u: Tensor,
    estimator: str,
) -> dict[str, Tensor] | None:
    """Σ over the batch of per-example squared gradients, from one batched forward and backward pass(es).

    Args:
        owners: the layers (from :func:`linear_owners`).
        logits: runs the model on the batch with the given parameters and returns (B, C) logits.
        params: the selected parameters.
        y: labels (used by ``empirical``), u: uniforms for ``sampled``.
        estimator: ``sampled``, ``exact`` or ``empirical``.

    Returns:
        ``{parameter name: summed squared gradient}``, or None when a hooked layer did not run (its
        weight is used some other way), so the caller falls back to vmap. δ_n of example n's loss
        equals the δ of the summed loss because examples do not interact in an eval-mode forward.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in owners.items()]
    try:
        with torch.enable_grad():
            z = logits({k: v.detach().requires_grad_() for k, v in params.items()}).float()
    finally:
        for h in handles:
            h.remove()
    if set(outputs) != set(owners) or any(o.shape[0] != y.shape[0] for o in outputs.values()):
        return None
    cots = _cotangents(z, y, u, estimator)
    names = list(owners)
    out: dict[str, Any] = {}
    for j, cot in enumerate(cots):
        deltas = torch.autograd.grad(z, [outputs[n] for n in names], cot, retain_graph=j < len(cots) - 1)
        for n, d in zip(names, deltas, strict=True):
            gw, gb = _squared(inputs[n], d)
            for key, val in ((f"{n}.weight" if n else "weight", gw), (f"{n}.bias" if n else "bias", gb)):
                if key in params:
                    out[key] = out[key] + val if key in out else val
    return out

"""Adam/AdamW second moments as a free diagonal curvature proxy, on the sum-Fisher scale."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..io.torchfile import load_torch_file

__all__ = ["adam_fisher"]


def _optimizer_state(optimizer_state: str | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The optimizer state dict and the name to use for it in messages."""
    if isinstance(optimizer_state, str):
        loaded = load_torch_file(Path(optimizer_state))
        state = loaded if isinstance(loaded, Mapping) else {}
        where = optimizer_state
    else:
        state, where = optimizer_state, "optimizer state"
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise DistacError(f"{where}: not a torch optimizer state_dict (needs 'state' and 'param_groups')")
    return state, where


def _names(param_names: Sequence[str] | nn.Module) -> tuple[list[str], dict[str, tuple[int, ...]] | None]:
    """Parameter names in optimizer order, with their shapes when a model was given."""
    if isinstance(param_names, nn.Module):
        shapes = {k: tuple(p.shape) for k, p in param_names.named_parameters()}
        return list(shapes), shapes
    return list(param_names), None


def _second_moment(s: Mapping[str, Any], beta2: float, bias_correction: bool) -> Tensor:
    """``exp_avg_sq`` as fp32, divided by (1 − β₂^step) when ``bias_correction`` (as Adam does)."""
    v = s["exp_avg_sq"].detach().to(torch.float32).clone()
    step = float(s.get("step", 0))
    if bias_correction and step > 0:
        v /= 1.0 - math.pow(beta2, step)
    return v


def adam_fisher(
    optimizer_state: str | Mapping[str, Any],
    param_names: Sequence[str] | nn.Module,
    *,
    n_examples: int,
    batch_size: int,
    bias_correction: bool = True,
) -> dict[str, Tensor]:
    """Adam/AdamW second moments as a free diagonal curvature proxy, on the sum-Fisher scale.

    Adam's ``exp_avg_sq`` v is an EMA of squared *mini-batch-mean* gradients, so
    E[v] ≈ F_per-example / B + ḡ² (ḡ the mean gradient, ≈ 0 near convergence). Hence
    F_per-example ≈ B·v and the sum Fisher over N examples is **H ≈ N·B·v** ("Squisher", Li, Dangel,
    Tam & Raffel 2025, arXiv 2507.18807).

    * ``bias_correction`` divides v by (1 − β₂^step) as Adam does before using it; it only matters
      for short runs (step ≲ 1/(1−β₂)).
    * Weight decay: AdamW's decoupled decay does not enter v; torch ``Adam(weight_decay=λ)`` adds λθ
      to the gradient, so v also holds (λθ)² and over-estimates curvature for large weights.
    * v is the curvature along the optimisation *trajectory* (an EMA over the last ~1/(1−β₂)
      steps), not at the final weights; use it when no data is at hand.

    Args:
        optimizer_state: a path to ``torch.save(optimizer.state_dict())`` (read with
            ``weights_only=True``) or the state dict itself.
        param_names: the model (its ``named_parameters()`` order) or the names, in the order the
            parameters were given to the optimizer.
        n_examples: N, the training-set size.
        batch_size: B used in training.
        bias_correction: divide by (1 − β₂^step).

    Returns:
        ``{name: fp32 tensor}`` for every parameter the optimizer stepped.

    Example:
        >>> h = adam_fisher("optimizer.pt", model, n_examples=50_000, batch_size=32)  # doctest: +SKIP
    """
    state, where = _optimizer_state(optimizer_state)
    names, shapes = _names(param_names)
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise DistacError(
            f"{where}: the optimizer holds {len(ids)} parameters but {len(names)} names were given; "
            "pass the names in the order the parameters were given to the optimizer"
        )
    betas = {i: g.get("betas", (0.9, 0.999)) for g in state["param_groups"] for i in g["params"]}
    out: dict[str, Tensor] = {}
    for i, name in zip(ids, names, strict=True):
        s = state["state"].get(i)
        if not s or "exp_avg_sq" not in s:
            continue  # never stepped (frozen): no curvature information
        v = _second_moment(s, float(betas[i][1]), bias_correction)
        if shapes is not None and tuple(v.shape) != shapes[name]:
            raise DistacError(f"{where}: exp_avg_sq of '{name}' has shape {tuple(v.shape)}, the model {shapes[name]}")
        out[name] = v * float(n_examples) * float(batch_size)
    if not out:
        raise DistacError(f"{where}: no parameter has an 'exp_avg_sq' (not an Adam/AdamW state?)")
    return out

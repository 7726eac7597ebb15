"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): merge coefficients learned on unlabeled data.

Task arithmetic with one coefficient per task and per tensor, θ = θ_0 + Σ_t λ_{t,l} τ_{t,l}, chosen by
minimising the mean prediction entropy of the merged model on each task's unlabeled inputs (each
task seen through its own head). Where the grid search of :func:`distac.tuning.tune` picks one α,
AdaMerging fits thousands of them; it needs gradients through the model, so it holds the N task
vectors in memory and suits models that fit on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..nn.data import Inputs
from ..nn.evaluate import entropy
from ..nn.models import BoundModule, batch_to, default_device, forward_logits
from ..progress import track
from ..taskvector import match_heads

__all__ = ["adamerging"]

StateDict = dict[str, Tensor]


def adamerging(
    model: nn.Module,
    base: Mapping[str, Tensor],
    models: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, Inputs],
    *,
    heads: Sequence[str] | None = None,
    init: float = 0.3,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[StateDict, dict[str, list[float]]]:
    """Layer-wise AdaMerging: θ = θ_0 + Σ_t λ_{t,l} τ_{t,l}, λ learned by minimising prediction entropy.

    One coefficient per task and per merged tensor (the official code's "layer" is a parameter
    tensor), initialised at ``init`` (official 0.3), clamped to [0, 1] after each Adam step
    (official), lr 1e-3 (official); the loss is the mean entropy over a batch of every task's
    *unlabeled* data, each task seen through its own head. Defaults are smaller than the official
    500 steps × 16 examples because they run on a CPU; raise ``steps`` on a GPU.

    Returns:
        ``(merged state dict, {task: [λ per merged tensor, in the base's key order]})``.
    """
    if not models:
        raise DistacError("adamerging needs at least one fine-tuned model")
    dev = default_device(device)
    head_names = set(match_heads(list(base), heads))
    names = [k for k, v in base.items() if v.is_floating_point() and k not in head_names]
    tasks = list(models)
    b = {k: base[k].to(dev, torch.float32) for k in names}
    taus = {k: torch.stack([models[t][k].to(dev, torch.float32) - b[k] for t in tasks]) for k in names}
    lam = torch.full((len(tasks), len(names)), float(init), device=dev, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    fixed = {k: v.to(dev) for k, v in base.items() if k not in names}
    model.to(dev)
    for _ in track(range(steps), desc="adamerging", unit="step", quiet=not progress):
        merged = {k: b[k] + torch.einsum("t,t...->...", lam[:, i], taus[k]) for i, k in enumerate(names)}
        loss = torch.zeros((), device=dev)
        for t in tasks:
            d = data[t]
            idx = torch.randint(0, len(d), (min(batch_size, len(d)),), generator=gen)
            state = {**fixed, **merged, **{k: models[t][k].to(dev) for k in head_names}}
            z = forward_logits(BoundModule(model, state), batch_to(d.select(idx), dev))
            loss = loss + entropy(z).mean() / len(tasks)
        if not math.isfinite(float(loss.detach())):
            raise DistacError("adamerging: the entropy became NaN/Inf; lower lr or init")
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
    with torch.no_grad():
        out = {k: v.clone() for k, v in base.items()}
        for i, k in enumerate(names):
            out[k] = (b[k] + torch.einsum("t,t...->...", lam[:, i], taus[k])).to(base[k].dtype).cpu()
    coeffs = {t: [float(x) for x in lam[j].detach().cpu()] for j, t in enumerate(tasks)}
    return out, coeffs

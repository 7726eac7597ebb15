"""Tiny models and tasks for the DisTaC tests (built and trained inside the tests; nothing downloaded).

Tasks are sklearn's 8x8 digits (64 features, 10 classes). The "pre-trained" base is an MLP trained
briefly on all digits; fine-tunes continue from it:

* ``long``: high learning rate and many steps -> a task vector several times longer than the others;
* ``short_*``: a few gentle steps -> short vectors;
* ``smooth``: heavy label smoothing -> a low-confidence model.

``make_mlp`` is importable as ``distac_tiny:make_mlp`` for the CLI (``--arch``) when ``tests/`` is on
``PYTHONPATH``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_mlp(in_features: int = 64, hidden: int = 32, classes: int = 10) -> nn.Module:
    """A 2-layer MLP; ``net.2`` (the last Linear) is the head by distac's default rule."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): standardised digits, a fixed 70/30 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.7 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def train(
    model: nn.Module, x, y, *, steps: int, lr: float, smoothing: float = 0.0, batch: int = 128, seed: int = 0
) -> nn.Module:
    """Plain Adam + cross-entropy (optionally label-smoothed) on minibatches."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=1)
def zoo() -> dict[str, dict[str, torch.Tensor]]:
    """``{"base", "long", "short_a", "short_b", "smooth"}`` state dicts of :func:`make_mlp` (cached)."""
    torch.manual_seed(0)
    xtr, ytr, _, _ = digits()
    base = train(make_mlp(), xtr, ytr, steps=40, lr=3e-3, seed=1)
    out = {"base": clone_state(base)}

    def finetune(seed: int, **kw) -> dict[str, torch.Tensor]:
        m = make_mlp()
        m.load_state_dict(out["base"])
        return clone_state(train(m, xtr, ytr, seed=seed, **kw))

    out["long"] = finetune(2, steps=500, lr=3e-2)
    out["short_a"] = finetune(3, steps=150, lr=3e-3)
    out["short_b"] = finetune(4, steps=150, lr=3e-3)
    out["smooth"] = finetune(5, steps=150, lr=5e-3, smoothing=0.7)
    return out


def accuracy(state: dict[str, torch.Tensor], x, y) -> float:
    m = make_mlp()
    m.load_state_dict(state)
    with torch.no_grad():
        return float((m(x).argmax(-1) == y).float().mean())


def save_npy(path, x) -> None:
    np.save(path, x.numpy() if isinstance(x, torch.Tensor) else x)

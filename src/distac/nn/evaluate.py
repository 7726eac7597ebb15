"""Classification metrics shared by diagnose, condition, calibrate and the reproduce suites.

Everything works on logits already collected in memory (``(N, C)`` float tensors) so that the
metrics are pure functions; :func:`collect_logits` runs a model over batches to get them.

ECE binning (documented because every paper uses a slightly different one): 15 equal-width bins
over the max-softmax confidence in [0, 1], bins closed on the right, ``ECE = Σ_b |B_b|/N ·
|acc(B_b) − conf(B_b)|`` (Guo et al., 2017, "On Calibration of Modern Neural Networks"). torchmetrics'
``MulticlassCalibrationError`` uses the same default (15 bins, L1 norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from .models import Batch, BoundModule, batch_to, forward_logits

__all__ = [
    "ConfidenceStats",
    "accuracy",
    "check_finite_logits",
    "collect_logits",
    "confidence_stats",
    "ece",
    "entropy",
    "nll",
    "reliability_diagram",
]

ECE_BINS = 15


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    state: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    source: str = "the data",
) -> Tensor:
    """Run ``model`` (in eval mode) over ``batches`` and return all logits as one fp32 CPU tensor.

    With ``state``, the model is called functionally with those weights (``torch.func.functional_call``),
    so the caller's module is never modified. NaN/Inf logits are refused (naming ``source`` and the
    first bad row): every measure computed from them would silently be NaN.
    """
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            b = batch_to(batch, device)
            z = forward_logits(model if state is None else BoundModule(model, state), b)
            out.append(z.detach().float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise DistacError("no batches to evaluate: the data is empty")
    logits = torch.cat(out)
    check_finite_logits(logits, source)
    return logits


def check_finite_logits(logits: Tensor, source: str) -> None:
    """Raise a :class:`DistacError` naming ``source`` and the first row whose logits are NaN or Inf."""
    bad = ~torch.isfinite(logits.reshape(logits.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DistacError(
            f"{source}: the model's logits are NaN or Inf for {int(bad.sum())} of {logits.shape[0]} examples "
            f"(first: row {i}); check those inputs for NaN/Inf values and the weights for NaN"
        )


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    _check(logits, labels)
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)`` (nats)."""
    _check(logits, labels)
    return float(F.cross_entropy(logits.float() / temperature, labels.long()))


def entropy(logits: Tensor) -> Tensor:
    """Per-example Shannon entropy (nats) of softmax(logits), shape ``(N,)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ece(logits: Tensor, labels: Tensor, *, n_bins: int = ECE_BINS, temperature: float = 1.0) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (see module docstring)."""
    d = reliability_diagram(logits, labels, n_bins=n_bins, temperature=temperature)
    n = sum(d["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(d["count"], d["accuracy"], d["confidence"], strict=True)))


def reliability_diagram(
    logits: Tensor, labels: Tensor, *, n_bins: int = ECE_BINS, temperature: float = 1.0
) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count (empty bins report 0) for a reliability plot.

    Returns ``{"edges": n_bins+1 floats, "confidence": ..., "accuracy": ..., "count": ...}``.
    """
    _check(logits, labels)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels.to(pred.device)).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; confidence is > 0 for any softmax, so bin 0 is (0, 1/n].
    idx = torch.clamp(torch.bucketize(conf, edges[1:-1], right=False), 0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).float()
    sconf = torch.zeros(n_bins).index_add_(0, idx, conf)
    sacc = torch.zeros(n_bins).index_add_(0, idx, correct)
    safe = count.clamp_min(1)
    return {
        "edges": edges.tolist(),
        "confidence": (sconf / safe).tolist(),
        "accuracy": (sacc / safe).tolist(),
        "count": count.tolist(),
    }


@dataclass
class ConfidenceStats:
    """Label-free confidence of a classifier on some inputs (DisTaC §5.1)."""

    mean_max_prob: float
    mean_entropy: float  # nats
    normalized_entropy: float  # mean entropy / ln(C), in [0, 1]
    max_prob_hist: list[int]  # counts over 20 equal bins of [0, 1]

    def to_dict(self) -> dict[str, float | list[int]]:
        return {
            "mean_max_prob": self.mean_max_prob,
            "mean_entropy": self.mean_entropy,
            "normalized_entropy": self.normalized_entropy,
            "max_prob_hist": self.max_prob_hist,
        }


def confidence_stats(logits: Tensor, *, hist_bins: int = 20) -> ConfidenceStats:
    """Mean max-softmax probability and mean entropy of ``softmax(logits)``."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise DistacError(f"expected logits of shape (N, C) with N > 0, got {tuple(logits.shape)}")
    probs = F.softmax(logits.float(), dim=-1)
    h = entropy(logits)
    c = logits.shape[-1]
    maxp = probs.max(-1).values
    hist = torch.histc(maxp, bins=hist_bins, min=0.0, max=1.0)
    return ConfidenceStats(
        mean_max_prob=float(maxp.mean()),
        mean_entropy=float(h.mean()),
        normalized_entropy=float(h.mean() / math.log(c)) if c > 1 else 0.0,
        max_prob_hist=[int(x) for x in hist.tolist()],
    )


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2:
        raise DistacError(f"expected logits of shape (N, C), got {tuple(logits.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise DistacError(f"{labels.shape[0]} labels for {logits.shape[0]} predictions: the label count must match")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise DistacError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {logits.shape[1]} classes"
        )

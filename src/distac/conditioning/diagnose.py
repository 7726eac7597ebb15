"""Diagnose task vectors before merging: norm mismatch and low confidence (DisTaC §5.1).

For each task: ‖τ_t‖ (global L2 over the shared entries, as the official code's ``total_norm``),
per-tensor norms, ``norm_ratio`` = ‖τ_t‖ / mean_{s≠t} ‖τ_s‖, pairwise cosines, and, on the task's
unlabeled data, the fine-tuned model's mean max-softmax probability and mean entropy (plus accuracy
and ECE with labels). The paper gives no automatic detector (§5.1); distac's thresholds:

* **norm outlier**: ``norm_ratio ≥ 2.0``. The paper's harmful regime is 5–7×; by its Proposition 1 a
  2× longer, near-orthogonal vector already leaves the shorter one with a cosine of at most ~0.45 to
  the sum, and shrinking is cheap and safe (shrink-don't-stretch, §1.3), so distac flags early.
  Vectors *shorter* than the others are never stretched (κ > 1 collapses accuracy, §1.3).
* **low confidence**: mean normalised entropy H/ln C ≥ 0.25, or ≥ 10× the median of the other tasks
  while ≥ 0.05. A cross-entropy fine-tune sits near 0.01 on its own data; heavy label smoothing
  (ε = 0.2, 10 classes) gives ≈ 0.38 (its target distribution alone has H/ln C = 0.38), and the
  paper reports entropy orders of magnitude above normal for smoothed/mixup/focal sources.

Recommendations (§6.5): κ = mean_{s≠t}‖τ_s‖/‖τ_t‖ for a norm outlier, else 1; temperatures (1, 10)
for low confidence, else (10, 10); mode ``norm`` / ``confidence`` / ``both`` / ``none``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..io.atomic import atomic_file, write_text
from ..nn.data import Inputs
from ..nn.evaluate import accuracy, collect_logits, confidence_stats, ece
from ..nn.models import default_device
from ..taskvector import TaskVector
from ._common import (
    check_data_fits,
    check_model_state,
    eval_batches,
    label_tensor,
    resolve_heads,
    shared_vector,
)
from .lowrank import FactoredVector, as_factored, vector_cosine

__all__ = ["DiagnoseReport", "FlagRules", "TaskDiagnosis", "diagnose", "recommend"]

NORM_TEMPS = (10.0, 10.0)  # (T_teacher, T_student) for norm conditioning, DisTaC §1.3
CONFIDENCE_TEMPS = (1.0, 10.0)  # asymmetric pair for confidence conditioning, §1.4


@dataclass(frozen=True)
class FlagRules:
    """When diagnose flags a task: a norm outlier or low confidence (the module docstring says why these values).

    Example:
        >>> diagnose(model, base, finetuned, data, rules=FlagRules(norm_ratio=3.0))  # doctest: +SKIP
    """

    norm_ratio: float = 2.0
    normalized_entropy: float = 0.25
    relative_entropy: float = 10.0
    relative_entropy_floor: float = 0.05


@dataclass
class TaskDiagnosis:
    """Everything diagnose found about one task."""

    name: str
    norm: float
    norm_ratio: float | None  # None with a single task
    layer_norms: dict[str, float]
    mean_max_prob: float | None = None
    mean_entropy: float | None = None
    normalized_entropy: float | None = None
    max_prob_hist: list[int] | None = None
    accuracy: float | None = None
    ece: float | None = None
    flags: list[str] = field(default_factory=list)
    mode: str = "none"
    kappa: float = 1.0
    t_teacher: float = NORM_TEMPS[0]
    t_student: float = NORM_TEMPS[1]


@dataclass
class DiagnoseReport:
    """The result of :func:`diagnose`: per-task diagnoses, pairwise cosines and the flag rules used."""

    tasks: dict[str, TaskDiagnosis]
    cosine: dict[str, dict[str, float]]
    rules: FlagRules
    heads: list[str]

    def __getitem__(self, task: str) -> TaskDiagnosis:
        return self.tasks[task]

    @property
    def flagged(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.flags]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {n: asdict(t) for n, t in self.tasks.items()},
            "cosine": self.cosine,
            "thresholds": asdict(self.rules),  # the JSON key predates the name FlagRules
            "heads": self.heads,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; with ``path``, also written there (atomically)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text(path, text)
        return text

    def table(self) -> str:
        """A fixed-width table for the terminal."""
        cols = ["task", "norm", "ratio", "max_prob", "entropy", "acc", "ece", "flags", "kappa", "T_t", "T_s"]
        rows = []
        for t in self.tasks.values():
            rows.append(
                [
                    t.name,
                    f"{t.norm:.4g}",
                    _f(t.norm_ratio, ".2f"),
                    _f(t.mean_max_prob, ".3f"),
                    _f(t.mean_entropy, ".3f"),
                    _f(t.accuracy, ".3f"),
                    _f(t.ece, ".3f"),
                    ",".join(t.flags) or "-",
                    f"{t.kappa:.3g}",
                    f"{t.t_teacher:g}",
                    f"{t.t_student:g}",
                ]
            )
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

        def line(r: list[str]) -> str:
            return "  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True))

        return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)])

    def figure(self, path: str | Path) -> Path:
        """A PNG: task-vector norms as bars, and one max-probability histogram per task (matplotlib Agg)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        tasks = list(self.tasks.values())
        with_conf = [t for t in tasks if t.max_prob_hist is not None]
        ncols = 1 + len(with_conf)
        fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.2), squeeze=False)
        ax = axes[0][0]
        colors = ["tab:red" if "norm_outlier" in t.flags else "tab:blue" for t in tasks]
        ax.bar([t.name for t in tasks], [t.norm for t in tasks], color=colors)
        ax.set_title("task-vector norm ‖τ‖")
        ax.tick_params(axis="x", rotation=45)
        for ax, t in zip(axes[0][1:], with_conf, strict=True):
            hist = t.max_prob_hist or []
            edges = [i / len(hist) for i in range(len(hist))]
            ax.bar(
                edges,
                hist,
                width=1 / max(len(hist), 1),
                align="edge",
                color="tab:red" if "low_confidence" in t.flags else "tab:green",
            )
            ax.set_title(f"{t.name}: max prob (mean {t.mean_max_prob:.2f})")
            ax.set_xlim(0, 1)
        fig.tight_layout()
        try:
            with atomic_file(path, overwrite=True) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)
        return Path(path)


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def recommend(
    *, norm: float, others_mean: float | None, norm_outlier: bool, low_confidence: bool
) -> tuple[str, float, float, float]:
    """``(mode, kappa, t_teacher, t_student)`` for one task (DisTaC §6.5).

    κ = mean of the other norms / own norm for a norm outlier (never above 1: shrink, don't stretch).
    """
    kappa = min(1.0, others_mean / norm) if norm_outlier and others_mean and norm > 0 else 1.0
    temps = CONFIDENCE_TEMPS if low_confidence else NORM_TEMPS
    mode = {(False, False): "none", (True, False): "norm", (False, True): "confidence", (True, True): "both"}[
        (norm_outlier, low_confidence)
    ]
    return mode, kappa, temps[0], temps[1]


def diagnose(
    model: nn.Module,
    base: Mapping[str, Tensor],
    finetuned: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    labels: Mapping[str, Any] | None = None,
    *,
    heads: Sequence[str] | None = None,
    rules: FlagRules | None = None,
    batch_size: int = 128,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> DiagnoseReport:
    """Measure every task vector and, given data, every fine-tuned model's confidence; flag and recommend.

    Args:
        model: a module of the common architecture; its forward returns logits. It is not modified
            (fine-tuned weights are applied with ``torch.func.functional_call``).
        base: the pre-trained state dict θ_0.
        finetuned: task name -> fine-tuned state dict, or a LoRA adapter
            (:class:`~distac.conditioning.lowrank.FactoredVector`): its norms and cosines come from the factors.
        data: task name -> that task's unlabeled inputs (an :class:`~distac.nn.data.Inputs`, a tensor, or an
            iterable of batches). Tasks without data get no confidence numbers and no confidence flag.
        labels: task name -> labels in the same order as the data (tensor, per-batch tensors, or the
            labeled :class:`~distac.nn.data.Inputs`); adds accuracy and ECE.
        heads: head name patterns excluded from τ (default: the model type's, see
            :func:`distac.nn.models.default_head_patterns`).
        rules: when to flag a task (:class:`FlagRules`; defaults explained in the module docstring).
        max_batches: evaluate at most this many batches per task.

    Returns:
        A :class:`DiagnoseReport`: ``report[task]`` (norm, ratio, confidence, flags, recommended mode,
        κ and temperatures), ``report.flagged``, ``report.cosine``; ``.table()``, ``.to_json()``, ``.figure()``.

    Raises:
        DistacError: mismatched models, unknown tasks, data that does not fit, or NaN/Inf logits.

    Example:
        >>> rep = diagnose(model, base, {"a": sd_a, "b": sd_b}, {"a": x_a, "b": x_b})  # doctest: +SKIP
        >>> rep.flagged, rep["a"].mode, rep["a"].kappa  # doctest: +SKIP
    """
    if not finetuned:
        raise DistacError("diagnose needs at least one fine-tuned model")
    th = rules or FlagRules()
    check_model_state(model, base)
    patterns = resolve_heads(model, base, heads)
    dev = default_device(device)
    vectors = {n: _shared(base, ft, patterns, f"fine-tuned model '{n}'") for n, ft in finetuned.items()}
    norms = {n: v.norm() for n, v in vectors.items()}
    names = list(vectors)
    cosine = {a: {b: (1.0 if a == b else vector_cosine(vectors[a], vectors[b])) for b in names} for a in names}
    unknown = sorted(set(data or {}) - set(names)) + sorted(set(labels or {}) - set(names))
    if unknown:
        raise DistacError(f"data/labels given for unknown task(s) {unknown}; the tasks are {names}")

    tasks: dict[str, TaskDiagnosis] = {}
    model = model.to(dev)
    for n in names:
        others = [norms[m] for m in names if m != n]
        others_mean = sum(others) / len(others) if others else None
        ratio = norms[n] / others_mean if others_mean else None
        t = TaskDiagnosis(n, norms[n], ratio, vectors[n].norms())
        if data is not None and n in data:
            check_data_fits(model, data[n], f"data of task '{n}'")
            state = {k: v.to(dev) for k, v in _weights(base, finetuned[n]).items()}
            source = data[n].source if isinstance(data[n], Inputs) else f"data of task '{n}'"
            logits = collect_logits(
                model,
                eval_batches(data[n], batch_size, source),
                state=state,
                device=dev,
                max_batches=max_batches,
                source=f"task '{n}', {source}",
            )
            cs = confidence_stats(logits)
            t.mean_max_prob, t.mean_entropy = cs.mean_max_prob, cs.mean_entropy
            t.normalized_entropy, t.max_prob_hist = cs.normalized_entropy, cs.max_prob_hist
            if labels is not None and n in labels:
                y = label_tensor(labels[n], f"labels of task '{n}'")[: logits.shape[0]]
                if y.shape[0] != logits.shape[0]:
                    raise DistacError(f"task '{n}': {y.shape[0]} labels for {logits.shape[0]} examples")
                t.accuracy, t.ece = accuracy(logits, y), ece(logits, y)
        tasks[n] = t

    entropies = {n: t.normalized_entropy for n, t in tasks.items() if t.normalized_entropy is not None}
    for n, t in tasks.items():
        if t.norm_ratio is not None and t.norm_ratio >= th.norm_ratio:
            t.flags.append("norm_outlier")
        if _low_confidence(n, entropies, th):
            t.flags.append("low_confidence")
        others = [norms[m] for m in names if m != n]
        t.mode, t.kappa, t.t_teacher, t.t_student = recommend(
            norm=t.norm,
            others_mean=(sum(others) / len(others)) if others else None,
            norm_outlier="norm_outlier" in t.flags,
            low_confidence="low_confidence" in t.flags,
        )
    return DiagnoseReport(tasks, cosine, th, patterns)


def _shared(base: Mapping[str, Tensor], ft: Any, patterns: Sequence[str], what: str) -> TaskVector | FactoredVector:
    """τ over the shared entries: dense for a state dict, in LoRA form for an adapter (never materialised)."""
    adapter = as_factored(ft, base, what)
    if adapter is None:
        return shared_vector(base, ft, patterns, what)
    adapter.check_against(base, what)
    return adapter.without_heads(patterns)


def _weights(base: Mapping[str, Tensor], ft: Any) -> Mapping[str, Tensor]:
    """The weights to run: a state dict as given; for an adapter, the base plus only the tensors it changes."""
    adapter = as_factored(ft)
    return ft if adapter is None else {**base, **adapter.changed(base)}


def _low_confidence(name: str, entropies: Mapping[str, float], th: FlagRules) -> bool:
    h = entropies.get(name)
    if h is None or math.isnan(h):
        return False
    if h >= th.normalized_entropy:
        return True
    others = [v for m, v in entropies.items() if m != name]
    if not others or h < th.relative_entropy_floor:
        return False
    return h >= th.relative_entropy * max(statistics.median(others), 1e-12)

"""Choose a merge's hyperparameters on the user's own validation data: ``distac.tune`` and ``distac tune``.

Every merge method has knobs (α/``scale``, ``density``, ``k``, ...) and the paper's numbers depend on
choosing them on held-out data. :func:`tune` evaluates the merged model once per grid point, on every
task with that task's own head, and keeps the best point by one of three criteria:

* ``normalized_accuracy`` (labels): the mean over tasks of merged accuracy ÷ the task's own
  fine-tuned accuracy (the task_vectors / DisTaC protocol; tune measures the fine-tunes itself);
* ``accuracy`` (labels): the plain mean accuracy over tasks;
* ``entropy`` (no labels): the mean prediction entropy over tasks, lower is better (AdaMerging's
  surrogate: on unlabeled test data, low entropy tracks high accuracy).

``auto`` picks ``normalized_accuracy`` when every task has labels, else ``entropy``.

Consensus TA/TIES: a ``tall_lambda`` list in the grid is chosen *per task*, as the official TALL
masks code does: λ_t maximises task t's own score of its TALL model θ_0 + m_t ⊙ τ_MTL with
m_t = 1{|τ_t| > λ_t |τ_MTL − τ_t|}; the other parameters are then searched with those λ_t fixed.

Speed: for methods whose ``scale`` multiplies the merged task vector at the end (every method but
gradient matching, where α also enters H̄), the merge runs once per setting of the *other*
parameters at scale 1 and each scale value is the exact affine map θ_0 + s·Δ. Scores at such points
can differ from a direct merge by fp32 rounding only; the model tune writes is always re-merged with
the chosen parameters, so it is bit for bit what ``distac merge`` gives.

:func:`distac.tuning.adamerging` learns coefficients instead of searching a grid.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..merging.engine import merge
from ..methods import get_method
from ..nn.data import Inputs
from ..nn.evaluate import accuracy, collect_logits, entropy
from ..nn.models import default_device
from ..progress import track
from ..taskvector import match_heads

__all__ = ["CRITERIA", "TunePoint", "TuneResult", "default_grid", "tune"]

StateDict = dict[str, Tensor]
CRITERIA = ("auto", "normalized_accuracy", "accuracy", "entropy")
#: methods whose ``scale`` is not a final multiplier (α also weighs the curvature in H̄)
NONLINEAR_SCALE = frozenset({"gradient_matching"})
#: methods whose ``tall_lambda`` is chosen per task (TALL protocol) when it is in the grid
TALL_METHODS = frozenset({"consensus_ta", "consensus_ties"})


@dataclass(frozen=True)
class TunePoint:
    """One grid point: its parameters, the score per task and the mean (the criterion's value)."""

    params: dict[str, Any]
    per_task: dict[str, float]
    score: float


@dataclass
class TuneResult:
    """Every grid point, the best one, and the reference each task was normalised by."""

    method: str
    criterion: str
    points: list[TunePoint]
    best: TunePoint
    own: dict[str, float] = field(default_factory=dict)  # fine-tuned accuracy per task (normalised criterion)

    @property
    def higher_is_better(self) -> bool:
        return self.criterion != "entropy"

    def table(self) -> str:
        """A Markdown table: one row per grid point, the best marked with ``*``."""
        tasks = list(self.best.per_task)
        keys = list(self.best.params)
        head = [*keys, *tasks, self.criterion]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in self.points:
            mark = " *" if p is self.best else ""
            vals = [f"{p.params[k]}" for k in keys] + [f"{p.per_task[t]:.4f}" for t in tasks]
            rows.append("| " + " | ".join([*vals, f"{p.score:.4f}{mark}"]) + " |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "criterion": self.criterion,
            "best": {"params": self.best.params, "score": self.best.score, "per_task": self.best.per_task},
            "own_accuracy": self.own,
            "points": [{"params": p.params, "score": p.score, "per_task": p.per_task} for p in self.points],
        }


def default_grid(method: str) -> dict[str, list[Any]]:
    """``scale`` from 0.1 to 1.0 (sum-type methods' useful range) for methods that take it, else nothing."""
    if "scale" not in get_method(method).params:
        return {}
    return {"scale": [round(0.1 * i, 1) for i in range(1, 11)]}


def _points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    for k, values in grid.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise DistacError(f"tune grid '{k}': give a non-empty list of values, got {values!r}")
    # scale varies fastest: linear-scale methods then merge once per setting of the other parameters
    keys = sorted(grid, key=lambda k: k == "scale")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _resolve_criterion(criterion: str, data: Mapping[str, Inputs]) -> str:
    if criterion not in CRITERIA:
        raise DistacError(f"tune criterion '{criterion}' is not one of {list(CRITERIA)}")
    unlabeled = [t for t, d in data.items() if d.labels is None]
    if criterion == "auto":
        return "entropy" if unlabeled else "normalized_accuracy"
    if criterion != "entropy" and unlabeled:
        raise DistacError(f"tune criterion '{criterion}' needs labels; task(s) {unlabeled} have none")
    return criterion


class _Scorer:
    """Scores a merged body on every task with that task's own head tensors."""

    def __init__(
        self,
        model: nn.Module,
        models: Mapping[str, Mapping[str, Tensor]],
        data: Mapping[str, Inputs],
        head_names: Sequence[str],
        criterion: str,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.models, self.data = model, models, data
        self.head_names, self.criterion = list(head_names), criterion
        self.batch_size, self.device = batch_size, device
        self.own: dict[str, float] = {}
        if criterion == "normalized_accuracy":
            self.own = {t: self._metric(t, models[t], "accuracy") for t in data}
            zero = [t for t, a in self.own.items() if a <= 0]
            if zero:
                raise DistacError(
                    f"task(s) {zero}: the fine-tuned model scores 0 on its own data; normalised accuracy is undefined"
                )

    def _metric(self, task: str, state: Mapping[str, Tensor], kind: str) -> float:
        d = self.data[task]
        st = {k: v.to(self.device) for k, v in state.items()}
        # collect_logits refuses NaN/Inf logits, naming the task's data
        z = collect_logits(
            self.model, d.batches(self.batch_size), state=st, device=self.device, source=f"task '{task}' ({d.source})"
        )
        if kind == "entropy":
            return float(entropy(z).mean())
        assert d.labels is not None
        return accuracy(z, d.labels)

    def task(self, t: str, merged: Mapping[str, Tensor]) -> float:
        """Task ``t``'s score of the merged body with ``t``'s own head."""
        state = dict(merged)
        state.update({k: self.models[t][k] for k in self.head_names})
        v = self._metric(t, state, "entropy" if self.criterion == "entropy" else "accuracy")
        return v / self.own[t] if self.criterion == "normalized_accuracy" else v

    def __call__(self, merged: Mapping[str, Tensor]) -> dict[str, float]:
        return {t: self.task(t, merged) for t in self.data}


def _merged_at(
    method: str, base: StateDict, models: list[StateDict], fixed: Mapping[str, Any], heads: Sequence[str], stats: dict
) -> Callable[[Mapping[str, Any]], StateDict]:
    """params -> merged state; a linear ``scale`` reuses one merge per setting of the other parameters."""
    linear = "scale" in get_method(method).params and method not in NONLINEAR_SCALE
    cache: dict[tuple, StateDict] = {}

    def at(point: Mapping[str, Any]) -> StateDict:
        params = {**fixed, **point}
        if not linear or "scale" not in point:
            return merge(base, models, method, heads=heads, **stats, **params)
        rest = {k: v for k, v in params.items() if k != "scale"}
        key = tuple(sorted((k, repr(v)) for k, v in rest.items()))
        if key not in cache:
            cache.clear()  # points arrive grouped by the other parameters: keep one unit merge
            unit = merge(base, models, method, heads=heads, scale=1.0, **stats, **rest)
            cache[key] = {k: unit[k] - base[k] for k in base if base[k].is_floating_point()}
        delta, s = cache[key], float(point["scale"])
        return {k: (base[k] + s * delta[k]).to(base[k].dtype) if k in delta else base[k] for k in base}

    return at


def tune(
    model: nn.Module,
    base: Mapping[str, Tensor],
    models: Mapping[str, Mapping[str, Tensor]],
    data: Mapping[str, Inputs],
    *,
    method: str = "task_arithmetic",
    grid: Mapping[str, Sequence[Any]] | None = None,
    params: Mapping[str, Any] | None = None,
    criterion: str = "auto",
    heads: Sequence[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    **stats: Any,
) -> TuneResult:
    """Evaluate a merge at every grid point on each task's validation data and return the best point.

    Args:
        model: a module of the models' architecture; called functionally, never modified.
        base: the pre-trained state dict θ_0.
        models: ``{task: fine-tuned state dict}``; each task is evaluated with its own head tensors.
        data: ``{task: Inputs}`` validation data (labels for the accuracy criteria).
        method: a merge method (``distac methods``).
        grid: ``{parameter: [values]}``; every combination is tried. Default: ``scale`` 0.1 … 1.0.
        params: fixed parameters of the method (not tuned).
        criterion: ``auto``, ``normalized_accuracy``, ``accuracy`` or ``entropy`` (module docstring).
        heads: name patterns of the task-specific tensors (globs or ``re:``); required with several tasks.
        fishers, base_fisher, grams: statistics for the curvature methods, as for :func:`distac.merge`.

    Returns:
        A :class:`TuneResult`; ``result.best.params`` go straight into :func:`distac.merge`.

    Example:
        >>> res = distac.tune(net, base, {"a": sd_a, "b": sd_b}, {"a": va, "b": vb},  # doctest: +SKIP
        ...                   method="ties", grid={"scale": [0.5, 1.0], "density": [0.1, 0.2]}, heads=["head.*"])
        >>> merged = distac.merge(base, [sd_a, sd_b], "ties", heads=["head.*"], **res.best.params)  # doctest: +SKIP
    """
    if not models:
        raise DistacError("tune needs at least one fine-tuned model")
    missing = [t for t in models if t not in data]
    if missing:
        raise DistacError(f"tune: no validation data for task(s) {missing}")
    crit = _resolve_criterion(criterion, data)
    grid = dict(grid) if grid is not None else default_grid(method)
    if not grid:
        raise DistacError(f"tune: method '{method}' takes no 'scale'; give a grid of its parameters")
    fixed = dict(params or {})
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise DistacError(f"tune: {clash} are both fixed and in the grid; keep one")
    head_names = sorted(match_heads(list(base), heads))
    dev = default_device(device)
    scorer = _Scorer(model, models, data, head_names, crit, batch_size, dev)
    base_sd, sds = dict(base), [dict(m) for m in models.values()]
    if method in TALL_METHODS and "tall_lambda" in grid:
        lambdas = grid.pop("tall_lambda")
        mtl = _tall_mtl(method, base_sd, sds, fixed, head_names)
        fixed["tall_lambda"] = [
            _best_tall_lambda(scorer, t, i, base_sd, sds, mtl, lambdas) for i, t in enumerate(models)
        ]
        if not grid:
            grid = {"scale": [fixed.pop("scale", 1.0)]}
    merged_at = _merged_at(method, base_sd, sds, fixed, heads or [], stats)
    sign = 1.0 if crit != "entropy" else -1.0
    points: list[TunePoint] = []
    for p in track(_points(grid), desc=f"tune {method}", unit="point", quiet=not progress):
        per_task = scorer(merged_at(p))
        points.append(TunePoint(dict(p), per_task, sum(per_task.values()) / len(per_task)))
    best = max(points, key=lambda q: sign * q.score)  # first best in grid order on ties
    if "tall_lambda" in fixed and "tall_lambda" not in (params or {}):
        best.params["tall_lambda"] = fixed["tall_lambda"]  # chosen per task: part of the answer
    return TuneResult(method, crit, points, best, scorer.own)


def _tall_mtl(
    method: str, base: StateDict, models: list[StateDict], fixed: Mapping[str, Any], heads: Sequence[str]
) -> StateDict:
    """τ_MTL of the TALL masks: Σ_t w_t τ_t (Consensus TA), or TIES with disjoint sum (Consensus TIES)."""
    if method == "consensus_ta":
        w = fixed.get("weights") or [1.0] * len(models)
        return {k: sum(wi * (m[k] - base[k]) for wi, m in zip(w, models, strict=True)) for k in _body(base, heads)}
    ties = {k: fixed[k] for k in ("density", "scope", "weights") if k in fixed}
    merged = merge(base, models, "ties", heads=[f"re:^{re.escape(h)}$" for h in heads], merge_fn="sum", **ties)
    return {k: merged[k] - base[k] for k in _body(base, heads)}


def _body(base: StateDict, heads: Sequence[str]) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point() and k not in set(heads)]


def _best_tall_lambda(
    scorer: _Scorer, task: str, i: int, base: StateDict, models: list[StateDict], mtl: StateDict, grid: Sequence[Any]
) -> float:
    """λ_t maximising task t's own score of its TALL model θ0 + m_t ⊙ τ_MTL, m_t = |τ_t| > λ|τ_MTL − τ_t|.

    The official per-task protocol of the TALL masks code; ties keep the smaller λ.
    """
    best_lam, best = float(grid[0]), -math.inf
    sign = -1.0 if scorer.criterion == "entropy" else 1.0
    for lam in grid:
        state = dict(base)
        for k, m in mtl.items():
            tau = models[i][k] - base[k]
            state[k] = base[k] + torch.where(tau.abs() > float(lam) * (m - tau).abs(), m, torch.zeros_like(m))
        score = sign * scorer.task(task, state)
        if score > best:
            best_lam, best = float(lam), score
    return best_lam

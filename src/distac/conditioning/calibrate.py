"""Post-merge temperature scaling, one temperature per task head (DisTaC §1.5; Guo et al., 2017).

DisTaC makes sources over-confident on purpose and recommends calibrating the *merged* model. For each
task, with the merged shared weights and that task's head, distac fits one scalar T > 0 that
minimises the NLL of ``softmax(z / T)`` on labeled held-out data. NLL is convex in 1/T, hence
unimodal in log T, so a golden-section search over log T in [0.01, 100] finds the single minimum
(separable data, whose NLL only falls as T → 0, gets the bound 0.01). If the result were ever worse
than T = 1, T = 1 is kept.

Temperatures are stored next to the merged weights in ``temperatures.json``::

    {"format": "distac.temperatures/v1",
     "temperatures": {"<task>": T, ...},          # divide that task's logits by T
     "metrics": {"<task>": {"nll_before", "nll_after", "ece_before", "ece_after", "n"}},
     "ece_bins": 15}

A per-task export applies T by dividing the task head's logits (equivalently its weight and bias)
by T; the file is merged with an existing one (other tasks' entries are kept).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from ..io.atomic import write_text
from ..merging.temperatures import TEMPERATURES_FILE, TEMPERATURES_FORMAT, read_temperatures
from ..nn.data import Inputs
from ..nn.evaluate import ECE_BINS, check_finite_logits, collect_logits, ece, nll
from ..nn.models import default_device
from ._common import eval_batches, label_tensor

__all__ = [
    "TEMPERATURES_FILE",
    "CalibrationResult",
    "calibrate",
    "fit_temperature",
    "read_temperatures",
    "write_temperatures",
]

# the file format and its reader live with the merge side, which reads it when exporting per-task models
FORMAT = TEMPERATURES_FORMAT


@dataclass
class CalibrationResult:
    """The fitted temperature and the held-out NLL and ECE before (T = 1) and after."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


#: T is searched in [1/100, 100]. Separable validation data (every example right) has NLL → 0 as
#: T → 0 with no finite minimum; the bound turns that into T = 0.01 instead of an overflow.
T_BOUNDS = (1e-2, 1e2)


def fit_temperature(logits: Tensor, labels: Tensor, *, tol: float = 1e-6) -> CalibrationResult:
    """Fit T minimising mean NLL(softmax(logits / T), labels) over T in :data:`T_BOUNDS`.

    The NLL is convex in 1/T, hence unimodal in s = log T, so a golden-section search over s finds
    the minimum to ``tol`` (in s) without gradients, line searches or any risk of diverging to
    T → 0 (an earlier L-BFGS version overflowed on small, separable validation splits).
    """
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    check_finite_logits(logits, "calibration")  # NaN logits would give T = 1 with NaN metrics
    before = nll(logits, labels)  # also checks shapes and label range

    def f(s: float) -> float:
        return float(F.cross_entropy(logits / math.exp(s), labels))

    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    t = math.exp((lo + hi) / 2)
    after = nll(logits, labels, temperature=t)
    if not after <= before:  # T = 1 is kept if the search were ever worse
        t, after = 1.0, before
    return CalibrationResult(
        temperature=t,
        nll_before=before,
        nll_after=after,
        ece_before=ece(logits, labels),
        ece_after=ece(logits, labels, temperature=t),
        n=int(labels.shape[0]),
    )


def calibrate(
    model: nn.Module,
    state: Mapping[str, Tensor] | None,
    data: Any,
    labels: Any = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> CalibrationResult:
    """Fit the temperature T of one task head: ``softmax(z / T)`` has minimal NLL on ``(data, labels)``.

    Args:
        model: a module whose forward returns logits (not modified).
        state: the weights to evaluate (merged shared weights + this task's head); ``None``: the model's own.
        data: labeled held-out inputs (an :class:`~distac.nn.data.Inputs`, a tensor, or an iterable of batches).
        labels: the labels in the same order (a tensor or per-batch tensors); ``None`` when ``data`` is an
            :class:`~distac.nn.data.Inputs` with labels.
        batch_size: evaluation batch size.
        device: where to run (default CUDA when available); the model is moved back afterwards.

    Returns:
        A :class:`CalibrationResult`: ``.temperature`` and the NLL and ECE before (T = 1) and after.

    Example:
        >>> T = calibrate(model, merged_with_head_a, x_val, y_val).temperature  # doctest: +SKIP
    """
    dev = default_device(device)
    # nn.Module.to moves the caller's parameters in place: put them back afterwards (the model is
    # documented as not modified).
    home = next(iter(model.parameters()), torch.empty(0)).device
    model.to(dev)
    try:
        st = {k: v.to(dev) for k, v in state.items()} if state is not None else None
        source = data.source if isinstance(data, Inputs) else "calibration data"
        logits = collect_logits(model, eval_batches(data, batch_size, source), state=st, device=dev, source=source)
    finally:
        model.to(home)
    y = label_tensor(labels if labels is not None else data, "calibration labels")
    if y.shape[0] != logits.shape[0]:
        raise DistacError(f"calibration: {y.shape[0]} labels for {logits.shape[0]} examples")
    return fit_temperature(logits, y)


def write_temperatures(
    path: str | Path, results: Mapping[str, CalibrationResult], *, inputs: Iterable[str | Path] = ()
) -> Path:
    """Write (or update) ``temperatures.json``; other tasks' entries already in the file are kept.

    Args:
        path: the file, or the folder to write ``temperatures.json`` into.
        results: ``{task: CalibrationResult}``.
        inputs: files the command read; the output may not be one of them (:mod:`distac.io.atomic`).

    Returns:
        The path written.
    """
    p = Path(path)
    p = p / TEMPERATURES_FILE if p.is_dir() else p
    old: dict[str, Any] = {"temperatures": {}, "metrics": {}}
    if p.is_file():
        read_temperatures(p)  # validates the format
        old = json.loads(p.read_text(encoding="utf-8"))
    temps = {**old.get("temperatures", {}), **{k: r.temperature for k, r in results.items()}}
    metrics = {**old.get("metrics", {}), **{k: r.to_dict() for k, r in results.items()}}
    text = json.dumps({"format": FORMAT, "temperatures": temps, "metrics": metrics, "ece_bins": ECE_BINS}, indent=2)
    write_text(p, text, inputs=inputs)
    return p


def task_state(merged: Mapping[str, Tensor], head: Mapping[str, Tensor] | None, heads: Sequence[str]) -> dict:
    """The merged state with one task's head tensors swapped in (names must exist in the merged model)."""
    if not head:
        return dict(merged)
    missing = sorted(set(head) - set(merged))
    if missing:
        raise DistacError(f"head tensors {missing[:3]} are not in the merged model (head patterns {list(heads)})")
    return {**merged, **head}

"""Grid cells of methods that serve each task with its own model (EMR-Merging), not one merged state.

EMR is tuning-free: :func:`distac.emr_merge` gives θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni per task, each with
its own model's head, and task t is scored with θ̂_t only. There is no α to select (the cell records
α = 1 and a one-point validation curve), and ECE is calibrated per task on θ̂_t, as the grid does
for the merged body with task t's head.
"""

from __future__ import annotations

import distac

from .grid import CellResult, Evaluator, MethodSpec, SourceSet, StateDict, score_cell
from .vit import HEAD_PATTERN

__all__ = ["per_task_cell", "per_task_states"]


def per_task_states(evaluator: Evaluator, sources: SourceSet, *, base: StateDict) -> list[StateDict]:
    """θ̂_t of every task (EMR-Merging of ``sources.models``), in the evaluator's task order.

    Example:
        >>> states = per_task_states(evaluator, sources, base=zoo.base)  # doctest: +SKIP
        >>> evaluator.own(states[0], 0, "test")                           # doctest: +SKIP
    """
    names = [td.spec.name for td in evaluator.tasks]
    bundle = distac.emr_merge(
        base, sources.models, tasks=names, heads=[HEAD_PATTERN], device=evaluator.device, quiet=True
    )
    return [bundle.task(n) for n in names]


def per_task_cell(evaluator: Evaluator, spec: MethodSpec, sources: SourceSet, *, base: StateDict) -> CellResult:
    """The grid cell of a per-task method: task t's accuracy and ECE from θ̂_t on task t, α = 1.

    Example:
        >>> cell = per_task_cell(evaluator, spec, sources, base=zoo.base)  # doctest: +SKIP
        >>> cell.mean_norm                                                 # doctest: +SKIP
    """
    states = per_task_states(evaluator, sources, base=base)
    val_logits = [evaluator.own_logits(sd, i, "val") for i, sd in enumerate(states)]
    val_norm = evaluator.normalised(evaluator.accuracy_of(val_logits, "val"), "val")
    test_logits = [evaluator.own_logits(sd, i, "test") for i, sd in enumerate(states)]
    return score_cell(
        evaluator, spec, sources, val_logits, test_logits, alpha=1.0, curve=[(1.0, sum(val_norm) / len(val_norm))]
    )

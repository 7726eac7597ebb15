"""The experiment grid: merge method × zoo setting × source models, α selected on validation.

For every cell the merged body is evaluated with each task's own head (heads are task-specific,
``heads=[HEAD_PATTERN]`` to :func:`distac.merge`). The scaling coefficient α is chosen on the
validation split by mean *normalised* accuracy (merged accuracy ÷ the task's ideal fine-tuned
accuracy, the protocol of the DisTaC/TSV/TALL code), then the test split is reported, with ECE before
and after per-task temperature scaling of the merged model (:func:`distac.calibrate`).

Calls into the rest of distac are limited to ``distac.merge``, ``distac.condition``,
``distac.conditioning.fit_temperature`` (what ``distac.calibrate`` fits, here on validation logits the grid has
already computed), ``distac.emr_merge`` (in :mod:`.per_task`) and ``distac.stats.fisher_diagonal``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

import distac
from distac.conditioning import fit_temperature
from distac.errors import DistacError
from distac.nn.evaluate import ece
from distac.nn.models import default_device

from .profile import Profile
from .tasks import TaskData
from .train import predict_logits
from .vit import HEAD_PATTERN, TinyViT, set_head
from .zoo import Zoo

__all__ = [
    "METHOD_SPECS",
    "SOURCES",
    "CellResult",
    "Evaluator",
    "MethodSpec",
    "SourceSet",
    "alpha_sweep",
    "available_specs",
    "profile_specs",
    "run_cell",
    "score_cell",
    "select_alpha",
]

StateDict = dict[str, Tensor]
SOURCES = ("raw", "rescaled", "distac")
# distac.calibrate's default batch size: the validation split is evaluated in batches of this size,
# so its logits are the ones calibrate would compute and the grid fits temperatures on them directly
# (one forward pass per task instead of two; the test split keeps predict_logits' default chunk).
CALIBRATION_BATCH = 256


@dataclass(frozen=True)
class MethodSpec:
    """How the grid runs one distac method.

    ``grid``: ``"sum"`` for methods whose α multiplies a *sum* of task vectors (TA, Consensus TA,
    gradient matching: α ∈ (0, 1], DisTaC/TALL code) or ``"mean"`` for methods whose merged vector is
    already on a single model's scale (TIES disjoint mean, TSV-M, Iso, Fisher average: α up to 3, the
    TSV/Iso code's range, which also covers official TIES's 0.8–2.5).
    ``linear``: the merge is θ_0 + α·Δ with Δ independent of α, so Δ is computed once and α applied
    by the grid (exact; saves one merge per α). Methods with no ``scale`` parameter (Fisher) get α the
    same way, as a final multiplier of the merged task vector. ``grid="one"``: α = 1 only (no search).
    ``per_task``: the method gives one model per task, not one merged state (EMR; run by
    :func:`distac.reproduce.per_task.per_task_cell`, with no α).
    """

    method: str
    label: str
    grid: str
    params: Mapping[str, Any] = field(default_factory=dict)
    fisher: bool = False
    base_fisher: bool = False
    linear: bool = True
    per_task: bool = False


METHOD_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("task_arithmetic", "TA", "sum"),
    # official TIES top-20% (k=20), disjoint mean; the DisTaC repo keeps 10%
    MethodSpec("ties", "TIES", "mean", {"density": 0.2}),
    # TALL λ fixed at 0.4 (the middle of the official per-task search {0.2..0.6}), k = 2
    MethodSpec("consensus_ta", "Consensus TA", "sum", {"k": 2, "tall_lambda": 0.4}),
    MethodSpec("tsv_m", "TSV-M", "mean"),
    MethodSpec("iso_c", "Iso-C", "mean"),
    MethodSpec("iso_cts", "Iso-CTS", "mean"),
    # multi-task merging has no target model, so the floor goes to every model (FusionBench's
    # convention): a parameter no task has curvature on (e.g. the embedding of a word none of the
    # Fisher samples contains, half of MiniLM's entries) takes the mean of the τ_t, not τ of task 0.
    MethodSpec("fisher", "Fisher", "mean", {"favor_target_model": False}, fisher=True),
    # H_t and H_0 on the sum scale; α enters the formula non-linearly, so every α is a merge
    MethodSpec("gradient_matching", "Gradient matching", "sum", fisher=True, base_fisher=True, linear=False),
    # WUDI has no α: the paper (and the official code) evaluate θ_0 + τ_m as is, so it gets the
    # one-point grid α = 1 rather than a search the method does not have (α, when searched, would
    # be a final multiplier of τ_m). Official defaults: 300 Adam steps at lr 1e-5 on the linear
    # weights inside numbered blocks (this ViT's "blocks.<i>.{qkv,proj,fc1,fc2}.weight").
    MethodSpec("wudi", "WUDI", "one"),
    # EMR: one model per task (shared vector × task mask × task rescaler), each scored on its own
    # task; tuning-free, so no α either.
    MethodSpec("emr", "EMR", "one", per_task=True),
)


def available_specs(names: Iterable[str] | None = None) -> list[MethodSpec]:
    """The specs whose method is registered in ``distac.METHODS``, plus the per-task ones (optionally only ``names``).

    Per-task methods are not merge methods of ``distac.METHODS`` (EMR is ``distac.emr_merge``).
    """
    wanted = set(names) if names is not None else None
    return [
        s for s in METHOD_SPECS if (s.per_task or s.method in distac.METHODS) and (wanted is None or s.method in wanted)
    ]


def profile_specs(profile: Profile) -> list[MethodSpec]:
    """The grid's specs for a profile: its ``methods`` (:func:`available_specs`) with its ``method_params``."""
    overrides = {m: dict(kv) for m, kv in profile.method_params}
    unknown = sorted(set(overrides) - {s.method for s in METHOD_SPECS})
    if unknown:
        raise DistacError(f"profile '{profile.name}': method_params names unknown methods {unknown}")
    return [replace(s, params={**s.params, **overrides.get(s.method, {})}) for s in available_specs(profile.methods)]


class Evaluator:
    """Evaluates a merged body on every task with that task's own head.

    ``device`` (default: CUDA when available) is where the evaluation model lives and where the grid
    merges, calibrates, conditions and takes Fishers; logits come back on the CPU.
    """

    def __init__(self, zoo: Zoo, device: torch.device | str | None = None) -> None:
        self.zoo = zoo
        self.device = default_device(device)
        self.model = zoo.model().to(self.device)
        self.tasks = zoo.tasks
        self.ideal_val = [self.own(sd, i, "val") for i, sd in enumerate(zoo.setting("ideal"))]
        self.ideal_test = [zoo.own_acc[f"{td.spec.name}__ideal"] for td in self.tasks]

    def logits(self, state: StateDict, heads_from: Sequence[StateDict], split: str) -> list[Tensor]:
        """Per-task logits of ``state``'s body with task t's head taken from ``heads_from[t]``."""
        self.model.load_state_dict(state)
        out = []
        for td, src in zip(self.tasks, heads_from, strict=True):
            name = td.spec.name
            w = self.model.heads[name].weight
            with torch.no_grad():
                w.copy_(src[f"heads.{name}.weight"])
            out.append(predict_logits(self.model, name, getattr(td, split).x, **_chunk(split)))
        return out

    def accuracy(self, state: StateDict, heads_from: Sequence[StateDict], split: str) -> list[float]:
        """Per-task accuracy of ``state``'s body with each task's head from ``heads_from``."""
        return self.accuracy_of(self.logits(state, heads_from, split), split)

    def accuracy_of(self, logits: Sequence[Tensor], split: str) -> list[float]:
        """Per-task accuracy of per-task ``logits`` on ``split``."""
        ys = [getattr(td, split).y for td in self.tasks]
        return [float((z.argmax(-1) == y).float().mean()) for z, y in zip(logits, ys, strict=True)]

    def own_logits(self, state: StateDict, i: int, split: str) -> Tensor:
        """Logits of a single model (body and head from ``state``) on task ``i``'s ``split``."""
        td = self.tasks[i]
        return predict_logits(self.task_model(state, td.spec.name), td.spec.name, getattr(td, split).x, **_chunk(split))

    def own(self, state: StateDict, i: int, split: str) -> float:
        """Accuracy of a single model (body and head from ``state``) on task ``i`` only."""
        z = self.own_logits(state, i, split)
        return float((z.argmax(-1) == getattr(self.tasks[i], split).y).float().mean())

    def normalised(self, acc: Sequence[float], split: str) -> list[float]:
        """Merged accuracy ÷ the ideal fine-tuned model's accuracy on the same split, per task."""
        ref = self.ideal_val if split == "val" else self.ideal_test
        for td, r in zip(self.tasks, ref, strict=True):
            if r <= 0:
                raise DistacError(
                    f"task '{td.spec.name}': its ideal fine-tuned model has accuracy 0 on the {split} split, so "
                    "normalised accuracy is undefined; fine-tune longer or use a larger split"
                )
        return [a / r for a, r in zip(acc, ref, strict=True)]

    def task_model(self, state: StateDict, task: str) -> TinyViT:
        """The evaluator's model loaded with ``state`` and set to ``task``'s head (shared instance)."""
        self.model.load_state_dict(state)
        return set_head(self.model, task)


def _chunk(split: str) -> dict[str, int]:
    """predict_logits' batch size for a split: :data:`CALIBRATION_BATCH` for validation, its default otherwise."""
    return {"chunk": CALIBRATION_BATCH} if split == "val" else {}


@dataclass
class SourceSet:
    """The 8 source models of one (setting, source) pair, plus what the grid needs about them."""

    setting: str
    source: str
    models: list[StateDict]
    flagged: list[str]  # tasks whose model was conditioned / rescaled
    norms: list[float]
    fishers: list[StateDict] | None = None
    own_val: list[float] = field(default_factory=list)


@dataclass
class CellResult:
    """One grid cell: method × setting × source, at the α selected on validation."""

    method: str
    label: str
    setting: str
    source: str
    alpha: float
    val_norm: float
    test_acc: list[float]
    test_norm: list[float]
    ece_before: list[float]
    ece_after: list[float]
    temperatures: list[float]
    curve: list[tuple[float, float]]  # (α, mean val normalised accuracy) as searched
    test_logits: list[Tensor] = field(default_factory=list, repr=False)  # per task (reliability diagrams)

    @property
    def mean_acc(self) -> float:
        return 100 * sum(self.test_acc) / len(self.test_acc)

    @property
    def mean_norm(self) -> float:
        return 100 * sum(self.test_norm) / len(self.test_norm)


def grid_for(spec: MethodSpec, profile: Profile) -> tuple[float, ...]:
    """The α grid of a method family (see :class:`MethodSpec`)."""
    if spec.grid == "one":
        return (1.0,)
    return profile.grid_linear if spec.grid == "sum" else profile.grid_spectral


def merge_fn(
    spec: MethodSpec,
    base: StateDict,
    sources: SourceSet,
    base_fisher: StateDict | None,
    device: torch.device | str | None = None,
) -> Callable[[float], StateDict]:
    """α -> merged state dict (computed on ``device``). Linear methods merge once at α = 1 and interpolate θ_0 + α·Δ."""
    kwargs: dict[str, Any] = dict(spec.params, device=device)
    if spec.fisher:
        kwargs["fishers"] = sources.fishers
    if spec.base_fisher and base_fisher is not None:
        kwargs["base_fisher"] = base_fisher
    if not spec.linear:
        return lambda a: distac.merge(base, sources.models, spec.method, heads=[HEAD_PATTERN], scale=a, **kwargs)
    unit = distac.merge(base, sources.models, spec.method, heads=[HEAD_PATTERN], **kwargs)
    delta = {k: unit[k] - base[k] for k in base if base[k].is_floating_point()}

    def at(a: float) -> StateDict:
        return {k: (base[k] + a * delta[k]) if k in delta else base[k] for k in base}

    return at


def select_alpha(
    evaluator: Evaluator,
    merged_at: Callable[[float], StateDict],
    heads_from: Sequence[StateDict],
    grid: Sequence[float],
    *,
    patience: int = 3,
) -> tuple[float, list[tuple[float, float]], list[Tensor]]:
    """Pick α on validation by mean normalised accuracy, with early stopping.

    The α values are tried in increasing order and the search stops after ``patience`` consecutive
    values without a gain (the Iso-merging code's rule, applied to every method to fit the CPU
    budget; the curve of a method is unimodal in α in practice). Ties keep the smaller α.
    Returns the α, the searched curve and the per-task validation logits at that α (what the
    cell's temperatures are fitted on).
    """
    best_a, best, since, curve = grid[0], -1.0, 0, []
    best_logits: list[Tensor] = []
    for a in grid:
        logits = evaluator.logits(merged_at(a), heads_from, "val")
        acc = evaluator.accuracy_of(logits, "val")
        score = sum(evaluator.normalised(acc, "val")) / len(acc)
        curve.append((a, score))
        if score > best:
            best_a, best, since, best_logits = a, score, 0, logits
        else:
            since += 1
            if since >= patience:
                break
    return best_a, curve, best_logits


def run_cell(
    evaluator: Evaluator,
    spec: MethodSpec,
    sources: SourceSet,
    *,
    profile: Profile,
    base: StateDict,
    base_fisher: StateDict | None,
) -> CellResult:
    """Select α on val, evaluate on test, calibrate per task on val and report ECE before/after."""
    if spec.per_task:
        from .per_task import per_task_cell  # it builds on this module's evaluator and scoring

        return per_task_cell(evaluator, spec, sources, base=base)
    merged_at = merge_fn(spec, base, sources, base_fisher, evaluator.device)
    alpha, curve, val_logits = select_alpha(evaluator, merged_at, sources.models, grid_for(spec, profile))
    test_logits = evaluator.logits(merged_at(alpha), sources.models, "test")
    return score_cell(evaluator, spec, sources, val_logits, test_logits, alpha=alpha, curve=curve)


def score_cell(
    evaluator: Evaluator,
    spec: MethodSpec,
    sources: SourceSet,
    val_logits: Sequence[Tensor],
    test_logits: list[Tensor],
    *,
    alpha: float,
    curve: list[tuple[float, float]],
) -> CellResult:
    """The cell of per-task test logits: accuracy, and ECE before/after temperature scaling fitted on val.

    ``val_logits[t]`` and ``test_logits[t]`` are the logits of the model task t is served by (the
    merged body with task t's head, or EMR's task t model); T_t is :func:`~distac.conditioning.fit_temperature`
    on ``val_logits[t]``, i.e. what ``distac.calibrate`` of that model on the validation split gives
    (its logits in :data:`CALIBRATION_BATCH` batches), without a second forward pass.
    """
    tasks = evaluator.tasks
    acc = [float((z.argmax(-1) == td.test.y).float().mean()) for z, td in zip(test_logits, tasks, strict=True)]
    temps, before, after = [], [], []
    for td, z, zv in zip(tasks, test_logits, val_logits, strict=True):
        name = td.spec.name
        try:
            t = fit_temperature(zv, td.val.y).temperature
        except RuntimeError as e:
            # a failed calibration (e.g. an empty or degenerate validation split) is recorded as NaN,
            # visible in the tables, rather than aborting the whole grid.
            warnings.warn(
                f"{spec.method}/{sources.setting}/{sources.source}: calibrating task '{name}' failed: {e}", stacklevel=2
            )
            t = math.nan
        temps.append(t)
        before.append(ece(z, td.test.y))
        after.append(ece(z, td.test.y, temperature=t) if math.isfinite(t) else math.nan)
    return CellResult(
        spec.method,
        spec.label,
        sources.setting,
        sources.source,
        alpha,
        max(s for _, s in curve),
        acc,
        evaluator.normalised(acc, "test"),
        before,
        after,
        temps,
        curve,
        test_logits,
    )


def alpha_sweep(
    evaluator: Evaluator,
    spec: MethodSpec,
    sources: SourceSet,
    alphas: Sequence[float],
    *,
    base: StateDict,
    base_fisher: StateDict | None,
) -> list[tuple[float, float, float]]:
    """(α, mean test accuracy, mean test normalised accuracy) for every α: the sensitivity curve."""
    merged_at = merge_fn(spec, base, sources, base_fisher, evaluator.device)
    out = []
    for a in alphas:
        acc = evaluator.accuracy(merged_at(a), sources.models, "test")
        out.append((a, 100 * sum(acc) / len(acc), 100 * sum(evaluator.normalised(acc, "test")) / len(acc)))
    return out


# ------------------------------------------------------------------------------------------------
# source models: raw, naive rescaling, DisTaC
# ------------------------------------------------------------------------------------------------
def own_accuracy(
    evaluator: Evaluator, sources: SourceSet, split: str = "test", *, cache: dict[tuple[int, int], float] | None = None
) -> list[float]:
    """Each source model's accuracy on its own task (how much conditioning/rescaling cost it).

    ``cache`` (keyed by the model's ``id`` and task index) lets source sets that share a model
    (an unflagged task's fine-tune is the same object in the raw, rescaled and DisTaC sets)
    evaluate it once; the caller keeps the models alive while the cache is in use.
    """
    memo: dict[tuple[int, int], float] = {} if cache is None else cache
    out = []
    for i, sd in enumerate(sources.models):
        if (id(sd), i) not in memo:
            memo[(id(sd), i)] = evaluator.own(sd, i, split)
        out.append(memo[(id(sd), i)])
    return out


def task_names(tasks: Sequence[TaskData]) -> list[str]:
    return [td.spec.name for td in tasks]

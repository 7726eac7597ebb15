"""The merge engine: one loop over tensor names, shared by in-memory and on-disk merges.

For every tensor name the engine reads the base and the N models (lazily, from any
:class:`TensorSource`), computes task vectors in fp32, calls the method's pure function, adds the
base back and hands the result to a sink. A method that needs a whole-model statistic (TIES's
global top-k) gets it from an exact pre-pass over the same sources first.

``distac.merge`` on state dicts and ``distac.merge_checkpoints`` on files both run this loop, so a
streamed merge and an in-memory one can only differ through a bug (and a test checks they don't).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import DistacError
from .methods import Method, TensorContext, get_method
from .taskvector import match_heads
from .thresholds import KthMagnitude, kth_smallest_rank

__all__ = ["DictSource", "TensorSource", "merge", "run_merge"]

StateDict = dict[str, Tensor]


class TensorSource(Protocol):
    """Read access to one checkpoint, tensor by tensor."""

    label: str

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> Tensor: ...


@dataclass
class DictSource:
    """A :class:`TensorSource` over an in-memory state dict."""

    state: Mapping[str, Tensor]
    label: str = "model"

    def keys(self) -> list[str]:
        return list(self.state.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> Tensor:
        return self.state[name]


@dataclass
class MergePlan:
    """Everything resolved before the first tensor is merged."""

    method: Method
    params: dict[str, Any]
    names: list[str]  # tensors to merge, in order
    copied: list[str]  # taken from the base unchanged (non-float buffers)
    heads: list[str]  # task-specific; kept per model, not merged
    thresholds: Tensor | None = None
    norms: dict[str, Tensor] = field(default_factory=dict)


def _check_sources(base: TensorSource, models: Sequence[TensorSource]) -> None:
    keys = base.keys()
    kset = set(keys)
    for m in models:
        mk = set(m.keys())
        if mk != kset:
            missing, extra = sorted(kset - mk), sorted(mk - kset)
            msg = []
            if missing:
                msg.append(f"missing {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
            if extra:
                msg.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
            raise DistacError(f"{m.label}: " + "; ".join(msg))
        for k in keys:
            if m.shape(k) != base.shape(k):
                raise DistacError(
                    f"{m.label}: tensor '{k}' has shape {m.shape(k)}, the base {base.label} has {base.shape(k)}"
                )
            if m.dtype(k).is_floating_point != base.dtype(k).is_floating_point:
                raise DistacError(f"{m.label}: tensor '{k}' has dtype {m.dtype(k)}, the base has {base.dtype(k)}")


def _read(src: TensorSource, name: str, device: torch.device) -> Tensor:
    t = src.get(name).to(device=device, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise DistacError(f"{src.label}: tensor '{name}' contains NaN or Inf")
    return t


def _load_deltas(
    base: TensorSource, models: Sequence[TensorSource], name: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    b = _read(base, name, device)
    deltas = torch.empty((len(models), *b.shape), dtype=torch.float32, device=device)
    for i, m in enumerate(models):
        deltas[i].copy_(_read(m, name, device))
        deltas[i].sub_(b)
    return b, deltas


def _stats_for(stats: Mapping[str, Any], name: str, device: torch.device) -> dict[str, Tensor]:
    """Per-tensor statistics: lists of sources become (N, *S) stacks, single sources a tensor."""
    out: dict[str, Tensor] = {}
    for key, src in stats.items():
        if isinstance(src, list | tuple):
            if all(name in s.keys() for s in src):
                out[key] = torch.stack([s.get(name).to(device, torch.float32) for s in src])
        elif src is not None and name in src.keys():
            out[key] = src.get(name).to(device, torch.float32)
    return out


def plan_merge(
    base: TensorSource,
    models: Sequence[TensorSource],
    method: str | Method,
    params: Mapping[str, Any],
    *,
    head_patterns: Sequence[str] | None = None,
    stats: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterator[str], str], Iterator[str]] | None = None,
) -> MergePlan:
    """Resolve the method and parameters, check the inputs, and run the exact pre-pass."""
    m = get_method(method) if isinstance(method, str) else method
    resolved = m.resolve(params, len(models))
    _check_sources(base, models)
    device = torch.device(device)
    heads = match_heads(base.keys(), head_patterns)
    names, copied = [], []
    for k in base.keys():
        if k in heads:
            continue
        (names if base.dtype(k).is_floating_point else copied).append(k)
    plan = MergePlan(m, resolved, names, copied, sorted(heads, key=base.keys().index))
    pre = m.plan_prepass(resolved, len(models))
    if pre is None:
        return plan
    stats = stats or {}
    it: Callable[[Iterator[str], str], Iterator[str]] = progress or (lambda x, _d: x)
    if pre.density is not None:
        total = sum(int(torch.Size(base.shape(k)).numel()) for k in names)
        sel = KthMagnitude([kth_smallest_rank(total, d) for d in pre.density])
        for pass_ in (1, 2):
            if pass_ == 2 and not sel.needs_second_pass:
                break
            for k in it(iter(names), f"pre-pass {pass_}/2"):
                b, deltas = _load_deltas(base, models, k, device)
                ctx = TensorContext(k, tuple(b.shape), stats=_stats_for(stats, k, device))
                x = pre.transform(b, deltas, ctx) if pre.transform else deltas
                for i in range(len(models)):
                    sel.add(i, x[i].cpu())
            if pass_ == 1:
                sel.next_pass()
        plan.thresholds = sel.result().to(device)
    for stat in pre.stat_norms:
        srcs = stats.get(stat)
        if not srcs:
            raise DistacError(f"method '{m.name}' needs '{stat}' statistics for every model")
        sq = torch.zeros(len(srcs), dtype=torch.float64)
        for k in names:
            for i, s in enumerate(srcs):
                if k in s.keys():
                    sq[i] += s.get(k).double().pow(2).sum()
        plan.norms[stat] = sq.sqrt().float().to(device)
    return plan


def merge_one(
    plan: MergePlan,
    base: TensorSource,
    models: Sequence[TensorSource],
    name: str,
    *,
    stats: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Merge one tensor (whole) and return it in fp32 (the writer casts)."""
    device = torch.device(device)
    b, deltas = _load_deltas(base, models, name, device)
    ctx = TensorContext(
        name, tuple(b.shape), 0, plan.thresholds, _stats_for(stats or {}, name, device), plan.norms
    )
    try:
        out = plan.method(b, deltas, ctx=ctx, **plan.params)
    except DistacError:
        raise
    except (ValueError, RuntimeError) as e:
        raise DistacError(f"method '{plan.method.name}' failed on tensor '{name}': {e}") from e
    # never b.add_(): for fp32 sources, b may be the caller's own tensor.
    return b + out


def run_merge(
    base: TensorSource,
    models: Sequence[TensorSource],
    method: str | Method,
    params: Mapping[str, Any],
    sink: Callable[[str, Tensor], None],
    *,
    head_patterns: Sequence[str] | None = None,
    stats: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> MergePlan:
    """Plan, pre-pass, then merge every tensor in the base's order and pass it to ``sink``.

    Head tensors are not merged; the caller decides where each model's head goes (the base's head
    is sent to ``sink`` so the output is a complete model).
    """
    plan = plan_merge(base, models, method, params, head_patterns=head_patterns, stats=stats, device=device)
    merged = set(plan.names)
    for k in base.keys():
        if k in merged:
            sink(k, merge_one(plan, base, models, k, stats=stats, device=device))
        else:
            sink(k, base.get(k))
    return plan


def merge(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    method: str = "ties",
    *,
    heads: Sequence[str] | None = None,
    fishers: Sequence[Mapping[str, Tensor]] | None = None,
    base_fisher: Mapping[str, Tensor] | None = None,
    grams: Sequence[Mapping[str, Tensor]] | None = None,
    device: torch.device | str | None = None,
    **params: Any,
) -> StateDict:
    """Merge in-memory state dicts with any registered method.

    Args:
        base: the pre-trained state dict θ_0.
        models: the fine-tuned state dicts θ_1..θ_N (same keys and shapes as ``base``).
        method: a name from ``distac.METHODS`` (``distac methods`` lists them).
        heads: name patterns of task-specific tensors (globs, or ``re:`` regexes). They are not
            merged; the result holds the base's values for them (see :func:`distac.export_task_models`).
        fishers, base_fisher, grams: statistics for the curvature methods, one dict per model.
        device: where to compute (default: CUDA when available, else CPU).
        **params: the method's hyperparameters (``scale``, ``density``, ``weights``, ...).

    Returns:
        The merged state dict, in the base's key order and dtypes.
    """
    if not models:
        raise DistacError("merge needs at least one fine-tuned model")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stats: dict[str, Any] = {}
    if fishers is not None:
        stats["fisher"] = [DictSource(f, f"fisher of model {i}") for i, f in enumerate(fishers)]
    if base_fisher is not None:
        stats["base_fisher"] = DictSource(base_fisher, "base fisher")
    if grams is not None:
        stats["gram"] = [DictSource(g, f"gram of model {i}") for i, g in enumerate(grams)]
    out: StateDict = {}
    dtypes = {k: v.dtype for k, v in base.items()}

    def sink(name: str, t: Tensor) -> None:
        out[name] = t.to(device=base[name].device, dtype=dtypes[name])

    run_merge(
        DictSource(base, "base"),
        [DictSource(m, f"model {i}") for i, m in enumerate(models)],
        method, params, sink, head_patterns=heads, stats=stats, device=dev,
    )
    return out

"""The merge engine: one streaming loop over tensor names, shared by in-memory and on-disk merges.

For every tensor name the engine reads the base and the N models (lazily, from any
:class:`~distac.tensors.TensorSource`), computes task vectors in fp32, calls the method's pure
function, adds the base back and hands the result to a sink. A method that needs a whole-model
statistic (TIES's global top-k) gets it from an exact pre-pass over the same sources first
(:mod:`distac.merging.prepass`).

``distac.merge`` on state dicts and ``distac.merge_checkpoints`` on files both run this loop, so a
streamed merge and an in-memory one can only differ through a bug (and a test checks they don't).

Memory and speed:

* one *piece* (a whole tensor, or a range of its rows) is loaded into a single ``(N+1, rows, ...)``
  fp32 buffer (:mod:`distac.merging.pieces`);
* tensors whose buffer would exceed ``chunk_bytes`` are split by rows when the method says it is
  element-wise (``Method.is_chunkable``); ``ctx.offset`` is the flat element offset of the piece,
  so counter-based randomness (DARE) gives the same result chunked or not;
* a background thread reads the next piece while the current one is merged (I/O overlapped with
  compute). At most two pieces are alive at once: the one being merged and the one prefetched;
* a method whose k-th magnitudes are *per tensor* (``Prepass(scope="tensor")``, TIES
  ``scope: tensor``) is row-chunked too: before the pieces of a split tensor are merged, the
  engine reads them twice more for that tensor's exact two-pass radix selection and passes the
  result as ``ctx.thresholds``. A tensor that fits one piece is merged whole and the method ranks
  it itself (``kthvalue``); both give the same bits, so memory stays at a few pieces whatever the
  largest tensor.

Parameters that vary by tensor (mergekit's layer gradients and ``filter`` lists) come as a
``params`` mapping with a ``for_tensors(names)`` method (:class:`distac.merging.mergekit.MergekitParams`):
the engine resolves and checks every tensor's values before the first is merged, and passes each
tensor its own. Plain parameters (the common case) take no per-tensor step at all. With varying
parameters a per-tensor pre-pass (``scope="tensor"``) is left to the method on whole tensors, and a
global one must have one density for the whole model.

Without a base model (mergekit's ``linear``), the reference is :class:`ZeroReference`: zero
weights, so the task vectors are the full weights and ``base + merged`` is the merged weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import DistacError
from ..methods import Method, TensorContext, get_method
from ..methods.base import Prepass, missing_statistic
from ..nn.models import default_device
from ..taskvector import match_heads
from ..tensors import DictSource, TensorSource, check_compatible
from .pieces import BufferPool, Loaded, Work, load_piece, offset_of, split_rows, stream
from .prepass import TensorKth, global_kth_magnitudes, statistic_norms

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MergePlan",
    "ZeroReference",
    "check_finite_output",
    "merge",
    "plan_merge",
    "run_merge",
]

StateDict = dict[str, Tensor]
Progress = Callable[[Iterator[str], str], Iterator[str]]

#: default budget for one piece's (N+1) fp32 input copies; larger tensors are row-chunked when the
#: method allows it. Two pieces are alive at once (prefetch), so the working set is a few times
#: this, far inside "(N+1) × largest tensor + 512 MB". Small pieces are also *faster*: they stay
#: in cache between the read, the subtraction and the method's passes. On a 235 MB bf16
#: checkpoint (N=2, task arithmetic) 16 MiB pieces gave 330 MB peak RSS against 1.2 GB with
#: 256 MiB pieces, and no slower (anything from 8 to 32 MiB performs alike).
DEFAULT_CHUNK_BYTES = 16 * 2**20


@dataclass
class MergePlan:
    """Everything resolved before the first tensor is merged."""

    method: Method
    params: dict[str, Any]
    names: list[str]  # tensors to merge, in order
    copied: list[str]  # taken from the base unchanged (non-float buffers)
    heads: list[str]  # task-specific; kept per model, not merged
    #: each model's k-th smallest magnitude over the whole model (``Prepass(scope="global")``)
    kth_magnitudes: Tensor | None = None
    norms: dict[str, Tensor] = field(default_factory=dict)
    chunkable: bool = False
    #: the method's pre-pass when its scope is "tensor": run during the merge, per split tensor
    tensor_prepass: Prepass | None = None
    #: each tensor's resolved parameters when they vary by tensor (mergekit gradients and filters);
    #: None in the common case, where ``params`` serves every tensor
    per_tensor: dict[str, dict[str, Any]] | None = None


class ZeroReference:
    """Zero weights laid out like ``source``: the reference of a merge without a base model.

    mergekit's ``linear`` (and other base-free methods) combine the models' full weights; with
    this reference the engine's task vectors *are* the full weights and the result is the merged
    weights, exactly. Non-float tensors (buffers) are ``source``'s own; everything else a source
    has (keys, shapes, dtypes, sizes, files) is ``source``'s.

    Example:
        >>> ref = ZeroReference(DictSource({"w": torch.ones(2)}, "a"))
        >>> ref.get("w").tolist(), ref.keys()
        ([0.0, 0.0], ['w'])
    """

    def __init__(self, source: TensorSource):
        self.source = source
        self.label = f"zero weights shaped like {source.label}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def get(self, name: str) -> Tensor:
        if not self.source.dtype(name).is_floating_point:
            return self.source.get(name)
        return torch.zeros(self.source.shape(name), dtype=self.source.dtype(name))

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        if not self.source.dtype(name).is_floating_point:
            return self.source.get_rows(name, start, stop)
        shape = self.source.shape(name)
        return torch.zeros((max(0, min(stop, shape[0]) - start), *shape[1:]), dtype=self.source.dtype(name))

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        if not self.source.dtype(name).is_floating_point:
            return self.source.read_into(name, rows, out)
        out.zero_()
        return 0


def _pieces(plan: MergePlan, base: TensorSource, n_inputs: int, chunk_bytes: int | None) -> list[Work]:
    budget = chunk_bytes if plan.chunkable else None
    out = []
    for k in plan.names:
        ranges = split_rows(base.shape(k), n_inputs, budget)
        out.extend([Work(k)] if ranges is None else [Work(k, r) for r in ranges])
    return out


def _resolve(
    base: TensorSource,
    models: Sequence[TensorSource],
    method: str | Method,
    params: Mapping[str, Any],
    stats: Mapping[str, Any],
    head_patterns: Sequence[str] | None,
) -> MergePlan:
    """The method, its validated parameters, the inputs checked and the tensors sorted into merged/copied/heads."""
    m = get_method(method) if isinstance(method, str) else method
    resolved = m.resolve(params, len(models))
    for stat in m.stats:  # "name?" is optional
        if not stat.endswith("?") and not stats.get(stat):
            raise missing_statistic(m.name, stat)
    for model in models:
        check_compatible(base, model, base_label=f"the base {base.label}", buffers_from_base=True)
    heads = match_heads(base.keys(), head_patterns)
    names: list[str] = []
    copied: list[str] = []
    for k in base.keys():
        if k in heads:
            continue
        (names if base.dtype(k).is_floating_point else copied).append(k)
    plan = MergePlan(m, resolved, names, copied, sorted(heads, key=base.keys().index))
    plan.per_tensor = _per_tensor(m, params, names, len(models))
    plan.chunkable = all(m.is_chunkable(p) for p in (plan.per_tensor or {"": resolved}).values())
    return plan


def _per_tensor(m: Method, params: Mapping[str, Any], names: list[str], n: int) -> dict[str, dict[str, Any]] | None:
    """Each tensor's resolved parameters, when ``params`` varies by tensor (it has ``for_tensors``).

    Every tensor's values are checked here, before anything is written. Plain parameters (the
    common case) return None and cost nothing per tensor.
    """
    for_tensors = getattr(params, "for_tensors", None)
    if for_tensors is None:
        return None
    raw = for_tensors(names)
    if raw is None:
        return None
    out = {}
    for k in names:
        try:
            out[k] = m.resolve(raw[k], n)
        except DistacError as e:
            raise DistacError(f"tensor '{k}': {e}") from None
    return out


def _varying_prepass(plan: MergePlan, pre: Prepass, n: int) -> Prepass | None:
    """The pre-pass of a merge whose parameters vary by tensor.

    Per-tensor thresholds (``scope="tensor"``) are ranked by the method on whole tensors (the
    engine does not split them); global thresholds need one density for the whole model.
    """
    assert plan.per_tensor is not None
    if pre.scope == "tensor":
        plan.chunkable = False
        return None
    plans = (plan.method.plan_prepass(q, n) for q in plan.per_tensor.values())
    densities = {tuple(p.density or ()) for p in plans if p is not None}
    if len(densities) > 1:
        raise DistacError(
            f"method '{plan.method.name}': the density varies by tensor, but scope 'global' ranks the whole model "
            "with one density; set scope: tensor (as mergekit does) or give one density"
        )
    return pre


def plan_merge(
    base: TensorSource,
    models: Sequence[TensorSource],
    method: str | Method,
    params: Mapping[str, Any],
    *,
    head_patterns: Sequence[str] | None = None,
    stats: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    chunk_bytes: int | None = None,
    prefetch: bool = False,
) -> MergePlan:
    """Resolve the method and parameters, check the inputs, and run the exact global pre-pass.

    Args:
        base, models: the sources to merge (same keys and shapes).
        method, params: a registered method (or its name) and the user's parameters.
        head_patterns: task-specific tensors, not merged (globs or ``re:`` regexes).
        stats: statistics sources by name (``{"fisher": [..N], "base_fisher": src, "gram": [..N]}``).
        device: where the pre-pass computes.
        progress: wraps the pre-pass loops (progress bars).
        chunk_bytes, prefetch: as for :func:`run_merge`; the pre-pass reads the pieces the merge will.

    Returns:
        The :class:`MergePlan`.
    """
    stats = stats or {}
    device = torch.device(device)
    plan = _resolve(base, models, method, params, stats, head_patterns)
    pre = plan.method.plan_prepass(plan.params, len(models))
    if pre is not None and plan.per_tensor is not None:
        pre = _varying_prepass(plan, pre, len(models))
    if pre is None:
        return plan
    if pre.scope == "tensor":  # each split tensor's k-th magnitudes, computed during the merge
        plan.tensor_prepass = pre
        return plan
    if pre.density is not None:
        pieces = _pieces(plan, base, len(models) + 1, chunk_bytes)
        plan.kth_magnitudes = global_kth_magnitudes(
            pre, base, models, pieces, stats, device, prefetch=prefetch, progress=progress
        )
    for stat in pre.stat_norms:
        plan.norms[stat] = statistic_norms(plan.names, stat, stats.get(stat), plan.method.name, device)
    return plan


def _merge_piece(plan: MergePlan, base: TensorSource, item: Loaded, kth: Tensor | None) -> Tensor:
    """base + the method's merged task vector for one piece. Errors other than DistacError are bugs."""
    w = item.work
    ctx = TensorContext(w.name, tuple(base.shape(w.name)), offset_of(base, w), kth, item.stats, plan.norms)
    assert item.deltas is not None
    params = plan.params if plan.per_tensor is None else plan.per_tensor[w.name]
    return item.base + plan.method(item.base, item.deltas, ctx=ctx, **params)


def check_finite_output(name: str, t: Tensor, dtype: torch.dtype, where: str = "") -> None:
    """Refuse a tensor about to be written that holds NaN/Inf, or values that overflow ``dtype``.

    A merge that writes NaN (NaN/Inf weights, a huge Fisher) or casts 70 000 to float16 (inf)
    produces a broken model with exit code 0; this stops it naming the tensor. Callers skip it
    when the user opted in (``allow_nonfinite``).

    Args:
        name: the tensor's name, for the message.
        t: the values (any float dtype; other dtypes are not checked).
        dtype: the dtype the tensor will be written in.
        where: prefix for the message (a file), or "".

    Example:
        >>> check_finite_output("w", torch.tensor([6e4]), torch.float16)  # fits: returns None
        >>> check_finite_output("w", torch.tensor([7e4]), torch.float16)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        distac.errors.DistacError: tensor 'w': values up to 7e+04 overflow torch.float16 ...
    """
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    peak = max(-float(lo), float(hi))  # NaN anywhere makes both NaN
    prefix = f"{where}: " if where else ""
    optin = "set allow_nonfinite: true (--allow-nonfinite) to write them anyway"
    if not math.isfinite(peak):
        raise DistacError(
            f"{prefix}tensor '{name}': the merged values hold NaN or Inf; check the method's parameters and "
            f"statistics, or {optin}"
        )
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    if peak > limit and not bool(torch.isfinite(t.to(dtype)).all()):  # rounding may still fit
        raise DistacError(
            f"{prefix}tensor '{name}': values up to {peak:.3g} overflow {dtype} (largest finite {limit:.3g}); "
            f"write float32 or bfloat16 (out_dtype), or {optin}"
        )


def _work(
    plan: MergePlan, base: TensorSource, budget: int | None, n_inputs: int, kth: TensorKth | None
) -> Iterator[Work]:
    """Every piece to read, in the base's order: copies, merge pieces, and per-tensor selection passes."""
    merged = set(plan.names)
    for k in base.keys():
        if k not in merged:
            yield Work(k, copy=True)
            continue
        ranges = split_rows(base.shape(k), n_inputs, budget)
        if ranges is None:
            yield Work(k)
            continue
        if kth is not None and kth.needs_passes(k):  # this tensor's two selection passes
            yield from (Work(k, r, prepass=1) for r in ranges)
            yield from (Work(k, r, prepass=2) for r in ranges)
        yield from (Work(k, r) for r in ranges)


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
    chunk_bytes: int | None = None,
    prefetch: bool = False,
    on_piece: Callable[[str, int, bool], None] | None = None,
    progress: Progress | None = None,
    out_dtype: Callable[[str], torch.dtype] | None = None,
    allow_nonfinite: bool = False,
) -> MergePlan:
    """Plan, pre-pass, then merge every tensor in the base's order and pass it to ``sink``.

    Head tensors are not merged; the caller decides where each model's head goes (the base's head
    is sent to ``sink`` so the output is a complete model).

    With ``chunk_bytes``, a chunkable method's large tensors arrive at ``sink`` as consecutive row
    ranges (same name, in row order); without it every call is a whole tensor. ``prefetch`` reads
    the next piece on a background thread. ``on_piece(name, bytes_read, tensor_done)`` is called
    after each piece, and ``progress(names, description)`` wraps the pre-pass loops (progress bars).
    Every piece reaching ``sink`` is checked with :func:`check_finite_output` against
    ``out_dtype(name)`` (default: the base's dtype) unless ``allow_nonfinite``.

    Returns:
        The :class:`MergePlan` (resolved parameters, pre-pass results).
    """
    stats = stats or {}
    device = torch.device(device)
    plan = plan_merge(
        base,
        models,
        method,
        params,
        head_patterns=head_patterns,
        stats=stats,
        device=device,
        chunk_bytes=chunk_bytes,
        prefetch=prefetch,
        progress=progress,
    )
    budget = chunk_bytes if plan.chunkable else None
    kth = None if plan.tensor_prepass is None else TensorKth(plan.tensor_prepass, base, device)
    pool = BufferPool(2 if prefetch else 1, device)
    for item in stream(
        _work(plan, base, budget, len(models) + 1, kth),
        lambda w: load_piece(base, models, w, stats, device, pool),
        prefetch=prefetch,
        release=lambda x: pool.give(x.buffer),
    ):
        w = item.work
        if w.prepass:
            assert kth is not None
            kth.feed(item)
            continue
        if w.copy:
            out = item.base
        else:
            piece_kth = kth.for_tensor(w) if kth is not None else None
            out = _merge_piece(plan, base, item, plan.kth_magnitudes if piece_kth is None else piece_kth)
        if not allow_nonfinite:
            check_finite_output(w.name, out, base.dtype(w.name) if out_dtype is None else out_dtype(w.name))
        sink(w.name, out)
        if on_piece is not None:
            on_piece(w.name, item.nbytes, w.rows is None or w.rows[1] == base.shape(w.name)[0])
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
    allow_nonfinite: bool = False,
    **params: Any,
) -> StateDict:
    """Merge in-memory state dicts with any registered method.

    Args:
        base: the pre-trained state dict θ_0.
        models: the fine-tuned state dicts θ_1..θ_N (same keys and shapes as ``base``).
        method: a name from ``distac.METHODS`` (``distac methods`` lists them).
        heads: name patterns of task-specific tensors (globs, or ``re:`` regexes). They are not
            merged; the result holds the base's values for them (per-task models:
            :func:`distac.merging.checkpoints.export_task_models`).
        fishers, base_fisher, grams: statistics for the curvature methods, one dict per model.
        device: where to compute (default: CUDA when available, else CPU).
        allow_nonfinite: return tensors holding NaN/Inf (or overflowing the base's dtype) instead of
            raising :class:`DistacError` naming the first one.
        **params: the method's hyperparameters (``scale``, ``density``, ``weights``, ...).

    Returns:
        The merged state dict, in the base's key order and dtypes.

    Example:
        >>> base = {"w": torch.zeros(3)}
        >>> merged = merge(base, [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 2.0, 0.0])}],
        ...                "task_arithmetic", scale=0.5)
        >>> merged["w"].tolist()
        [0.5, 1.0, 0.0]
    """
    if not models:
        raise DistacError("merge needs at least one fine-tuned model")
    dev = default_device(device)
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
        r = t.to(device=base[name].device, dtype=dtypes[name])
        # copied entries (heads, int buffers) arrive as the caller's own tensors: never hand them
        # back, or an in-place edit of the result would change the input
        out[name] = r.clone() if r is base[name] else r

    run_merge(
        DictSource(base, "base"),
        [DictSource(m, f"model {i}") for i, m in enumerate(models)],
        method,
        params,
        sink,
        head_patterns=heads,
        stats=stats,
        device=dev,
        allow_nonfinite=allow_nonfinite,
    )
    return out

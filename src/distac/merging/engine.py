"""The merge engine: one streaming loop over tensor names, shared by in-memory and on-disk merges.

For every tensor name the engine reads the base and the N models (lazily, from any
:class:`TensorSource`), computes task vectors in fp32, calls the method's pure function, adds the
base back and hands the result to a sink. A method that needs a whole-model statistic (TIES's
global top-k) gets it from an exact pre-pass over the same sources first.

``distac.merge`` on state dicts and ``distac.merge_checkpoints`` on files both run this loop, so a
streamed merge and an in-memory one can only differ through a bug (and a test checks they don't).

Memory and speed (issue #6, anchors.md §5.4):

* one *piece* (a whole tensor, or a range of its rows) is loaded into a single ``(N+1, rows, ...)``
  fp32 buffer: row 0 is the base, rows 1..N become the task vectors by one in-place subtraction;
* tensors whose buffer would exceed ``chunk_bytes`` are split by rows when the method says it is
  element-wise (``Method.is_chunkable``); ``ctx.offset`` is the flat element offset of the piece,
  so counter-based randomness (DARE) gives the same result chunked or not;
* a background thread reads the next piece while the current one is merged (I/O overlapped with
  compute). At most two pieces are alive at once: the one being merged and the one prefetched;
* a method whose thresholds are *per tensor* (TIES ``scope: tensor``: a ``Prepass`` with
  ``per_tensor``) is row-chunked too: before the pieces of a split tensor are merged, the engine
  reads them twice more for that tensor's exact two-pass radix selection
  (:class:`~distac.merging.kth.KthMagnitude`) and passes the result as ``ctx.thresholds``. A tensor
  that fits one piece is merged whole and the method computes its own threshold (``kthvalue``);
  both give the same bits, so memory stays at a few pieces whatever the largest tensor.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import DistacError
from ..methods import Method, TensorContext, get_method
from ..methods.base import missing_statistic
from ..nn.models import default_device
from ..taskvector import match_heads
from .kth import KthMagnitude, kth_smallest_rank

__all__ = ["DEFAULT_CHUNK_BYTES", "DictSource", "TensorSource", "merge", "run_merge"]

StateDict = dict[str, Tensor]

#: default budget for one piece's (N+1) fp32 input copies; larger tensors are row-chunked when the
#: method allows it. Two pieces are alive at once (prefetch), so the working set is a few times
#: this, far inside the "(N+1) × largest tensor + 512 MB" target of issue #6. Small pieces are also
#: *faster*: they stay in cache between the read, the subtraction and the method's passes. On a
#: 235 MB bf16 checkpoint (N=2, task arithmetic) 16 MiB pieces gave 330 MB peak RSS against
#: 1.2 GB with 256 MiB pieces, and no slower (anything from 8 to 32 MiB performs alike).
DEFAULT_CHUNK_BYTES = 16 * 2**20


class TensorSource(Protocol):
    """Read access to one checkpoint, tensor by tensor.

    Optional extras the engine uses when present: ``get_rows(name, start, stop)`` (read only
    those rows, e.g. safetensors ``get_slice``) and ``file_of(name)`` (the file to name in errors).
    """

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

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.state[name][start:stop]


def _numel(shape: Sequence[int]) -> int:
    return int(torch.Size(shape).numel())


def _where(src: Any, name: str) -> str:
    """The file holding ``name`` when the source knows it (sharded checkpoints), else its label."""
    file_of = getattr(src, "file_of", None)
    return str(file_of(name)) if file_of is not None else src.label


def _read(src: Any, name: str, rows: tuple[int, int] | None) -> Tensor:
    if rows is None:
        return src.get(name)
    get_rows = getattr(src, "get_rows", None)
    return get_rows(name, *rows) if get_rows is not None else src.get(name)[rows[0] : rows[1]]


def split_rows(shape: Sequence[int], n_inputs: int, chunk_bytes: int | None) -> list[tuple[int, int]] | None:
    """Row ranges so that ``n_inputs`` fp32 copies of one range fit ``chunk_bytes`` (None: keep whole).

    A single row is the smallest piece, whatever the budget.
    """
    if chunk_bytes is None or len(shape) == 0 or n_inputs * 4 * _numel(shape) <= chunk_bytes:
        return None
    per_row = n_inputs * 4 * _numel(shape[1:])
    step = max(1, chunk_bytes // max(per_row, 1))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


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
    chunkable: bool = False
    #: the method's per-tensor threshold pre-pass (``Prepass`` with ``per_tensor``), run tensor by
    #: tensor during the merge for tensors split into several pieces
    tensor_prepass: Any = None


@dataclass(frozen=True)
class Work:
    """One unit the reader thread loads: a tensor to merge (whole or a row range) or to copy."""

    name: str
    rows: tuple[int, int] | None = None
    copy: bool = False
    #: 0: merge this piece; 1 or 2: feed it to pass 1 or 2 of its tensor's threshold selection
    prepass: int = 0


@dataclass
class Loaded:
    work: Work
    base: Tensor  # fp32 piece of the base (or the raw tensor for a copy)
    deltas: Tensor | None  # (N, *piece) fp32 task vectors
    stats: dict[str, Tensor]
    nbytes: int  # bytes read from the sources
    buffer: Tensor | None = None  # the pool buffer base and deltas live in, returned after use


class BufferPool:
    """Reusable flat fp32 buffers for the (N+1, *piece) inputs: one per piece in flight.

    Reusing them matters for speed, not only memory: a fresh multi-MB allocation is a fresh
    ``mmap`` whose pages the kernel zero-fills on first touch, which costs as much as the copy
    that fills them. A buffer grows to the largest piece it has held and is then reused.
    """

    def __init__(self, count: int, device: torch.device):
        self.device = device
        self._free: queue.Queue[Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(0, dtype=torch.float32, device=device))

    def take(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        flat = self._free.get()
        n = _numel(shape)
        if flat.numel() < n:
            del flat  # free the smaller buffer before allocating the larger one
            flat = torch.empty(n, dtype=torch.float32, device=self.device)
        return flat, flat[:n].view(shape)

    def give(self, flat: Tensor | None) -> None:
        if flat is not None:
            self._free.put(flat)


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
                    f"{_where(m, k)}: tensor '{k}' has shape {m.shape(k)}, the base {base.label} has {base.shape(k)}"
                )
            if m.dtype(k).is_floating_point != base.dtype(k).is_floating_point:
                raise DistacError(
                    f"{_where(m, k)}: tensor '{k}' has dtype {m.dtype(k)}, the base {base.label} has {base.dtype(k)}"
                )


def _stats_for(
    stats: Mapping[str, Any], name: str, shape: tuple[int, ...], rows: tuple[int, int] | None, device: torch.device
) -> dict[str, Tensor]:
    """Per-tensor statistics for one piece: lists of sources become (N, *S) stacks, single sources a tensor.

    A statistic with the tensor's own shape (a Fisher diagonal) is sliced like the tensor; any other
    (a Gram matrix) is passed whole (methods that read those are not chunkable).
    """
    out: dict[str, Tensor] = {}

    def one(src: Any) -> Tensor:
        r = rows if rows is not None and tuple(src.shape(name)) == shape else None
        return _read(src, name, r).to(device=device, dtype=torch.float32)

    for key, src in stats.items():
        if isinstance(src, list | tuple):
            if src and all(name in s.keys() for s in src):
                out[key] = torch.stack([one(s) for s in src])
        elif src is not None and name in src.keys():
            out[key] = one(src)
    return out


def _load(
    base: TensorSource,
    models: Sequence[TensorSource],
    work: Work,
    stats: Mapping[str, Any],
    device: torch.device,
    pool: BufferPool | None = None,
) -> Loaded:
    """Read one piece of the base and of every model into one (N+1, ...) fp32 buffer; deltas in place."""
    name, rows = work.name, work.rows
    if work.copy:
        t = base.get(name)
        return Loaded(work, t, None, {}, t.numel() * t.element_size())
    full = tuple(base.shape(name))
    shape = full if rows is None else (rows[1] - rows[0], *full[1:])
    srcs = [base, *models]
    if pool is None:
        flat, buf = None, torch.empty((len(srcs), *shape), dtype=torch.float32, device=device)
    else:
        flat, buf = pool.take((len(srcs), *shape))
    try:
        nbytes = 0
        for j, src in enumerate(srcs):
            read_into = getattr(src, "read_into", None)
            if read_into is not None:  # straight from the file into the fp32 buffer (distac.io)
                nbytes += read_into(name, rows, buf[j])
            else:
                raw = _read(src, name, rows)
                nbytes += raw.numel() * raw.element_size()
                buf[j].copy_(raw)  # one pass: source dtype -> fp32, straight into the buffer
        # One reduction catches NaN/Inf anywhere in the N+1 inputs; only then find the culprit.
        if not bool(torch.isfinite(buf.sum())):
            for j, src in enumerate(srcs):
                if not bool(torch.isfinite(buf[j]).all()):
                    part = "" if rows is None else f" (rows {rows[0]}:{rows[1]})"
                    raise DistacError(f"{_where(src, name)}: tensor '{name}'{part} contains NaN or Inf")
        b, deltas = buf[0], buf[1:]
        deltas.sub_(b)
        st = _stats_for(stats, name, full, rows, device)
    except BaseException:
        if pool is not None:
            pool.give(flat)
        raise
    return Loaded(work, b, deltas, st, nbytes, flat)


def _stream(
    items: Iterable[Work],
    load: Callable[[Work], Loaded],
    *,
    prefetch: bool,
    release: Callable[[Loaded], None] | None = None,
) -> Iterator[Loaded]:
    """Yield loaded pieces in order; with ``prefetch``, a thread loads the next while the caller works.

    Two slots bound memory: the piece being consumed and the one being (or already) loaded.
    ``release(item)`` runs once the caller is done with an item (it returns the pool buffer).
    An error in the reader is re-raised in the caller; an error in the caller stops the reader.
    """
    if not prefetch:
        for w in items:
            item = load(w)
            yield item
            if release is not None:
                release(item)
        return
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(2)
    stop = threading.Event()

    def produce() -> None:
        # (Limiting this thread to one intra-op thread with torch.set_num_threads(1) was tried:
        # global-scope TIES then ran 5x slower on the 2-core machine, 272 s against 54 s.)
        try:
            for w in items:
                slots.acquire()
                if stop.is_set():
                    return
                q.put((load(w), None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put((None, e))
            return
        q.put((None, None))

    th = threading.Thread(target=produce, name="distac-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is None:
                return
            yield item
            if release is not None:
                release(item)
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
        th.join()


def _pieces(plan: MergePlan, base: TensorSource, n_inputs: int, chunk_bytes: int | None) -> list[Work]:
    budget = chunk_bytes if plan.chunkable else None
    out = []
    for k in plan.names:
        ranges = split_rows(base.shape(k), n_inputs, budget)
        out.extend([Work(k)] if ranges is None else [Work(k, r) for r in ranges])
    return out


def _offset(base: TensorSource, w: Work) -> int:
    return 0 if w.rows is None else w.rows[0] * _numel(base.shape(w.name)[1:])


class _Batcher:
    """Feed :class:`KthMagnitude` in batches of at least ``min_numel`` values per model.

    Each ``add`` costs a 65 536-bin histogram whatever the input size, so the many small tensors
    of a real model (norms, biases: hundreds of them) are gathered first. Histograms do not care
    about order, so the thresholds are unchanged; the memory held is N × ``min_numel`` fp32.
    """

    def __init__(self, sel: KthMagnitude, n: int, min_numel: int = 1 << 20):
        self.sel, self.min_numel = sel, min_numel
        self.pending: list[list[Tensor]] = [[] for _ in range(n)]
        self.count = 0

    def add(self, x: Tensor) -> None:
        if x[0].numel() >= self.min_numel:  # large pieces go straight in
            for i in range(x.shape[0]):
                self.sel.add(i, x[i].cpu())
            return
        for i in range(x.shape[0]):  # x may live in a reused buffer: keep copies
            self.pending[i].append(x[i].reshape(-1).cpu().clone())
        self.count += x[0].numel()
        if self.count >= self.min_numel:
            self.flush()

    def flush(self) -> None:
        if self.count:
            for i, parts in enumerate(self.pending):
                self.sel.add(i, torch.cat(parts))
                parts.clear()
        self.count = 0


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
    chunk_bytes: int | None = None,
    prefetch: bool = False,
) -> MergePlan:
    """Resolve the method and parameters, check the inputs, and run the exact pre-pass.

    The pre-pass reads the same pieces the merge will (row chunks when the method allows), so its
    memory bound is the merge's.
    """
    m = get_method(method) if isinstance(method, str) else method
    resolved = m.resolve(params, len(models))
    for stat in m.stats:  # "name?" is optional
        if not stat.endswith("?") and not (stats or {}).get(stat):
            raise missing_statistic(m.name, stat)
    _check_sources(base, models)
    device = torch.device(device)
    heads = match_heads(base.keys(), head_patterns)
    names, copied = [], []
    for k in base.keys():
        if k in heads:
            continue
        (names if base.dtype(k).is_floating_point else copied).append(k)
    plan = MergePlan(m, resolved, names, copied, sorted(heads, key=base.keys().index))
    plan.chunkable = m.is_chunkable(resolved)
    pre = m.plan_prepass(resolved, len(models))
    if pre is None:
        return plan
    if getattr(pre, "per_tensor", False):  # thresholds of each tensor, computed during the merge
        plan.tensor_prepass = pre
        return plan
    stats = stats or {}
    if pre.density is not None:
        total = sum(_numel(base.shape(k)) for k in names)
        sel = KthMagnitude([kth_smallest_rank(total, d) for d in pre.density])
        pieces = _pieces(plan, base, len(models) + 1, chunk_bytes)
        for pass_ in (1, 2):
            if pass_ == 2 and not sel.needs_second_pass:
                break
            it = iter(pieces) if progress is None else _with_progress(pieces, progress, f"pre-pass {pass_}/2")
            pool = BufferPool(2 if prefetch else 1, device)
            batch = _Batcher(sel, len(models))
            for item in _stream(
                it,
                lambda w, pool=pool: _load(base, models, w, stats, device, pool),
                prefetch=prefetch,
                release=lambda x, pool=pool: pool.give(x.buffer),
            ):
                w = item.work
                ctx = TensorContext(w.name, tuple(base.shape(w.name)), _offset(base, w), stats=item.stats)
                x = pre.transform(item.base, item.deltas, ctx) if pre.transform else item.deltas
                batch.add(x)
            batch.flush()
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


def _with_progress(
    pieces: list[Work], progress: Callable[[Iterator[str], str], Iterator[str]], desc: str
) -> Iterator[Work]:
    by_name = iter(progress(iter([w.name for w in pieces]), desc))
    for w in pieces:
        next(by_name, None)
        yield w


def _merge_piece(plan: MergePlan, base: TensorSource, item: Loaded, thresholds: Tensor | None = None) -> Tensor:
    w = item.work
    thr = plan.thresholds if thresholds is None else thresholds
    ctx = TensorContext(w.name, tuple(base.shape(w.name)), _offset(base, w), thr, item.stats, plan.norms)
    try:
        out = plan.method(item.base, item.deltas, ctx=ctx, **plan.params)
    except DistacError:
        raise
    except (ValueError, RuntimeError) as e:
        raise DistacError(f"method '{plan.method.name}' failed on tensor '{w.name}': {e}") from e
    return item.base + out


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
    progress: Callable[[Iterator[str], str], Iterator[str]] | None = None,
) -> MergePlan:
    """Plan, pre-pass, then merge every tensor in the base's order and pass it to ``sink``.

    Head tensors are not merged; the caller decides where each model's head goes (the base's head
    is sent to ``sink`` so the output is a complete model).

    With ``chunk_bytes``, a chunkable method's large tensors arrive at ``sink`` as consecutive row
    ranges (same name, in row order); without it every call is a whole tensor. ``prefetch`` reads
    the next piece on a background thread. ``on_piece(name, bytes_read, tensor_done)`` is called
    after each piece, and ``progress(names, description)`` wraps the pre-pass loops (progress bars).
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
    merged = set(plan.names)
    budget = chunk_bytes if plan.chunkable else None
    n_inputs = len(models) + 1
    pre = plan.tensor_prepass

    def ranks(k: str) -> list[int]:
        return [kth_smallest_rank(_numel(base.shape(k)), d) for d in pre.density]

    def work() -> Iterator[Work]:
        for k in base.keys():
            ranges = split_rows(base.shape(k), n_inputs, budget) if k in merged else None
            if k not in merged:
                yield Work(k, copy=True)
            elif ranges is None:
                yield Work(k)
            else:
                if pre is not None and any(r > 0 for r in ranks(k)):  # this tensor's threshold passes
                    yield from (Work(k, r, prepass=1) for r in ranges)
                    yield from (Work(k, r, prepass=2) for r in ranges)
                yield from (Work(k, r) for r in ranges)

    sel: KthMagnitude | None = None
    thresholds: dict[str, Tensor] = {}  # per-tensor thresholds of the split tensor being merged
    pool = BufferPool(2 if prefetch else 1, device)
    for item in _stream(
        work(),
        lambda w: _load(base, models, w, stats, device, pool),
        prefetch=prefetch,
        release=lambda x: pool.give(x.buffer),
    ):
        w = item.work
        last = w.rows is None or w.rows[1] == base.shape(w.name)[0]
        if w.prepass:
            if sel is None:
                sel = KthMagnitude(ranks(w.name))
            ctx = TensorContext(w.name, tuple(base.shape(w.name)), _offset(base, w), stats=item.stats)
            x = pre.transform(item.base, item.deltas, ctx) if pre.transform else item.deltas
            for i in range(x.shape[0]):
                sel.add(i, x[i].cpu())
            if last and w.prepass == 1:
                sel.next_pass()
            elif last:
                thresholds = {w.name: sel.result().to(device)}
                sel = None
            continue
        if pre is not None and w.rows is not None and w.name not in thresholds:
            # a split tensor every model keeps whole (density 1): no passes were needed
            thresholds = {w.name: KthMagnitude(ranks(w.name)).result().to(device)}
        sink(w.name, item.base if w.copy else _merge_piece(plan, base, item, thresholds.get(w.name)))
        if on_piece is not None:
            on_piece(w.name, item.nbytes, last)
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
    )
    return out

"""Reading the engine's inputs piece by piece: row ranges, one fp32 buffer per piece, prefetch.

A *piece* is a whole tensor, or a range of its rows when the tensor is larger than the budget.
The base and the N models' values of one piece are loaded into a single ``(N+1, *piece)`` fp32
buffer: row 0 is the base, rows 1..N become the task vectors by one in-place subtraction.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DistacError
from ..tensors import TensorSource

__all__ = ["BufferPool", "Loaded", "Work", "load_piece", "numel", "split_rows", "stream"]


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of this shape."""
    return int(torch.Size(shape).numel())


def split_rows(shape: Sequence[int], n_inputs: int, chunk_bytes: int | None) -> list[tuple[int, int]] | None:
    """Row ranges so that ``n_inputs`` fp32 copies of one range fit ``chunk_bytes`` (None: keep whole).

    A single row is the smallest piece, whatever the budget.

    Example:
        >>> split_rows((10, 4), 3, 3 * 4 * 4 * 3)
        [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    if chunk_bytes is None or len(shape) == 0 or n_inputs * 4 * numel(shape) <= chunk_bytes:
        return None
    per_row = n_inputs * 4 * numel(shape[1:])
    step = max(1, chunk_bytes // max(per_row, 1))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


@dataclass(frozen=True)
class Work:
    """One unit the reader loads: a tensor to merge (whole or a row range) or to copy."""

    name: str
    rows: tuple[int, int] | None = None
    copy: bool = False
    #: 0: merge this piece; 1 or 2: feed it to pass 1 or 2 of its tensor's k-th magnitude selection
    prepass: int = 0


@dataclass
class Loaded:
    """A loaded piece: the base's values, the task vectors, the statistics sliced alike."""

    work: Work
    base: Tensor  # fp32 piece of the base (or the raw tensor for a copy)
    deltas: Tensor | None  # (N, *piece) fp32 task vectors
    stats: dict[str, Tensor]
    nbytes: int  # bytes read from the sources
    buffer: Tensor | None = None  # the pool buffer base and deltas live in, returned after use


def offset_of(base: TensorSource, w: Work) -> int:
    """Flat element offset of the piece inside its tensor."""
    return 0 if w.rows is None else w.rows[0] * numel(base.shape(w.name)[1:])


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
        n = numel(shape)
        if flat.numel() < n:
            del flat  # free the smaller buffer before allocating the larger one
            flat = torch.empty(n, dtype=torch.float32, device=self.device)
        return flat, flat[:n].view(shape)

    def give(self, flat: Tensor | None) -> None:
        if flat is not None:
            self._free.put(flat)


def _read(src: TensorSource, name: str, rows: tuple[int, int] | None) -> Tensor:
    return src.get(name) if rows is None else src.get_rows(name, *rows)


def _stats_for(
    stats: Mapping[str, TensorSource | Sequence[TensorSource] | None],
    name: str,
    shape: tuple[int, ...],
    rows: tuple[int, int] | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """Per-tensor statistics for one piece: lists of sources become (N, *S) stacks, single sources a tensor.

    A statistic with the tensor's own shape (a Fisher diagonal) is sliced like the tensor; any other
    (a Gram matrix) is passed whole (methods that read those are not chunkable).
    """
    out: dict[str, Tensor] = {}

    def one(src: TensorSource) -> Tensor:
        r = rows if rows is not None and tuple(src.shape(name)) == shape else None
        return _read(src, name, r).to(device=device, dtype=torch.float32)

    for key, src in stats.items():
        if isinstance(src, list | tuple):
            if src and all(name in s.keys() for s in src):
                out[key] = torch.stack([one(s) for s in src])
        elif isinstance(src, TensorSource) and name in src.keys():
            out[key] = one(src)
    return out


def _check_finite(srcs: Sequence[TensorSource], buf: Tensor, name: str, rows: tuple[int, int] | None) -> None:
    # One reduction catches NaN/Inf anywhere in the N+1 inputs; only then find the culprit.
    if bool(torch.isfinite(buf.sum())):
        return
    for j, src in enumerate(srcs):
        if not bool(torch.isfinite(buf[j]).all()):
            part = "" if rows is None else f" (rows {rows[0]}:{rows[1]})"
            raise DistacError(f"{src.file_of(name)}: tensor '{name}'{part} contains NaN or Inf")


def load_piece(
    base: TensorSource,
    models: Sequence[TensorSource],
    work: Work,
    stats: Mapping[str, TensorSource | Sequence[TensorSource] | None],
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
        nbytes = sum(src.read_into(name, rows, buf[j]) for j, src in enumerate(srcs))
        _check_finite(srcs, buf, name, rows)
        b, deltas = buf[0], buf[1:]
        deltas.sub_(b)
        st = _stats_for(stats, name, full, rows, device)
    except BaseException:
        if pool is not None:
            pool.give(flat)
        raise
    return Loaded(work, b, deltas, st, nbytes, flat)


def stream(
    items: Iterable[Work],
    load: Callable[[Work], Loaded],
    *,
    prefetch: bool,
    release: Callable[[Loaded], None] | None = None,
) -> Iterator[Loaded]:
    """Yield loaded pieces in order; with ``prefetch``, a thread loads the next while the caller works.

    At most two pieces are alive: the one the caller holds and the one being loaded, which is
    only submitted once the previous one has been handed over. ``release(item)`` runs once the
    caller is done with an item (it returns the pool buffer). An error in the reader is re-raised
    in the caller; if the caller stops, the piece in flight is awaited and dropped.
    """
    if not prefetch:
        for w in items:
            item = load(w)
            yield item
            if release is not None:
                release(item)
        return
    # (Limiting the reader to one intra-op thread with torch.set_num_threads(1) was tried:
    # global-scope TIES then ran 5x slower on a 2-core machine, 272 s against 54 s.)
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distac-prefetch") as pool:

        def submit() -> Future[Loaded] | None:
            w = next(it, None)
            return None if w is None else pool.submit(load, w)

        pending = submit()
        while pending is not None:
            item = pending.result()
            pending = submit()
            yield item
            if release is not None:
                release(item)
            del item

"""The engine side of :class:`~distac.methods.base.Prepass`: exact k-th magnitudes and statistic norms.

* ``scope="global"``: :func:`global_kth_magnitudes` reads the same pieces the merge will (row
  chunks when the method allows), so its memory bound is the merge's, and selects each model's
  exact k-th smallest magnitude over the whole model in two radix passes.
* ``scope="tensor"``: :class:`TensorKth` does the same for one tensor at a time, fed with the
  pieces of a tensor the engine splits, just before those pieces are merged.
* ``stat_norms``: :func:`statistic_norms`, each model's global L2 norm of a statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DistacError
from ..methods import TensorContext
from ..methods.base import Prepass
from ..tensors import TensorSource
from .kth import KthMagnitude, kth_smallest_rank
from .pieces import BufferPool, Loaded, Work, load_piece, numel, offset_of, stream

__all__ = ["TensorKth", "global_kth_magnitudes", "statistic_norms"]

Progress = Callable[[Iterator[str], str], Iterator[str]]


def _ranked(pre: Prepass, base: TensorSource, item: Loaded) -> Tensor:
    """The (N, *piece) values whose magnitudes the pre-pass ranks: the deltas, or their transform."""
    w = item.work
    assert item.deltas is not None
    if pre.transform is None:
        return item.deltas
    ctx = TensorContext(w.name, tuple(base.shape(w.name)), offset_of(base, w), stats=item.stats)
    return pre.transform(item.base, item.deltas, ctx)


class _Batcher:
    """Feed :class:`KthMagnitude` in batches of at least ``min_numel`` values per model.

    Each ``add`` costs a 65 536-bin histogram whatever the input size, so the many small tensors
    of a real model (norms, biases: hundreds of them) are gathered first. Histograms do not care
    about order, so the result is unchanged; the memory held is N × ``min_numel`` fp32.
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


def _with_progress(pieces: list[Work], progress: Progress, desc: str) -> Iterator[Work]:
    by_name = iter(progress(iter([w.name for w in pieces]), desc))
    for w in pieces:
        next(by_name, None)
        yield w


def global_kth_magnitudes(
    pre: Prepass,
    base: TensorSource,
    models: Sequence[TensorSource],
    pieces: list[Work],
    stats: Mapping[str, Any],
    device: torch.device,
    *,
    prefetch: bool,
    progress: Progress | None,
) -> Tensor:
    """Each model's exact k-th smallest magnitude over all ``pieces`` (``scope="global"``), shape (N,).

    Args:
        pre: the method's pre-pass (``density`` set, ``scope="global"``).
        base, models: the sources the merge reads.
        pieces: every piece of every merged tensor, as the merge will read them.
        stats: the merge's statistics sources (a ``transform`` may read them).
        device: where the pieces are loaded.
        prefetch: read the next piece on a background thread.
        progress: wraps each pass's loop (a progress bar), or None.

    Returns:
        fp32 tensor on ``device``; ``-inf`` for a model that keeps everything.
    """
    assert pre.density is not None
    total = sum(numel(base.shape(k)) for k in dict.fromkeys(w.name for w in pieces))
    sel = KthMagnitude([kth_smallest_rank(total, d) for d in pre.density])
    for pass_ in (1, 2):
        if pass_ == 2 and not sel.needs_second_pass:
            break
        it = iter(pieces) if progress is None else _with_progress(pieces, progress, f"pre-pass {pass_}/2")
        pool = BufferPool(2 if prefetch else 1, device)
        batch = _Batcher(sel, len(models))

        def load(w: Work, pool: BufferPool = pool) -> Loaded:
            return load_piece(base, models, w, stats, device, pool)

        def release(x: Loaded, pool: BufferPool = pool) -> None:
            pool.give(x.buffer)

        for item in stream(it, load, prefetch=prefetch, release=release):
            batch.add(_ranked(pre, base, item))
        batch.flush()
        if pass_ == 1:
            sel.next_pass()
    return sel.result().to(device)


def statistic_norms(
    names: Sequence[str], stat: str, srcs: Sequence[TensorSource] | None, method: str, device: torch.device
) -> Tensor:
    """Per-model global L2 norm of statistic ``stat`` over the merged tensors ``names``, shape (N,)."""
    if not srcs:
        raise DistacError(f"method '{method}' needs '{stat}' statistics for every model")
    sq = torch.zeros(len(srcs), dtype=torch.float64)
    keys = [set(s.keys()) for s in srcs]  # keys() is a list: a membership test per name would be O(n²)
    for k in names:
        for i, s in enumerate(srcs):
            if k in keys[i]:
                # as a Python float: the statistics may live on another device than this CPU accumulator
                sq[i] += s.get(k).double().pow(2).sum().item()
    return sq.sqrt().float().to(device)


class TensorKth:
    """The per-tensor k-th magnitudes (``scope="tensor"``) of the tensors the engine splits.

    The engine yields a split tensor's pieces three times: pass 1, pass 2 (:meth:`feed`), then
    the merge, which reads :meth:`for_tensor`. Only one tensor's selection is alive at a time.
    """

    def __init__(self, pre: Prepass, base: TensorSource, device: torch.device):
        assert pre.density is not None and pre.scope == "tensor"
        self.pre, self.base, self.device = pre, base, device
        self._sel: KthMagnitude | None = None
        self._done: dict[str, Tensor] = {}  # the result for the split tensor being merged

    def ranks(self, name: str) -> list[int]:
        """The rank of each model's k-th smallest magnitude in tensor ``name`` (0: keep all)."""
        assert self.pre.density is not None
        return [kth_smallest_rank(numel(self.base.shape(name)), d) for d in self.pre.density]

    def needs_passes(self, name: str) -> bool:
        """Whether a split tensor needs the two selection passes (not when every model keeps all)."""
        return any(r > 0 for r in self.ranks(name))

    def feed(self, item: Loaded) -> None:
        """Add a pass-1 or pass-2 piece; after the last piece of pass 2 the result is ready."""
        w = item.work
        if self._sel is None:
            self._sel = KthMagnitude(self.ranks(w.name))
        x = _ranked(self.pre, self.base, item)
        for i in range(x.shape[0]):
            self._sel.add(i, x[i].cpu())
        if w.rows is not None and w.rows[1] != self.base.shape(w.name)[0]:
            return
        if w.prepass == 1:
            self._sel.next_pass()
        else:
            self._done = {w.name: self._sel.result().to(self.device)}
            self._sel = None

    def for_tensor(self, w: Work) -> Tensor | None:
        """The k-th magnitudes for a merge piece: a split tensor's selection, None for a whole tensor."""
        if w.rows is None:
            return None
        if w.name not in self._done:  # a split tensor every model keeps whole: no passes ran
            self._done = {w.name: KthMagnitude(self.ranks(w.name)).result().to(self.device)}
        return self._done[w.name]

"""Exact k-th smallest magnitudes in O(n), in two streaming passes.

TIES (global scope), DARE-TIES and Consensus-TIES keep, for each task, the entries whose magnitude
is at least a threshold computed over *the whole task vector*. A full sort is O(n log n) and needs
all of the model in memory; ``torch.kthvalue`` is O(n) but needs it too.

We instead select the k-th value by radix on the fp32 bit pattern. For non-negative floats the
int32 bit pattern is monotone in the value, so:

* pass 1 histograms the high 16 bits of every |x| (one ``bincount`` per chunk) and finds the bin
  that holds the k-th smallest value;
* pass 2 histograms the low 16 bits of the entries that fall in that bin, which pins the exact value.

Memory is two 65 536-bin histograms per model, whatever the model size, and the answer equals
``torch.kthvalue`` on the concatenated magnitudes bit for bit (tested).

Convention (official TIES ``topk_values_mask``): with d entries and keep fraction ``density``,
``k = int(d * density)`` and the threshold is the ``(d - k)``-th smallest magnitude; entries with
``|x| >= threshold`` are kept (ties at the threshold are kept). ``density == 1`` keeps everything.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KthMagnitude", "kth_smallest_rank", "magnitude_threshold"]

_BINS = 1 << 16


def kth_smallest_rank(numel: int, density: float) -> int:
    """1-based rank of the threshold among the sorted magnitudes (0 = keep everything)."""
    return numel - int(numel * density)


def _bits(x: Tensor) -> Tensor:
    # x in fp32, viewed as int32; the sign bit is masked off where it matters (|x| without a pass).
    # bincount takes int32 directly: widening to int64 first cost as much as the histogram itself.
    return x.detach().float().contiguous().view(torch.int32)


class KthMagnitude:
    """Streaming exact k-th smallest |x| for several independent value streams (one per model).

    Usage: ``add(i, chunk)`` for every chunk of stream i (pass 1), ``next_pass()``, ``add`` every
    chunk again in any order (pass 2), then ``result()`` -> fp32 tensor of thresholds, one per
    stream. A stream with rank 0 gets threshold ``-inf`` (keep everything).
    """

    def __init__(self, ranks: list[int]):
        self.ranks = list(ranks)
        n = len(ranks)
        self.pass_ = 1
        self.coarse = torch.zeros(n, _BINS, dtype=torch.int64)
        self.fine = torch.zeros(n, _BINS, dtype=torch.int64)
        self.hi = [0] * n  # selected high-16 bin per stream
        self.rank_in_bin = [0] * n

    @property
    def needs_second_pass(self) -> bool:
        return any(r > 0 for r in self.ranks)

    def add(self, i: int, x: Tensor) -> None:
        if self.ranks[i] <= 0 or x.numel() == 0:
            return
        b = _bits(x).reshape(-1)
        if self.pass_ == 1:  # high 16 bits of |x|: 15 bits once the sign is dropped
            self.coarse[i] += torch.bincount((b >> 16).bitwise_and_(0x7FFF), minlength=_BINS)
        else:
            # low 16 bits of the |x| in the selected bin; the others land in two overflow bins
            # (cheaper than selecting them with a boolean mask: 1.3 against 2.3 ns per value)
            v = torch.bitwise_and(b, 0x7FFFFFFF).sub_(self.hi[i] << 16).clamp_(-1, _BINS).add_(1)
            self.fine[i] += torch.bincount(v, minlength=_BINS + 2)[1 : _BINS + 1]

    def next_pass(self) -> None:
        for i, r in enumerate(self.ranks):
            if r <= 0:
                continue
            cum = torch.cumsum(self.coarse[i], 0)
            if int(cum[-1]) < r:
                raise ValueError(f"stream {i} has {int(cum[-1])} values, fewer than rank {r}")
            hi = int(torch.searchsorted(cum, torch.tensor(r)))
            self.hi[i] = hi
            self.rank_in_bin[i] = r - (int(cum[hi - 1]) if hi > 0 else 0)
        self.pass_ = 2

    def result(self) -> Tensor:
        out = torch.full((len(self.ranks),), float("-inf"), dtype=torch.float32)
        for i, r in enumerate(self.ranks):
            if r <= 0:
                continue
            cum = torch.cumsum(self.fine[i], 0)
            lo = int(torch.searchsorted(cum, torch.tensor(self.rank_in_bin[i])))
            bits = torch.tensor([(self.hi[i] << 16) | lo], dtype=torch.int32)
            out[i] = bits.view(torch.float32)[0]
        return out


def magnitude_threshold(x: Tensor, density: float) -> float:
    """Threshold of one tensor (the ``scope="tensor"`` case): keep ``|x| >= threshold``."""
    r = kth_smallest_rank(x.numel(), density)
    if r <= 0:
        return float("-inf")
    return float(torch.kthvalue(x.detach().float().abs().reshape(-1), r).values)

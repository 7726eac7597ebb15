"""Counter-based randomness: the same numbers whatever the order, chunking, process or device.

DARE drops each entry of each task vector with probability ``1 - density``. With a stateful
generator (mergekit's global ``set_seed``, ``torch.bernoulli``) the mask of a tensor depends on how
many numbers were drawn before it: on the tensor order, on row chunking, on the device's RNG
algorithm. Here the uniform number of an entry is a pure function of where the entry is::

    key = blake2b(seed, tensor name, model index)           # 64 bits, stable across processes
    u   = mix(key, flat index of the entry in the full tensor) / 2**24   in [0, 1)

so a mask does not depend on the tensor order, row chunking, the process or the device. DARE's
``seed`` may also be a list with one seed per model; the key is then ``blake2b(seed_t, tensor
name)`` without the index, so a model's mask follows it when the models (and their seeds) are
permuted.

``mix`` is two rounds of the ``lowbias32`` integer finaliser (Chris Wellons' hash-prospector,
a murmur3-style xor-shift-multiply), computed with int64 torch ops only. Every multiplication is
arranged so that no intermediate reaches 2**63: int64 overflow (undefined behaviour in C++) never
happens, so CPU and CUDA give the same bits. Python's built-in ``hash()`` is salted per process and is never used.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["hash32", "stream_key", "uniform"]

_M32 = 0xFFFFFFFF
# lowbias32 multipliers (hash-prospector, bias ~0.17)
_C1 = 0x7FEB352D
_C2 = 0x846CA68B


def stream_key(seed: int, name: str, index: int | None = None) -> tuple[int, int]:
    """Two 32-bit words derived from ``(seed, name[, index])`` by blake2b (stable, unsalted)."""
    text = f"{int(seed)}\x00{name}" + ("" if index is None else f"\x00{int(index)}")
    h = hashlib.blake2b(text.encode(), digest_size=8).digest()
    v = int.from_bytes(h, "little")
    return v & _M32, v >> 32


def _mulmod32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow.

    With c = c' + 2^31·b (c' < 2^31, b ∈ {0, 1}): x·c' < 2^63 fits, and 2^31·b·x mod 2^32 only
    depends on the lowest bit of x.
    """
    low = c & 0x7FFFFFFF
    out = x * low
    if c >> 31:
        out = out + ((x & 1) << 31)
    return out & _M32


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, _C1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _C2)
    return x ^ (x >> 16)


def hash32(key: tuple[int, int], counter: Tensor) -> Tensor:
    """32-bit hash of int64 counters (any non-negative value < 2**63) under a 64-bit key.

    The reference form of the hash; :func:`uniform` computes the same bits in place.
    """
    k0, k1 = key
    h = _lowbias32((counter & _M32) ^ k0)
    return _lowbias32(h ^ (counter >> 32) ^ k1)


def _lowbias32_(x: Tensor, tmp: Tensor) -> None:
    """:func:`_lowbias32` in place on ``x``, using ``tmp`` (same shape) as the only scratch space."""
    for shift, c in ((16, _C1), (15, _C2)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        if c >> 31:  # _mulmod32: the 2^31·(x & 1) term of a multiplier with bit 31 set
            torch.bitwise_and(x, 1, out=tmp)
            tmp.bitwise_left_shift_(31)
            x.mul_(c & 0x7FFFFFFF).add_(tmp)
        else:
            x.mul_(c)
        x.bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)


#: counters per block: the int64 scratch of one block (2 × 512 KiB) stays in cache, where a chain of
#: ~20 whole-tensor ops would stream every intermediate through memory.
_BLOCK = 1 << 16


def uniform(key: tuple[int, int], offset: int, numel: int, *, device: torch.device | str = "cpu") -> Tensor:
    """``numel`` uniform fp32 numbers in [0, 1) for the counters ``offset .. offset + numel - 1``.

    The top 24 bits of the hash are used, so every value is exactly representable in fp32 and
    ``u < 1`` always holds (a keep probability of 1 keeps everything). Equal, bit for bit, to
    ``(hash32(key, counters) >> 8) / 2**24`` (tested); computed in place, block by block.
    """
    k0, k1 = key
    out = torch.empty(numel, dtype=torch.float32, device=device)
    x = torch.empty(min(numel, _BLOCK), dtype=torch.int64, device=device)
    tmp = torch.empty_like(x)
    for start in range(0, numel, _BLOCK):
        n = min(_BLOCK, numel - start)
        xb, tb = x[:n], tmp[:n]
        lo = offset + start
        torch.arange(lo, lo + n, dtype=torch.int64, device=device, out=xb)
        hi_words = lo >> 32 != (lo + n - 1) >> 32 or lo >> 32
        if hi_words:  # counters ≥ 2^32: the high word enters the second round
            torch.bitwise_right_shift(xb, 32, out=tb)
            high = tb.clone()
        xb.bitwise_and_(_M32).bitwise_xor_(k0)
        _lowbias32_(xb, tb)
        xb.bitwise_xor_(k1)
        if hi_words:
            xb.bitwise_xor_(high)
        _lowbias32_(xb, tb)
        xb.bitwise_right_shift_(8)
        out[start : start + n] = xb
    return out.mul_(1.0 / (1 << 24))

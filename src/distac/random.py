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
    """32-bit hash of int64 counters (any non-negative value < 2**63) under a 64-bit key."""
    k0, k1 = key
    h = _lowbias32((counter & _M32) ^ k0)
    return _lowbias32(h ^ (counter >> 32) ^ k1)


def uniform(key: tuple[int, int], offset: int, numel: int, *, device: torch.device | str = "cpu") -> Tensor:
    """``numel`` uniform fp32 numbers in [0, 1) for the counters ``offset .. offset + numel - 1``.

    The top 24 bits of the hash are used, so every value is exactly representable in fp32 and
    ``u < 1`` always holds (a keep probability of 1 keeps everything).
    """
    counter = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (hash32(key, counter) >> 8).to(torch.float32) * (1.0 / (1 << 24))

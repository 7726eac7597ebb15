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

The function
------------
``mix`` is two rounds of the ``lowbias32`` integer finaliser (Chris Wellons' hash-prospector,
a murmur3-style xor-shift-multiply, bias ~0.17) under the 64-bit key ``(k0, k1)``, for a counter
``c = 2**32·c_hi + c_lo``::

    h = lowbias32(lowbias32(c_lo ^ k0) ^ c_hi ^ k1)         # all arithmetic mod 2**32

:func:`hash32` is the reference form, in int64 torch ops arranged so that no intermediate reaches
2**63. DARE keeps an entry when ``u < density``; :func:`keep_mask` computes that mask without the
uniforms, as ``(h >> 8) < ceil(fp32(density) · 2**24)``, which is the same comparison (torch rounds
the Python float ``density`` to fp32 to compare it with an fp32 tensor; ``u`` is an exact fp32).

How it is computed fast (:func:`uniform`, :func:`keep_mask`, :func:`keep_where`; equal to
:func:`hash32` bit for bit, tested). The int64 reference costs ~32 whole-array int64 kernels per
number (8.8 ns per number on one core of the benchmark machine). The fast path (1.2 ns; ``torch.rand``
takes 2.9 ns):

* works on 32-bit words (half the memory traffic; 32-bit multiplies are single vector
  instructions, 64-bit ones are not), in cache-sized groups of counters (512 KiB on the CPU);
* splits the counters into aligned rows of ``2**14``: within a row ``c_hi`` is constant and only
  the low 14 bits of ``c_lo`` vary, so ``c_lo ^ k0`` is a cached ``arange(2**14)`` xor a per-row
  constant, and the first ``x ^= x >> 16`` of round 1 only changes that constant;
* uses the identity ``s(s(x) ^ K) = x ^ K ^ (K >> 16)`` for ``s(x) = x ^ (x >> 16)``: the last
  xor-shift of round 1, the key xor and the first xor-shift of round 2 are one xor with a per-row
  constant. What is left is 4 multiplies, 3 xor-shifts and 2 xors: 12 kernels (15 on int32,
  where a logical shift needs a mask);
* DARE needs ``u < density``, not ``u``: :func:`keep_mask` compares the hash with an integer
  threshold, and :func:`keep_where` turns it straight into the masked copy of the task vector.

Why every device gives the same bits. On the CPU the hash runs in numpy on ``uint32`` arrays:
unsigned arithmetic wraps modulo 2**32 by definition (C and numpy), and shifts of unsigned values
are logical, so nothing is left to the platform; numpy never spawns threads, so the hash cannot
wait on a busy core either. On other devices (CUDA) torch has no usable ``uint32`` kernels, so the
same steps run on ``int32``: xor and and are exact, an arithmetic right shift followed by a mask
is the logical shift, and a multiply needs only the low 32 bits of the product, which are the same
for signed and unsigned operands (CUDA's ``mul.lo.s32``). A signed int32 overflow is formally
undefined in C++, so this is checked, not assumed: the first call on each device type multiplies
overflowing test vectors (lengths that exercise vector loops and scalar tails) and compares them
with Python's exact ``(x·c) mod 2**32``; if any bit differs, that device uses the int64 reference,
which never overflows. Either way the numbers are :func:`hash32`'s, and the int32 path is tested
against it on the CPU.

Python's built-in ``hash()`` is salted per process and is never used.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import torch
from torch import Tensor

__all__ = ["hash32", "keep_mask", "keep_threshold", "keep_where", "stream_key", "uniform"]

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


# ----------------------------------------------------------------------------------------------
# the reference: int64 ops, no overflow anywhere
# ----------------------------------------------------------------------------------------------
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

    The reference form of the hash; :func:`uniform` and :func:`keep_mask` compute the same bits
    with fewer, cheaper kernels (see the module docstring).
    """
    k0, k1 = key
    h = _lowbias32((counter & _M32) ^ k0)
    return _lowbias32(h ^ (counter >> 32) ^ k1)


# ----------------------------------------------------------------------------------------------
# the fast paths: aligned rows, folded xor-shifts; numpy uint32 on the CPU, torch int32 elsewhere
# ----------------------------------------------------------------------------------------------
_ROW_BITS = 14
_ROW = 1 << _ROW_BITS  # counters per aligned row (must stay ≤ 2**16: see the module docstring)
#: rows hashed per call on the CPU: 2**17 uint32 counters (512 KiB) plus as much scratch, so the
#: chain of 12 kernels stays in cache instead of streaming every step through memory.
_CPU_GROUP_ROWS = 8
#: on other devices (CUDA) kernel launches, not caches, are the cost: up to 2**24 counters a launch.
_DEV_GROUP_ROWS = 1 << 10

_NP_IOTA = np.arange(_ROW, dtype=np.uint32)[None, :]
_U16, _U15, _U8 = np.uint32(16), np.uint32(15), np.uint32(8)
_NC1, _NC2 = np.uint32(_C1), np.uint32(_C2)


def _s32(v: int) -> int:
    """The int32 value with the bit pattern of ``v mod 2**32``."""
    v &= _M32
    return v - (1 << 32) if v >> 31 else v


def _fold(k: int) -> int:
    """``s(k)`` for ``s(x) = x ^ (x >> 16)`` on 32 bits."""
    return k ^ (k >> 16)


def _row_constants(key: tuple[int, int], row0: int, rows: int) -> tuple[list[int], list[int]]:
    """Per-row constants of rows ``row0 ..``: the folded ``c_lo ^ k0``, and ``c_hi ^ k1`` folded."""
    k0, k1 = key
    a, b = [], []
    for r in range(row0, row0 + rows):
        c = r << _ROW_BITS
        a.append(_fold((c & _M32) ^ k0))
        b.append(_fold(((c >> 32) ^ k1) & _M32))
    return a, b


def _groups(offset: int, numel: int, group: int):
    """Yield ``(row0, rows, start, lo, hi)``: groups of aligned rows covering counters ``offset ..
    offset+numel-1``; the group's flat hashes ``[start, start + hi - lo)`` are counters ``lo .. hi-1``."""
    if numel <= 0:
        return
    first, last = offset >> _ROW_BITS, (offset + numel - 1) >> _ROW_BITS
    for row0 in range(first, last + 1, group):
        rows = min(group, last + 1 - row0)
        lo = max(offset, row0 << _ROW_BITS)
        hi = min(offset + numel, (row0 + rows) << _ROW_BITS)
        yield row0, rows, lo - (row0 << _ROW_BITS), lo, hi


def _hash_numpy(key: tuple[int, int], offset: int, numel: int):
    """Yield ``(h, lo - offset)``: uint32 hashes of counters ``lo ..`` (numpy, CPU). ``h`` is a view
    into reused scratch, valid until the next item. Unsigned C arithmetic: wrap-around is defined."""
    cap = min(_CPU_GROUP_ROWS, (((offset + numel - 1) >> _ROW_BITS) - (offset >> _ROW_BITS) + 1))
    x = np.empty((max(cap, 1), _ROW), dtype=np.uint32)
    t = np.empty_like(x)
    for row0, rows, start, lo, hi in _groups(offset, numel, _CPU_GROUP_ROWS):
        xb, tb = x[:rows], t[:rows]
        a, b = _row_constants(key, row0, rows)
        np.bitwise_xor(_NP_IOTA, np.array(a, dtype=np.uint32)[:, None], out=xb)  # round 1 (folded)
        np.multiply(xb, _NC1, out=xb)
        np.right_shift(xb, _U15, out=tb)
        np.bitwise_xor(xb, tb, out=xb)
        np.multiply(xb, _NC2, out=xb)
        np.bitwise_xor(xb, np.array(b, dtype=np.uint32)[:, None], out=xb)  # rounds 1|2 (folded)
        np.multiply(xb, _NC1, out=xb)
        np.right_shift(xb, _U15, out=tb)
        np.bitwise_xor(xb, tb, out=xb)
        np.multiply(xb, _NC2, out=xb)
        np.right_shift(xb, _U16, out=tb)
        np.bitwise_xor(xb, tb, out=xb)
        yield xb.reshape(-1)[start : start + hi - lo], lo - offset


_WRAPS: dict[str, bool] = {}
_IOTA: dict[torch.device, Tensor] = {}


def _int32_wraps(device: torch.device) -> bool:
    """Whether int32 ``mul`` on ``device`` gives the low 32 bits of the product and ``>>`` sign-extends.

    Checked once per device type against Python's exact integers, on lengths that exercise vector
    loops and scalar tails.
    """
    ok = _WRAPS.get(device.type)
    if ok is None:
        g = torch.Generator().manual_seed(12345)
        vals = torch.randint(-(2**31), 2**31, (1037,), generator=g, dtype=torch.int64)
        vals[:6] = torch.tensor([0, 1, -1, 2**31 - 1, -(2**31), 65535])
        ok = True
        for c in (_C1, _C2):
            for n in (1037, 7, 64):
                x = vals[:n].to(torch.int32).to(device)
                want = [_s32(int(v) * c) for v in vals[:n].tolist()]
                ok = ok and (x * _s32(c)).cpu().tolist() == want and x.clone().mul_(_s32(c)).cpu().tolist() == want
        x = vals.to(torch.int32).to(device)
        ok = ok and ((x >> 15) & 0x1FFFF).cpu().tolist() == [(int(v) & _M32) >> 15 for v in vals.tolist()]
        _WRAPS[device.type] = ok
    return ok


def _xorshift_(x: Tensor, tmp: Tensor, s: int) -> None:
    """``x ^= x >>> s`` (logical shift) on int32, in place, ``tmp`` as scratch."""
    torch.bitwise_right_shift(x, s, out=tmp)
    tmp.bitwise_and_((1 << (32 - s)) - 1)
    x.bitwise_xor_(tmp)


def _hash_torch(key: tuple[int, int], offset: int, numel: int, device: torch.device, group: int = _DEV_GROUP_ROWS):
    """As :func:`_hash_numpy`, with torch int32 kernels on ``device`` (int32 bit patterns)."""
    cap = min(group, (((offset + numel - 1) >> _ROW_BITS) - (offset >> _ROW_BITS) + 1))
    x = torch.empty((max(cap, 1), _ROW), dtype=torch.int32, device=device)
    tmp = torch.empty_like(x)
    iota = _IOTA.get(device)
    if iota is None:
        iota = _IOTA[device] = torch.arange(_ROW, dtype=torch.int32, device=device).view(1, _ROW)
    c1, c2 = _s32(_C1), _s32(_C2)
    for row0, rows, start, lo, hi in _groups(offset, numel, group):
        xb, tb = x[:rows], tmp[:rows]
        a, b = _row_constants(key, row0, rows)
        col = (rows, 1)
        a_t = torch.tensor([_s32(v) for v in a], dtype=torch.int32).view(col).to(device)
        b_t = torch.tensor([_s32(v) for v in b], dtype=torch.int32).view(col).to(device)
        torch.bitwise_xor(iota, a_t, out=xb)  # round 1 (folded)
        xb.mul_(c1)
        _xorshift_(xb, tb, 15)
        xb.mul_(c2)
        xb.bitwise_xor_(b_t)  # rounds 1|2 (folded)
        xb.mul_(c1)
        _xorshift_(xb, tb, 15)
        xb.mul_(c2)
        _xorshift_(xb, tb, 16)
        yield xb.view(-1)[start : start + hi - lo], lo - offset


def _uniform_int64(key: tuple[int, int], offset: int, numel: int, device: torch.device) -> Tensor:
    """The reference, one block of int64 counters at a time (devices whose int32 ops do not wrap)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    step = 1 << 16
    for start in range(0, numel, step):
        n = min(step, numel - start)
        c = torch.arange(offset + start, offset + start + n, dtype=torch.int64, device=device)
        out[start : start + n] = hash32(key, c) >> 8
    return out.mul_(1.0 / (1 << 24))


def uniform(key: tuple[int, int], offset: int, numel: int, *, device: torch.device | str = "cpu") -> Tensor:
    """``numel`` uniform fp32 numbers in [0, 1) for the counters ``offset .. offset + numel - 1``.

    The top 24 bits of the hash are used, so every value is exactly representable in fp32 and
    ``u < 1`` always holds (a keep probability of 1 keeps everything). Equal, bit for bit, to
    ``(hash32(key, counters) >> 8) / 2**24`` (tested).
    """
    device = torch.device(device)
    if device.type == "cpu":
        out = np.empty(numel, dtype=np.float32)
        for h, s in _hash_numpy(key, offset, numel):
            np.right_shift(h, _U8, out=h)
            out[s : s + h.size] = h  # < 2**24: exact in fp32
        return torch.from_numpy(out).mul_(1.0 / (1 << 24))
    if not _int32_wraps(device):
        return _uniform_int64(key, offset, numel, device)
    res = torch.empty(numel, dtype=torch.float32, device=device)
    for h, s in _hash_torch(key, offset, numel, device):
        h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF)
        res[s : s + h.numel()] = h
    return res.mul_(1.0 / (1 << 24))


def keep_threshold(density: float) -> int:
    """``T`` such that ``uniform(...) < density`` ⇔ ``(hash32(...) >> 8) < T``; T in [0, 2**24].

    torch compares an fp32 tensor with a Python float after rounding the float to fp32, and the
    uniforms are the exact fp32 values ``m / 2**24``: ``m / 2**24 < f`` ⇔ ``m < ceil(f · 2**24)``.
    """
    d = float(density)
    f = struct.unpack("<f", struct.pack("<f", d))[0] if abs(d) < 3.4e38 else d
    if not f > 0:
        return 0
    if f >= 1:
        return 1 << 24
    return math.ceil(f * (1 << 24))


def keep_mask(
    key: tuple[int, int], offset: int, numel: int, density: float, *, device: torch.device | str = "cpu"
) -> Tensor:
    """``uniform(key, offset, numel) < density`` as a bool tensor, bit for bit, without the uniforms.

    Compares the hash with the integer threshold of :func:`keep_threshold` (tested against the
    fp32 comparison).
    """
    device = torch.device(device)
    t = keep_threshold(density)
    if t >= 1 << 24 or t == 0:
        return torch.full((numel,), t > 0, dtype=torch.bool, device=device)
    if device.type == "cpu":
        out = np.empty(numel, dtype=np.bool_)
        limit = np.uint32(t << 8)  # (h >> 8) < t  ⇔  h < t·2**8
        for h, s in _hash_numpy(key, offset, numel):
            np.less(h, limit, out=out[s : s + h.size])
        return torch.from_numpy(out)
    if not _int32_wraps(device):
        return _uniform_int64(key, offset, numel, device) < density
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    signed_limit = (t << 8) - (1 << 31)  # h < t·2**8 unsigned  ⇔  (h ^ 2**31) < t·2**8 − 2**31 signed
    for h, s in _hash_torch(key, offset, numel, device):
        h.bitwise_xor_(-(1 << 31))
        torch.lt(h, signed_limit, out=mask[s : s + h.numel()])
    return mask


def keep_where(key: tuple[int, int], offset: int, density: float, x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``torch.where(keep_mask(key, offset, x.numel(), density).view(x.shape), x, 0)``, bit for bit.

    DARE's drop of one model's task vector. On the CPU, for contiguous fp32, the mask never exists:
    each cache-sized group of hashes becomes all-ones/all-zeros words that are and-ed with the bit
    patterns of ``x`` (a kept entry keeps its exact bits, a dropped one becomes +0.0, as ``where``
    gives), 4 vector kernels instead of a compare and a ``torch.where``, which is not vectorized
    for a bool condition on the CPU (2.3 ns per entry, more than the hash).
    """
    if out is None:
        out = torch.empty_like(x)
    t = keep_threshold(density)
    if t >= 1 << 24:
        return out.copy_(x)
    if t == 0:
        return out.zero_()
    fast = (
        x.device.type == "cpu"
        and out.device.type == "cpu"
        and x.dtype == out.dtype == torch.float32
        and x.is_contiguous()
        and out.is_contiguous()
        and x.shape == out.shape
    )
    if not fast:
        keep = keep_mask(key, offset, x.numel(), density, device=x.device).view(x.shape)
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device), out=out)
    src = x.detach().numpy().reshape(-1).view(np.int32)
    dst = out.detach().numpy().reshape(-1).view(np.int32)
    for h, s in _hash_numpy(key, offset, x.numel()):
        v = h.view(np.int32)
        np.right_shift(h, _U8, out=h)  # the uniform's 24 bits, m
        np.subtract(v, t, out=v)  # m - T < 0  ⇔  m < T  ⇔  keep
        np.right_shift(v, 31, out=v)  # arithmetic (numpy: x // 2**31): -1 = all ones ⇔ keep, else 0
        np.bitwise_and(src[s : s + v.size], v, out=dst[s : s + v.size])
    return out

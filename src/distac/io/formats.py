"""The safetensors on-disk layout, parsed and written by distac itself where streaming needs it.

A safetensors file is ``u64 (little endian) header length`` + ``JSON header`` + ``data``. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data) and may hold ``"__metadata__"`` (str -> str). Keys are unique,
and the byte ranges cover the data section exactly, in order, without gaps or overlaps.

Why distac touches the layout at all:

* **reading**: distac reads tensor bytes itself (:mod:`distac.io.readers`), so the header is
  validated here, as strictly as the reference implementation does and more (duplicate keys),
  before any byte is used; a truncated or corrupt file gets one message naming the file and the
  tensor instead of wrong values or a bare Rust error;
* **writing**: ``safetensors.torch.save_file`` needs every tensor of a shard in memory at once.
  The engine knows every output tensor's name, shape and dtype before it merges the first one, so
  distac writes each shard's header up front and then streams the data, one row chunk at a time.
  The memory held for writing is one chunk, not one shard (mergekit holds 5 GB by default).
  Files written this way are read back by ``safetensors`` itself in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DistacError
from .inputs import open_regular

__all__ = ["DTYPE_NAMES", "TensorEntry", "dtype_from_name", "header_bytes", "read_header", "read_layout"]

#: torch dtype -> safetensors dtype string (the format's spelling).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# A header larger than this is certainly corrupt (the reference implementation caps it at 100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def dtype_from_name(name: str, *, where: str) -> torch.dtype:
    """torch dtype for a safetensors dtype string; ``where`` names the file/tensor for the error."""
    try:
        return _FROM_NAME[name]
    except KeyError:
        raise DistacError(f"{where}: unsupported safetensors dtype {name!r}") from None


class _Corrupt(ValueError):
    """A header that breaks the format; turned into a DistacError naming the file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers keep the last of two equal keys; the format forbids them, and a duplicate tensor
    # name is how one tensor gets another's bytes
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Corrupt(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _Corrupt(f"{name} is not valid JSON")


def _int(x: Any) -> bool:
    # the format's integers are unsigned 64-bit
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64


def _entry(name: str, info: Any, where: str) -> TensorEntry:
    """One tensor's entry: a known dtype, a shape of non-negative ints, ``[begin, end]`` fitting the shape."""
    if not isinstance(info, dict):
        raise DistacError(f"{where}: corrupt header entry (not an object)")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise DistacError(f"{where}: corrupt header entry (dtype {dtype_name!r})")
    dtype = dtype_from_name(dtype_name, where=where)
    if not isinstance(shape, list) or not all(_int(s) for s in shape):
        raise DistacError(f"{where}: corrupt header entry (shape {shape!r} is not a list of non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(x) for x in offsets):
        raise DistacError(f"{where}: corrupt header entry (data_offsets {offsets!r} is not [begin, end])")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise DistacError(f"{where}: corrupt header, byte range {begin}..{end} does not fit shape {tuple(shape)}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_size: int) -> None:
    """The byte ranges tile the data section exactly: from 0, contiguous, no overlap, ending at the file's end."""
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap of {e.begin - pos} bytes"
            raise DistacError(f"{path}: tensor '{name}' (bytes {e.begin}..{e.end}) {what}; the header is corrupt")
        pos = e.end
    if pos > data_size:
        raise DistacError(
            f"{path}: file is truncated (tensor data ends at byte {pos}, the file holds {data_size}); "
            "re-download or re-save it"
        )
    if pos < data_size:
        raise DistacError(
            f"{path}: corrupt safetensors file: {data_size - pos} bytes after the last tensor (the header "
            "length or offsets are wrong); re-download or re-save it"
        )


def _parse(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):  # as the reference reader demands
            raise _Corrupt("the header does not start with '{'")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise _Corrupt("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DistacError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DistacError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {name: _entry(name, info, f"{path}: tensor '{name}'") for name, info in header.items()}
    _check_layout(path, entries, data_size)
    return entries, meta


def read_layout(fd: int, path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and check the header of the open file ``fd``: ``(entries, metadata, data start)``.

    Validates as the format requires, before any tensor byte is used: the 8-byte length (at most
    100 MB, within the file), a UTF-8 JSON object without duplicate keys, a string-to-string
    ``__metadata__``, for every tensor a known dtype, a shape of non-negative integers and
    ``[begin, end]`` of exactly ``numel × itemsize`` bytes, and byte ranges that tile the data
    section: from 0, contiguous, non-overlapping, ending at the end of the file. Each failure is a
    :class:`DistacError` naming the file (and the tensor).
    """
    size = os.fstat(fd).st_size
    try:
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise DistacError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER or 8 + n > size:
            raise DistacError(
                f"{path}: corrupt safetensors header (declared length {n} bytes, file has {size}); "
                "the file is truncated or not safetensors"
            )
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise DistacError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) != n:
        raise DistacError(f"{path}: file is truncated (the header ends early)")
    entries, meta = _parse(path, raw, size - 8 - n)
    return entries, meta, 8 + n


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header: ``({name: TensorEntry}, metadata)``.

    Args:
        path: a safetensors file (only a regular file is opened, see :mod:`distac.io.inputs`).

    Returns:
        The tensors' entries and the ``__metadata__``; see :func:`read_layout` for every check.

    Example:
        >>> entries, meta = read_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    fd = open_regular(Path(path))
    try:
        entries, meta, _ = read_layout(fd, Path(path))
    finally:
        os.close(fd)
    return entries, meta


def header_bytes(entries: dict[str, TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a header (length prefix included), padded with spaces to an 8-byte boundary.

    The padding keeps every tensor's data 8-byte aligned when the data offsets are, as the
    reference writer does.
    """
    obj: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, e in entries.items():
        obj[name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw

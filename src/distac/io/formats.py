"""The safetensors on-disk layout, parsed and written by distac itself where streaming needs it.

A safetensors file is ``u64 (little endian) header length`` + ``JSON header`` + ``data``. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data) and may hold ``"__metadata__"`` (str -> str). See
https://github.com/huggingface/safetensors#format.

Why distac touches the layout at all:

* **reading**: ``safetensors.safe_open`` does the actual reads; the header is parsed here first so
  that a truncated or corrupt file gets a message naming the file and the tensor whose bytes are
  missing, instead of a bare Rust error;
* **writing**: ``safetensors.torch.save_file`` needs every tensor of a shard in memory at once.
  The engine knows every output tensor's name, shape and dtype before it merges the first one, so
  distac writes each shard's header up front and then streams the data, one row chunk at a time.
  The memory held for writing is one chunk, not one shard (mergekit holds 5 GB by default).
  Files written this way are read back by ``safetensors`` itself in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DistacError

__all__ = ["DTYPE_NAMES", "TensorEntry", "dtype_from_name", "header_bytes", "read_header"]

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


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header: ``({name: TensorEntry}, metadata)``.

    Checks, each with a message naming the file: the length prefix, that the JSON parses, that
    every entry has a known dtype and byte range matching its shape, and that the file is long
    enough to hold the data (a truncated download fails here, not halfway through a merge).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise DistacError(f"{path}: not a safetensors file (only {size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise DistacError(
                    f"{path}: corrupt safetensors header (declared length {n} bytes, file has {size}); "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise DistacError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise DistacError(f"{path}: corrupt safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        where = f"{path}: tensor '{name}'"
        try:
            dtype = dtype_from_name(info["dtype"], where=where)
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise DistacError(f"{where}: corrupt safetensors header entry ({e!r})") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise DistacError(f"{where}: corrupt header, byte range {begin}..{end} does not fit shape {shape}")
        if end > data_size:
            raise DistacError(
                f"{where}: file is truncated (tensor data ends at byte {end}, the file holds {data_size}); "
                "re-download or re-save it"
            )
        entries[name] = TensorEntry(dtype, shape, begin, end)
    return entries, {str(k): str(v) for k, v in meta.items()}


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

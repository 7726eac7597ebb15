"""Lazy checkpoint readers: one tensor (or one row range of it) at a time, never the whole file.

:func:`open_checkpoint` accepts every form a user is likely to hand distac and returns one
:class:`Checkpoint`, which implements the engine's ``TensorSource`` protocol:

* a single ``.safetensors`` file;
* sharded safetensors with a ``*.safetensors.index.json`` (the path of the index or of its folder);
* a Hugging Face model folder (``config.json`` + weights in any of these forms, or
  ``pytorch_model.bin`` / sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``);
* a torch ``.bin`` / ``.pt`` / ``.pth`` state dict, loaded with ``torch.load(weights_only=True,
  mmap=True)`` (see :mod:`distac.io.torchfile`: pickles that would run code are refused).

Which files are read follows the input policy of :mod:`distac.io.inputs` (regular files inside
the model folder only). Safetensors headers are validated when the checkpoint is opened (see
:mod:`distac.io.formats`), so a corrupt or truncated file fails before the merge starts, naming
the file.
Tensor bytes are then read with ``pread`` at the header's offsets (see :class:`SafetensorsFile`
for why not a memory map); torch files are memory-mapped by ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DistacError
from .formats import read_header, read_layout
from .inputs import inside_model, open_regular, read_json_object, require_regular
from .torchfile import TorchFile

__all__ = [
    "STATS_FORMAT",
    "Checkpoint",
    "SafetensorsFile",
    "TorchFile",
    "is_stats_sidecar",
    "open_checkpoint",
    "resolve_weight_files",
]

_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: the ``format`` metadata that marks a distac statistics sidecar (``distac-stats/<version>``)
STATS_FORMAT = "distac-stats/"
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")


class _Staging:
    """One reusable uint8 CPU buffer that grows to the largest read, shared by a checkpoint's files.

    Reading through it allocates nothing per tensor: a fresh multi-MB buffer would be a fresh
    ``mmap`` whose pages the kernel zero-fills on first touch.
    """

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the smaller one first
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf

    def release(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)


class SafetensorsFile:
    """One safetensors file, read with ``pread`` at the byte offsets of its (checked) header.

    Why not ``safe_open``'s memory map: every page of a mapped file that a merge touches counts
    toward the process's resident memory until it is unmapped, so a streamed merge of N+1
    checkpoints would show (N+1) × the model in RSS, whatever the engine holds. ``pread`` into a
    buffer the caller owns reads only the bytes asked for (a row range is one contiguous byte
    range) and leaves caching to the kernel's page cache. The values are identical (tested against
    ``safetensors`` itself).
    """

    def __init__(self, path: Path, *, staging: _Staging | None = None):
        self.path = Path(path)
        self.label = str(self.path)
        fd = open_regular(self.path)
        try:
            self.entries, self.metadata, self._data_start = read_layout(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        # kept open, so the bytes read are those of the file whose header was checked (a file
        # replaced on disk meanwhile is not mixed in); close() releases it, a later read reopens
        self._fd: int | None = fd
        self._advise()
        self._staging = staging if staging is not None else _Staging()

    def names(self) -> list[str]:
        # storage order, so a streamed merge reads each file front to back
        return sorted(self.entries, key=lambda k: self.entries[k].begin)

    def keys(self) -> list[str]:
        return self.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def file_of(self, name: str) -> Path:
        return self.path

    def _byte_range(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
        e = self.entries[name]
        if rows is None:
            return self._data_start + e.begin, e.end - e.begin, e.shape
        start, stop = max(0, rows[0]), min(rows[1], e.shape[0])
        row_bytes = (e.end - e.begin) // e.shape[0] if e.shape[0] else 0
        shape = (max(stop - start, 0), *e.shape[1:])
        return self._data_start + e.begin + start * row_bytes, shape[0] * row_bytes, shape

    def _advise(self) -> None:
        if self._fd is not None and hasattr(os, "posix_fadvise"):
            # a merge reads each file front to back: ask for readahead
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _pread_into(self, dst: memoryview, offset: int, name: str) -> None:
        if self._fd is None:
            self._fd = open_regular(self.path)
            self._advise()
        done = 0
        while done < len(dst):
            try:
                n = os.preadv(self._fd, [dst[done:]], offset + done)
            except OSError as e:
                raise DistacError(f"{self.path}: cannot read tensor '{name}' ({e.strerror or e})") from e
            if n == 0:
                raise DistacError(f"{self.path}: tensor '{name}' ends early: the file was truncated while reading")
            done += n

    def read(self, name: str, rows: tuple[int, int] | None = None, *, out: Tensor | None = None) -> Tensor:
        """Tensor ``name`` (or rows ``start:stop``) as a new tensor in the file's dtype.

        With ``out`` (a contiguous uint8 CPU buffer of at least the byte size) the bytes land there
        instead and the returned tensor is a view of it (no allocation: the engine's staging buffer).
        """
        offset, nbytes, shape = self._byte_range(name, rows)
        dtype = self.entries[name].dtype
        raw = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        if nbytes:
            self._pread_into(raw.numpy().data, offset, name)
        return raw.view(dtype).view(shape)

    def get(self, name: str) -> Tensor:
        return self.read(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.read(name, (start, stop))

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        """Read a tensor (or rows ``start:stop``) through the reusable staging buffer and convert it into ``out``."""
        nbytes = self._byte_range(name, rows)[1]
        raw = self.read(name, rows, out=self._staging.take(nbytes))
        out.copy_(raw)
        return nbytes

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._staging.release()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WeightFile = SafetensorsFile | TorchFile


def _open_file(path: Path, staging: _Staging) -> WeightFile:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, staging=staging)
    if path.suffix in _TORCH_SUFFIXES:
        return TorchFile(path)
    raise DistacError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt or an index .json)")


_MAX_INDEX = 100_000_000  # a shard index is a name -> file map; anything larger is not one


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> file name), checked to be one."""
    data = read_json_object(index, "shard index", _MAX_INDEX)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DistacError(f"{index}: not a valid shard index (needs a 'weight_map' object of tensor name -> file)")
    bad = [v for v in weight_map.values() if not isinstance(v, str) or not v]
    if bad:
        raise DistacError(f"{index}: not a valid shard index ('weight_map' value {bad[0]!r} is not a file name)")
    return weight_map


def _files_from_index(index: Path) -> list[Path]:
    """The files a shard index names, each inside the index's folder and a regular file."""
    files = []
    for name in sorted(set(_weight_map(index).values())):
        path = inside_model(index.parent, name, named_by=str(index))
        if not path.exists():
            raise DistacError(f"{index}: names '{name}', which does not exist in {index.parent}")
        require_regular(path)
        files.append(path)
    return files


def _found_in(folder: Path, pattern: str) -> list[Path]:
    """Files of ``folder`` matching ``pattern`` (Trainer pickles that are not weights left out), each
    resolving inside the model folder."""
    found = sorted(f for f in folder.glob(pattern) if not f.name.startswith(_NOT_WEIGHTS))
    return [inside_model(folder, f.name, named_by=str(folder)) for f in found]


def is_stats_sidecar(path: Path) -> bool:
    """Whether a safetensors file is a distac statistics sidecar (its metadata ``format``), not weights."""
    return path.suffix == ".safetensors" and read_header(path)[1].get("format", "").startswith(STATS_FORMAT)


def resolve_weight_files(path: str | Path) -> list[Path]:
    """The weight files a checkpoint path stands for (see the module docstring for the forms).

    Args:
        path: a weight file, a shard index, or a model folder.

    Returns:
        The weight files, each a regular file inside the model folder (see :mod:`distac.io.inputs`).
        In a folder without a shard index, distac statistics sidecars (``distac stats`` output saved
        next to the weights, see :data:`STATS_FORMAT`) are not weights and are left out.

    Example:
        >>> resolve_weight_files("org/model")  # doctest: +SKIP
        [PosixPath('org/model/model-00001-of-00002.safetensors'), ...]
    """
    p = Path(path)
    sidecars: list[str] = []
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise DistacError(f"{p}: no such file or directory") from None
    except OSError as e:
        raise DistacError(f"{p}: cannot read ({e.strerror or e})") from e
    if not stat.S_ISDIR(mode):
        require_regular(p)
        return _files_from_index(p) if p.name.endswith(".json") else [p]
    for pattern in (
        "*.safetensors.index.json",
        "*.safetensors",
        "*.bin.index.json",
        "pytorch_model*.bin",
        "*.bin",
        "*.pt",
        "*.pth",
    ):
        # Trainer output folders also hold pickles that are not weights (training_args.bin, optimizer.pt)
        found = _found_in(p, pattern)
        if pattern == "*.safetensors":
            # a Fisher or Gram saved next to the weights is not part of them (a shard index names its files)
            sidecars = [f.name for f in found if is_stats_sidecar(f)]
            found = [f for f in found if f.name not in sidecars]
        if found:
            if pattern.endswith(".index.json"):
                if len(found) > 1:
                    raise DistacError(f"{p}: several shard indexes {[f.name for f in found]}; pass one of them")
                return _files_from_index(found[0])
            return found
    only = f" (only distac statistics sidecars {sidecars}: pass a sidecar's file itself)" if sidecars else ""
    raise DistacError(f"{p}: no weights found{only} (expected *.safetensors, a shard index, pytorch_model.bin or *.pt)")


class Checkpoint:
    """A checkpoint on disk as a lazy ``TensorSource``: one or more weight files behind one name map.

    ``label`` (the path given) names the checkpoint in messages; :meth:`file_of` names the file that
    holds a tensor, so an error about a tensor can point at the exact shard. Use it as a context
    manager to close its files (``with open_checkpoint(p) as ck: ...``); without ``with`` it works
    the same and :meth:`close` releases the files.
    """

    def __init__(self, path: str | Path, *, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        self._staging = _Staging()  # one buffer for every file: see read_into
        self.files: list[WeightFile] = []
        try:
            for f in resolve_weight_files(self.path):
                self.files.append(_open_file(f, self._staging))
            self._where = self._name_map()
        except BaseException:
            self.close()
            raise
        self._names = list(self._where)

    def _name_map(self) -> dict[str, WeightFile]:
        where: dict[str, WeightFile] = {}
        for f in self.files:
            for name in f.names():
                if name in where:
                    raise DistacError(f"{self.label}: tensor '{name}' is in both {where[name].path} and {f.path}")
                where[name] = f
        return where

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint (where config.json and tokenizer files live for HF)."""
        return self.path if self.path.is_dir() else self.path.parent

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return int(torch.Size(self.shape(name)).numel()) * self.dtype(name).itemsize

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first safetensors file (``{}`` for torch files)."""
        first = self.files[0] if self.files else None
        return dict(first.metadata) if isinstance(first, SafetensorsFile) else {}

    def file_of(self, name: str) -> Path:
        """The weight file that holds tensor ``name`` (the shard, for a sharded checkpoint)."""
        return self._where[name].file_of(name)

    def get(self, name: str) -> Tensor:
        return self._where[name].get(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor of rank >= 1 (safetensors ``get_slice``: only those bytes are read)."""
        return self._where[name].get_rows(name, start, stop)

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        """Read a tensor (or rows ``start:stop``) and convert it straight into ``out`` (e.g. the
        engine's fp32 buffer). Safetensors bytes go through one reusable staging buffer, so
        reading allocates nothing per tensor. Returns the bytes read."""
        return self._where[name].read_into(name, rows, out)

    def close(self) -> None:
        """Close every file (a later read reopens it: the checkpoint keeps working)."""
        for f in self.files:
            f.close()
        self._staging.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self._names)} tensors in {len(self.files)} file(s))"


def open_checkpoint(path: str | Path, *, label: str | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily.

    Args:
        path: a weight file, a shard index, or a model folder (see the module docstring).
        label: how messages name the checkpoint (default: ``path``).

    Returns:
        A :class:`Checkpoint` (a ``TensorSource``; also a context manager that closes its files).

    Raises:
        DistacError: naming the file at fault.

    Example:
        >>> with open_checkpoint("org/model") as ck:  # doctest: +SKIP
        ...     w = ck.get("embed.weight")
    """
    return Checkpoint(path, label=label)

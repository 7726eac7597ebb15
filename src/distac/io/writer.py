"""Streaming safetensors output: byte-sized shards, written chunk by chunk, into an atomic folder.

:class:`ShardWriter` is given the complete output layout (name, shape, dtype of every tensor, in
the order they will arrive) before the first byte is written. It splits the layout into shards of
at most ``max_shard_bytes`` (a larger tensor gets a shard of its own), writes each shard's header
up front, and then appends each tensor's bytes as they come, in row chunks if the engine chunked
the tensor. Memory held for writing is therefore one chunk, never one shard.

Shard naming follows Hugging Face: ``model.safetensors`` when there is one shard, else
``model-00001-of-0000K.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``), so ``transformers`` and
mergekit read the output directly.

:func:`distac.io.atomic.atomic_dir` gives the writer a temporary folder next to the target and
renames it into place only when everything is written: a failure (disk full included) leaves no
partial output. Both writers are context managers: the block's end finishes the shards, an error
inside it aborts them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Self

import torch
from torch import Tensor

from ..errors import DistacError
from .formats import TensorEntry, header_bytes
from .inputs import inside_model

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "WEIGHT_SUFFIXES",
    "BackgroundWriter",
    "ShardWriter",
    "copy_model_files",
    "parse_size",
    "plan_shards",
    "update_model_config",
    "write_safetensors",
]

#: default shard size: 1 GB (mergekit's "5B" default is parsed as 5e9 *bytes* and held in RAM).
DEFAULT_SHARD_BYTES = 1_000_000_000
#: files that are weights, never copied from the base's folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_MAX_SIZE = 2**62
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int | float, *, what: str = "size") -> int:
    """Bytes from ``"1GB"``, ``"500MB"``, ``"2GiB"``, ``"1e9"`` or a number (decimal units, like HF).

    Args:
        text: the size as given (a flag value, a config entry, a number).
        what: how messages name it (e.g. ``"--shard-size"``).

    Returns:
        A positive number of bytes, at most 2**62 (an absurd size is a typo, not a plan).

    Example:
        >>> parse_size("2GiB")
        2147483648
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        s = str(text).strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num) :]
        try:
            number = float(num)
        except ValueError:
            number = math.nan
        if unit not in _UNITS or math.isnan(number):
            raise DistacError(f"{what}: cannot read {text!r}; use e.g. 1GB, 500MB, 2GiB or a number of bytes")
    value = number * _UNITS[unit]
    if not value > 0:  # also catches -inf
        raise DistacError(f"{what}: {text!r} must be positive")
    if not value <= _MAX_SIZE:  # also catches inf
        raise DistacError(f"{what}: {text!r} is too large (at most {_MAX_SIZE:.3g} bytes)")
    size = text if isinstance(text, int) else int(value)
    if size <= 0:
        raise DistacError(f"{what}: {text!r} must be positive")
    return size


Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]


def plan_shards(layout: Layout, max_shard_bytes: int) -> list[dict[str, TensorEntry]]:
    """Greedy split of the layout, in order, into shards of at most ``max_shard_bytes`` of data."""
    shards: list[dict[str, TensorEntry]] = [{}]
    used = 0
    for name, shape, dtype in layout:
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        if shards[-1] and used + n > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = TensorEntry(dtype, tuple(shape), used, used + n)
        used += n
    return shards


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write whole tensors as one safetensors file at ``path`` (e.g. a temporary from :func:`atomic_file`).

    Unlike ``safetensors.torch.save_file`` it writes through Python's file object, so a full disk is
    an ``OSError`` (which the output policy turns into one line), and tensors that share storage
    (tied weights) are simply written twice.

    Args:
        path: the file to create.
        tensors: ``{name: tensor}`` in the order to store them.
        metadata: the header's ``__metadata__`` (str -> str).

    Returns:
        ``path``.

    Example:
        >>> with atomic_file("fisher.safetensors") as tmp:  # doctest: +SKIP
        ...     write_safetensors(tmp, {"w": torch.ones(2)}, {"kind": "fisher"})
    """
    layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    (entries,) = plan_shards(layout, max_shard_bytes=2**62)
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for v in tensors.values():
            data = v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                f.write(data.numpy().data)
    return Path(path)


class _Finishing:
    """``with``: ``close()`` (finish the output) on success, ``abort()`` on an error; nothing if done already."""

    _done: bool

    def close(self) -> object:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc is None:
            self.close()
        else:
            self.abort()


class ShardWriter(_Finishing):
    """Write tensors (whole or as consecutive row chunks) in layout order into safetensors shards.

    >>> w = ShardWriter(folder, [("w", (4, 2), torch.bfloat16)])    # doctest: +SKIP
    >>> w.write("w", rows_0_to_2); w.write("w", rows_2_to_4)        # doctest: +SKIP
    >>> w.close()  # -> the shard paths                             # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | Path,
        layout: Layout,
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.shards = plan_shards(layout, max_shard_bytes)
        k = len(self.shards)
        self.files = [
            self.folder / (f"{prefix}.safetensors" if k == 1 else f"{prefix}-{i + 1:05d}-of-{k:05d}.safetensors")
            for i in range(k)
        ]
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [name for shard in self.shards for name in shard]
        self._shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard}
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._shard = -1
        self._fh: BinaryIO | None = None
        self._done = False
        self.bytes_written = 0

    def dtype_of(self, name: str) -> torch.dtype:
        return self.shards[self._shard_of[name]][name].dtype

    def _write_bytes(self, data: memoryview | bytes) -> None:
        """The one place bytes reach the disk (tests patch it to simulate a full disk)."""
        assert self._fh is not None, "a shard is open whenever bytes are written"
        self._fh.write(data)

    def _enter_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = i
        # kept open across write() calls; closed by the next _enter_shard, close() or abort()
        self._fh = open(self.files[i], "wb")
        self._write_bytes(header_bytes(self.shards[i], self.metadata))

    def write(self, name: str, t: Tensor) -> None:
        """Append ``t`` (the whole tensor, or its next rows) to tensor ``name``, cast to the layout dtype."""
        if self._pos >= len(self._order) or name != self._order[self._pos]:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing"
            raise RuntimeError(f"writer got tensor '{name}' but expected {expected}")
        entry = self.shards[self._shard_of[name]][name]
        if self._shard_of[name] != self._shard:
            self._enter_shard(self._shard_of[name])
        data = t.detach().to(device="cpu", dtype=entry.dtype).contiguous().reshape(-1).view(torch.uint8)
        n = data.numel()
        if self._written + n > entry.end - entry.begin:
            raise RuntimeError(f"writer got more bytes than tensor '{name}' {entry.shape} holds")
        self._write_bytes(data.numpy().data)
        self._written += n
        self.bytes_written += n
        if self._written == entry.end - entry.begin:
            self._pos += 1
            self._written = 0

    def close(self) -> list[Path]:
        """Finish: check every tensor was written, close the file, write the index when sharded."""
        self._done = True
        # tensors of zero bytes never call write(); they are complete by definition
        while self._pos < len(self._order):
            name = self._order[self._pos]
            e = self.shards[self._shard_of[name]][name]
            if e.end != e.begin:
                raise RuntimeError(f"writer closed before tensor '{name}' was complete")
            if self._shard_of[name] != self._shard:
                self._enter_shard(self._shard_of[name])
            self._pos += 1
        for i in range(self._shard + 1, len(self.shards)):  # a shard made only of empty tensors
            self._enter_shard(i)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(e.end - e.begin for s in self.shards for e in s.values())},
                "weight_map": {n: self.files[self._shard_of[n]].name for n in self._order},
            }
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return self.files

    def abort(self) -> None:
        """Close the open shard without finishing it (the caller removes the partial output)."""
        self._done = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class BackgroundWriter(_Finishing):
    """Run a :class:`ShardWriter`'s disk writes on a one-thread pool, so they overlap the next piece's merge.

    ``write`` casts the tensor to its output dtype on the caller's thread (torch releases the
    GIL while it works) and submits it; at most ``depth`` tensors wait besides the one being
    written, which bounds the memory. One worker runs the jobs in submission order, so the bytes
    are those a plain :class:`ShardWriter` writes. An error on the worker (a full disk) is
    re-raised, unchanged, by the next ``write`` or by ``close``; later jobs are skipped.

    Example:
        >>> with BackgroundWriter(ShardWriter(folder, layout)) as w:  # doctest: +SKIP
        ...     w.write("embed.weight", t)
        >>> w.files  # the shards, once the block ended without an error  # doctest: +SKIP
    """

    def __init__(self, writer: ShardWriter, *, depth: int = 2):
        self.writer = writer
        self.files: list[Path] = []
        self._slots = threading.BoundedSemaphore(depth + 1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distac-writer")
        self._error: BaseException | None = None
        self._done = False

    def _run(self, name: str, t: Tensor) -> None:
        try:
            if self._error is None:
                self.writer.write(name, t)
        except BaseException as e:  # re-raised on the caller's thread
            self._error = e
        finally:
            self._slots.release()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, t: Tensor) -> None:
        self._check()
        dtype = self.writer.dtype_of(name)
        data = t.detach().to(device="cpu", dtype=dtype).contiguous()
        self._slots.acquire()
        self._pool.submit(self._run, name, data)

    def close(self) -> list[Path]:
        """Wait for every queued write, re-raise a writer error, finish the shards; return their paths."""
        self._done = True
        self._pool.shutdown(wait=True)
        self._check()
        self.files = self.writer.close()
        return self.files

    def abort(self) -> None:
        """Drop the queued writes and close the open shard (the caller removes the partial output)."""
        self._done = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.writer.abort()


def copy_model_files(src_folder: Path, dst: Path, *, skip: Sequence[str] = ("README.md",)) -> list[str]:
    """Copy the base's non-weight files (config.json, tokenizer, generation config, ...) to ``dst``.

    Regular files, in subfolders too (sentence-transformers' ``1_Pooling/``, ``2_Normalize/``), so the
    output loads wherever the base did; weight files and shard indexes are skipped (the merge writes
    its own), and so is the base's model card (the merge writes a new one). A symlink is copied
    by content only when it resolves inside the model folder (see :mod:`distac.io.inputs`); one
    that leads outside (a ``tokenizer_config.json`` linking to a private key) is skipped with a
    warning on stderr, so nothing from outside the folder ever lands in an output that may be
    uploaded, and a long merge is not thrown away at its last step. FIFOs, devices and sockets
    are skipped the same way.

    Args:
        src_folder: the base model's folder.
        dst: the output folder.
        skip: file names never copied.

    Returns:
        The names copied.

    Example:
        >>> copy_model_files(Path("base"), Path("merged"))  # doctest: +SKIP
        ['config.json', 'tokenizer.json']
    """
    return _copy_tree(src_folder, src_folder, dst, set(skip))


def _copy_tree(root: Path, folder: Path, dst: Path, skip: set[str]) -> list[str]:
    """:func:`copy_model_files` for one folder level; subfolders (sentence-transformers' ``1_Pooling/``)
    are copied with the same rules, their names relative to ``root``."""
    copied = []
    for f in sorted(folder.iterdir()):
        rel = f.relative_to(root).as_posix()
        if f.name.startswith(".") or rel in skip or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            continue
        try:
            inside_model(root, rel, named_by=str(root))
        except DistacError as e:
            print(f"distac: warning: not copying {rel}: {e}", file=sys.stderr)
            continue
        try:
            mode = os.stat(f).st_mode
        except OSError:  # a dangling link
            continue
        if stat.S_ISDIR(mode):
            sub = _copy_tree(root, f, dst / f.name, skip) if not f.is_symlink() else []
            copied += sub
            continue
        if not stat.S_ISREG(mode):
            print(f"distac: warning: not copying {f}: not a regular file", file=sys.stderr)
            continue
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), dst / f.name)
        copied.append(rel)
    return copied


def update_model_config(folder: Path, values: Mapping[str, Any], *, dtype: torch.dtype | None = None) -> bool:
    """Set top-level ``values`` in ``folder/config.json`` (the output's copy of the base's); the one editor of it.

    Transformers loads a model in the dtype its config names (``dtype`` since transformers 5,
    ``torch_dtype`` before), so a bf16 output whose copied config still says ``float32`` would be
    upcast on load, twice the memory: with ``dtype``, whichever of the two keys the config has is
    set too (a config with neither is left so; loaders then take the weights' dtype). Key order is
    kept, and the file is rewritten only when a value changes; no config.json, nothing to do.

    Args:
        folder: the output folder being written.
        values: top-level keys to set (a frankenmerge's ``num_hidden_layers``, a vocabulary's ``vocab_size``).
        dtype: the dtype the floating weights were written in, when the merge chose it.

    Returns:
        Whether ``config.json`` was rewritten.

    Example:
        >>> update_model_config(Path("merged"), {"num_hidden_layers": 44}, dtype=torch.bfloat16)  # doctest: +SKIP
        True
    """
    path = folder / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DistacError(f"{path}: the base's config.json is not valid JSON ({e}); fix it or remove it") from None
    if not isinstance(config, dict):
        return False
    new = dict(values)
    if dtype is not None:
        new |= dict.fromkeys((k for k in ("torch_dtype", "dtype") if k in config), str(dtype).removeprefix("torch."))
    if all(k in config and config[k] == v for k, v in new.items()):
        return False
    config.update(new)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True

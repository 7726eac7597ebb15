"""Torch state dict files (``.bin`` / ``.pt`` / ``.pth``), loaded with ``weights_only=True``.

A pickle that needs more than tensors (a pickled ``nn.Module``, custom classes) is refused:
loading it would run arbitrary code; the message shows how to convert a trusted file. Random
bytes, truncated archives and tensors distac cannot merge (complex, quantized, sparse, unsigned
wider than 8 bits) are refused in one line naming the file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DistacError
from .formats import DTYPE_NAMES
from .inputs import require_regular

__all__ = ["TorchFile", "load_torch_file"]


def _convert_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (
        'If you trust this file, convert it once to safetensors: python -c "import torch; '
        "from safetensors.torch import save_file; "
        f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd.state_dict(); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\""
    )


# what torch.load raises on bytes that are not a torch checkpoint (random bytes, a truncated zip,
# text): the unpickler's failures are as varied as its input
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    UnicodeDecodeError,
    OverflowError,
    zipfile.BadZipFile,
)


def load_torch_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` of a regular file, memory-mapped when the file allows.

    Args:
        path: a file written by ``torch.save`` (a state dict, an optimizer state).

    Returns:
        The unpickled object (tensors and plain containers only).

    Raises:
        DistacError: one line naming the file: not a regular file, a pickle that would run code,
            or bytes that are not a torch checkpoint.

    Example:
        >>> state = load_torch_file(Path("optimizer.pt"))  # doctest: +SKIP
    """
    require_regular(path)  # torch.load would block forever on a FIFO
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # files written with the legacy (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):
            raise DistacError(
                f"{path}: refused to unpickle: it holds more than tensors (e.g. a pickled model or "
                f"custom classes), and loading it would run arbitrary code. {_convert_hint(path)}"
            ) from e
        raise DistacError(f"{path}: not a torch checkpoint (corrupt, truncated or not a pickle)") from e
    except _LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistacError(f"{path}: cannot load as a torch state dict ({first})") from e


def _check_tensor(path: Path, name: object, t: Tensor) -> None:
    """A plain dense tensor of a dtype distac merges (the ones safetensors stores), under a string name."""
    if not isinstance(name, str):
        raise DistacError(f"{path}: tensor name {name!r} is not a string")
    if t.layout != torch.strided:
        raise DistacError(f"{path}: tensor '{name}' is {t.layout} (sparse); distac reads dense tensors only")
    if t.dtype not in DTYPE_NAMES:
        raise DistacError(
            f"{path}: tensor '{name}' has dtype {t.dtype} (complex, quantized or unsigned >8-bit); distac reads "
            f"{', '.join(str(d).removeprefix('torch.') for d in DTYPE_NAMES)}"
        )


class TorchFile:
    """A torch state dict file, loaded with ``weights_only=True`` and memory-mapped when possible."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = str(self.path)
        self.state = self._state_dict(load_torch_file(self.path))

    def _state_dict(self, obj: object) -> dict[str, Tensor]:
        if not isinstance(obj, dict):
            raise DistacError(
                f"{self.path}: holds a {type(obj).__name__}, not a state dict. {_convert_hint(self.path)}"
            )
        state = obj
        # training checkpoints often nest the weights: {"state_dict": {...}, "epoch": 3}
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                state = inner
                break
        bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
        if bad:
            raise DistacError(
                f"{self.path}: entries {bad[:3]} are not tensors; distac reads flat state dicts "
                "(name -> tensor), or one nested under 'state_dict' / 'model'"
            )
        for k, v in state.items():
            _check_tensor(self.path, k, v)
        return state

    def names(self) -> list[str]:
        return list(self.state)

    def keys(self) -> list[str]:
        return self.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def file_of(self, name: str) -> Path:
        return self.path

    def get(self, name: str) -> Tensor:
        return self.state[name]

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.state[name][start:stop]

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        """Convert a tensor (or rows ``start:stop``) of the memory-mapped state dict into ``out``."""
        raw = self.get(name) if rows is None else self.get_rows(name, *rows)
        out.copy_(raw)
        return raw.numel() * raw.element_size()

    def close(self) -> None:
        self.state = {}

    def __enter__(self) -> TorchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

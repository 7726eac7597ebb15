"""The one input policy: which files a checkpoint may make distac read or copy.

Checkpoints come from strangers, so a model folder is not trusted to point anywhere else:

* **Only regular files are opened.** A FIFO, device or socket named ``model.safetensors`` would
  block ``open`` forever (or stream endless bytes); every file is checked with ``stat`` before it
  is opened, and opened with ``O_NONBLOCK`` and checked again with ``fstat`` (so a file swapped
  in between cannot make distac hang either).
* **Every path a checkpoint names stays inside its model folder.** Files found in a folder and
  files named by a shard index are resolved through symlinks; one that leads outside the folder
  (``../x.safetensors``, an absolute path, a link to ``/home/me/.ssh/id_rsa``) is refused, naming
  the index and the entry. The one exception is the Hugging Face hub cache layout, where
  ``models--org--name/snapshots/<rev>/`` holds links into the same repository's ``blobs/``.
* A path the user names directly (a weight file, a folder, an index) is the user's choice and
  may itself be a link anywhere: the rules apply to what *it* names.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import DistacError

__all__ = ["inside_model", "model_roots", "open_regular", "read_json_object", "require_regular"]

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def require_regular(path: Path) -> os.stat_result:
    """``stat`` of ``path`` (links followed) if it is a regular file; else a :class:`DistacError` naming it.

    Args:
        path: the file about to be opened.

    Returns:
        Its ``os.stat_result``.

    Example:
        >>> require_regular(Path("/dev/null"))  # doctest: +SKIP
        DistacError: /dev/null: is a character device, not a regular file; distac only reads regular files
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DistacError(f"{path}: file not found") from None
    except OSError as e:
        raise DistacError(f"{path}: cannot read ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise DistacError(f"{path}: is {_kind(st.st_mode)}, not a regular file; distac only reads regular files")
    return st


def open_regular(path: Path) -> int:
    """Open a regular file read-only without ever blocking; return its descriptor (the caller closes it).

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; ``fstat``
    then refuses anything that is not a regular file (for which the flag changes nothing).
    """
    require_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DistacError(f"{path}: cannot open ({e.strerror or e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DistacError(f"{path}: is {_kind(st.st_mode)}, not a regular file; distac only reads regular files")
    return fd


def model_roots(folder: Path) -> list[Path]:
    """The resolved folders a model folder's files may live in: itself, and for a Hugging Face cache
    snapshot (``.../snapshots/<rev>``) also its repository's ``blobs/`` (where the hub client links)."""
    root = Path(os.path.realpath(folder))
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append(Path(os.path.realpath(root.parent.parent / "blobs")))
    return roots


def inside_model(folder: Path, name: str | Path, *, named_by: str) -> Path:
    """``folder / name`` after checking that it resolves inside the model folder (see :func:`model_roots`).

    Args:
        folder: the model folder (as the user named it).
        name: a relative path found in or named by the folder (a weight file, an index entry).
        named_by: what named it, for the message (the index file, or the folder itself).

    Returns:
        The path to open (``folder / name``, links not yet followed: messages keep the user's names).

    Raises:
        DistacError: when ``name`` is absolute or leads outside the folder, naming both.
    """
    if Path(name).is_absolute():
        raise DistacError(
            f"{named_by}: entry '{name}' is an absolute path; "
            f"a checkpoint may only name files inside its folder {folder}"
        )
    path = folder / name
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in model_roots(folder)):
        raise DistacError(
            f"{named_by}: entry '{name}' leads to {real}, outside the model folder {folder}; "
            "refused (a checkpoint may only name files inside its own folder)"
        )
    return path


def read_json_object(path: Path, what: str, max_bytes: int) -> dict[str, Any]:
    """A small JSON object a model folder names (a shard index, an adapter config), read under the input policy.

    The file must be regular (:func:`open_regular`), at most ``max_bytes`` long, UTF-8 and hold a
    JSON object; anything else is one line naming the file and ``what`` it should have been.

    Example:
        >>> read_json_object(Path("adapter/adapter_config.json"), "adapter config", 1 << 20)  # doctest: +SKIP
        {'peft_type': 'LORA', 'r': 8, ...}
    """
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise DistacError(f"{path}: not a valid {what} (larger than {max_bytes} bytes)")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DistacError(f"{path}: not a valid {what} ({e})") from None
    if not isinstance(data, dict):
        raise DistacError(f"{path}: not a valid {what} (expected a JSON object)")
    return data

"""The one output policy: every file or folder distac writes goes through :func:`atomic_dir` or :func:`atomic_file`.

What it guarantees, for every command that writes:

* **Nothing half-written is ever visible.** Output goes to a temporary sibling
  (``.NAME.tmp-PID-XXXXXXXX``) and is renamed into place only when complete; on any error the
  temporary is removed. A full disk, a read-only folder or a bad path becomes one
  :class:`DistacError` naming the target.
* **Inputs are never destroyed.** An output may not equal an input, contain one, lie inside an
  input folder, or be the current folder (or one above it). Paths are resolved through symlinks
  before they are compared.
* **Only distac's own outputs are replaced.** ``overwrite`` replaces an existing folder only when
  it carries the :data:`MARKER` file that distac writes into every output folder; anything else is
  refused (remove it yourself). An existing file is replaced only with ``overwrite``.
* **One writer per target.** A lock file next to the target stops a second run that writes the
  same output; a target that appears while the run is working is not replaced without
  ``overwrite``.
* **Interrupted runs are cleaned up.** Temporaries whose process is gone (SIGKILL, power loss)
  are removed, with a note on stderr, the next time anything is written next to them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import DistacError

__all__ = ["MARKER", "atomic_dir", "atomic_file", "check_output", "clean_stale", "write_bytes", "write_text"]

#: written into every output folder; only folders holding it may be replaced with ``overwrite``
MARKER = ".distac-output"

_TMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _resolved(p: str | Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve(strict=False)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    target: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = (), folder: bool = True
) -> Path:
    """Refuse an output path that would destroy something; return it resolved.

    Args:
        target: the file or folder about to be written.
        overwrite: whether an existing output may be replaced (a folder only if distac wrote it).
        inputs: every path the command reads (models, configs, sidecars, data).
        folder: whether the output is a folder (else a single file).

    Raises:
        DistacError: naming the target and saying what to do instead.
    """
    t = _resolved(target)
    for p in inputs:
        r = _resolved(p)
        if _is_within(r, t):
            what = "is" if r == t else "contains"
            raise DistacError(f"{target}: the output {what} an input ({p}); choose another output path")
        if r.is_dir() and _is_within(t, r):
            raise DistacError(f"{target}: the output lies inside the input folder {p}; choose another output path")
    if _is_within(_resolved(Path.cwd()), t):
        raise DistacError(f"{target}: the output would replace the current folder; choose a new folder")
    if not (t.exists() or t.is_symlink()):
        return t
    if not overwrite:
        flag = "--overwrite (overwrite=True)"
        raise DistacError(f"{target}: already exists; pass {flag} to replace it, or choose another output path")
    if Path(target).is_symlink():
        raise DistacError(f"{target}: is a symlink; distac does not replace links, choose another output path")
    if folder and not t.is_dir():
        raise DistacError(f"{target}: exists and is not a folder")
    if not folder and not t.is_file():
        raise DistacError(f"{target}: exists and is not a regular file")
    if folder and not (t / MARKER).is_file():
        raise DistacError(
            f"{target}: exists and was not written by distac (no {MARKER} file); "
            "--overwrite only replaces distac's own outputs: remove it yourself or choose another path"
        )
    return t


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | Path) -> list[Path]:
    """Remove temporaries of ``target`` left by processes that no longer run; return what was removed."""
    t = Path(target)
    removed: list[Path] = []
    if not t.parent.is_dir():
        return removed
    for p in t.parent.glob(f".{t.name}.*-*-*"):
        m = _TMP.match(p.name)
        if m is None or m["name"] != t.name or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        print(f"distac: removed {p}, left by an interrupted run", file=sys.stderr)
        removed.append(p)
    return removed


def _tmp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _os_error(target: Path, e: OSError) -> DistacError:
    if e.errno == errno.ENOSPC:
        return DistacError(
            f"{target}: disk full while writing; the partial output was removed. Free space or choose another path"
        )
    return DistacError(f"{target}: cannot write ({e.strerror or e}); the partial output was removed")


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    lock = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise DistacError(f"{target}: cannot write to {target.parent} ({e.strerror or e})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DistacError(f"{target}: another distac run is writing this output; wait for it to finish") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def _atomic(target: str | Path, overwrite: bool, inputs: Iterable[str | Path], folder: bool) -> Iterator[Path]:
    inputs = list(inputs)
    t = check_output(target, overwrite=overwrite, inputs=inputs, folder=folder)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistacError(f"{target}: cannot create the folder {t.parent} ({e.strerror or e})") from e
    existed = t.exists()
    with _lock(t):
        clean_stale(t)
        tmp = _tmp_name(t, "tmp")
        try:
            if folder:
                tmp.mkdir()
                (tmp / MARKER).write_text("written by distac; `--overwrite` may replace this folder\n")
            yield tmp
            if t.exists() and not existed:  # appeared while we worked: not ours to replace
                check_output(target, overwrite=False, inputs=inputs, folder=folder)
            _commit(tmp, t)
        except OSError as e:
            _remove(tmp)
            raise _os_error(t, e) from e
        except BaseException:
            _remove(tmp)
            raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _commit(tmp: Path, target: Path) -> None:
    if target.is_dir():  # rename cannot replace a non-empty folder: move the old one aside first
        old = _tmp_name(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def atomic_dir(
    target: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> AbstractContextManager[Path]:
    """Context manager: a fresh temporary folder, renamed to ``target`` when the block succeeds.

    Args:
        target: the output folder.
        overwrite: replace an existing distac output folder (never anything else).
        inputs: paths the command reads; the output may not equal or contain any of them.

    Example:
        >>> with atomic_dir("merged", inputs=[base, *models]) as tmp:  # doctest: +SKIP
        ...     save_file(state, str(tmp / "model.safetensors"))
    """
    return _atomic(target, overwrite, inputs, folder=True)


def atomic_file(
    target: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> AbstractContextManager[Path]:
    """Context manager: a temporary path next to ``target``, renamed to ``target`` when the block succeeds.

    Args:
        target: the output file.
        overwrite: replace an existing regular file.
        inputs: paths the command reads; the output may not be any of them.
    """
    return _atomic(target, overwrite, inputs, folder=False)


def write_bytes(target: str | Path, data: bytes, *, overwrite: bool = True, inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``data`` to ``target`` atomically (a temporary file, then a rename); return ``target``."""
    with atomic_file(target, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str, *, overwrite: bool = True, inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically; return ``target``."""
    return write_bytes(target, text.encode(), overwrite=overwrite, inputs=inputs)

"""Statistics sidecars: safetensors files with the model's keys, fp32 values and explicit metadata.

Format (``format: distac-stats/1``), all metadata values are strings:

=====================  ==========================================================================
``kind``               ``fisher`` | ``adam`` (diagonal curvature, same shape as the parameter)
                       or ``gram`` ((d_in, d_in) per linear weight, key = the weight's name)
``scale``              ``sum`` (Σ over examples) or ``mean`` (÷ n_examples; Grams: ÷ rows per layer)
``estimator``          ``sampled`` | ``exact`` | ``empirical`` (Fisher), ``adam``, ``forward`` (Gram)
``n_examples``         number of examples the statistic was computed on
``model_fingerprint``  blake2b over the covered keys' names, shapes and a strided value sample
``data_fingerprint``   blake2b over a strided sample of every batch ("" when unknown)
``rows``, ``layout``   Gram only: JSON ``{key: rows}`` and ``{key: "out_in" | "in_out"}``
=====================  ==========================================================================

The model fingerprint covers only the keys the sidecar holds, so the same sidecar checks against
a full state dict, a checkpoint file or a model whose head was dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError, closest
from ..io import Checkpoint, atomic_file, open_checkpoint
from ..io.readers import STATS_FORMAT
from ..io.writer import write_safetensors

__all__ = [
    "KINDS",
    "Sidecar",
    "check_stats",
    "load_stats",
    "model_fingerprint",
    "open_sidecar",
    "read_stats_metadata",
    "save_stats",
    "verify_sidecar",
]

FORMAT = f"{STATS_FORMAT}1"
KINDS = ("fisher", "adam", "gram")
#: sidecar kinds accepted where a statistic is asked for: Adam second moments stand in for a Fisher
ACCEPTED_KINDS = {"fisher": ("fisher", "adam"), "adam": ("adam",), "gram": ("gram",)}
_SAMPLE = 64  # values per tensor in the fingerprint: cheap, yet any fine-tuning step changes them


class _SourceView(Mapping[str, Tensor]):
    """A read-only mapping over a ``TensorSource`` (a checkpoint read lazily), so checks can stream
    tensor by tensor instead of loading a whole model; shapes come from the source's header."""

    def __init__(self, src: Any) -> None:
        self._src = src
        self._keys = list(src.keys())

    def __getitem__(self, k: str) -> Tensor:
        if k not in self._keys:
            raise KeyError(k)
        return self._src.get(k)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape_of(self, k: str) -> tuple[int, ...]:
        return tuple(self._src.shape(k))

    def strided(self, k: str, step: int) -> Tensor:
        """``flat[::step]`` of tensor ``k``, reading only the rows that hold those entries.

        A fingerprint samples ≤ 64 values per tensor, so checking a sidecar against a multi-GB
        checkpoint reads ≤ 64 rows of each tensor instead of all of it.
        """
        shape = self.shape_of(k)
        if len(shape) < 2:
            return self[k].reshape(-1)[::step]
        numel = math.prod(shape)
        row_len = numel // shape[0]
        idx = torch.arange(0, numel, step)
        rows = idx // row_len
        out = torch.empty(len(idx), dtype=self._src.dtype(k))
        for r in torch.unique(rows).tolist():
            sel = rows == r
            out[sel] = self._src.get_rows(k, r, r + 1).reshape(-1)[idx[sel] - r * row_len].to(out.dtype)
        return out


def _state(model: Any) -> Mapping[str, Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    return _SourceView(model)


def _shape(state: Mapping[str, Tensor], k: str) -> tuple[int, ...]:
    # a _SourceView answers from the checkpoint header; reading the tensor just for its shape would
    # read the whole model
    return state.shape_of(k) if isinstance(state, _SourceView) else tuple(state[k].shape)


def model_fingerprint(model: Mapping[str, Tensor] | nn.Module, keys: list[str] | None = None) -> str:
    """blake2b (128 bit) over ``name, shape`` and a strided sample of ≤ 64 values of each key.

    ``keys`` defaults to every floating-point tensor. Values are hashed as float64 after a cast to
    fp32, so an fp16 and an fp32 copy of the same weights do *not* match (their values differ).
    """
    state = _state(model)
    names = sorted(keys if keys is not None else [k for k, v in state.items() if v.is_floating_point()])
    h = hashlib.blake2b(digest_size=16)
    for k in names:
        if k not in state:
            raise DistacError(f"model_fingerprint: the model has no tensor '{k}'{closest(k, state)}")
        shape = _shape(state, k)
        step = max(1, math.prod(shape) // _SAMPLE)
        sample = state.strided(k, step) if isinstance(state, _SourceView) else state[k].detach().reshape(-1)[::step]
        h.update(k.encode())
        h.update(str(shape).encode())
        h.update(sample.to("cpu", torch.float32).to(torch.float64).numpy().tobytes())
    return h.hexdigest()


def check_stats(
    stats: Mapping[str, Tensor],
    model_state: Mapping[str, Tensor] | nn.Module,
    *,
    kind: str = "fisher",
    fingerprint: str | None = None,
    label: str = "statistics",
    check_values: bool = True,
) -> None:
    """Raise :class:`DistacError` unless ``stats`` fits ``model_state``.

    Checks: every key is a model tensor; shapes match (Fisher/Adam: the parameter's shape; Gram:
    (d, d) with d one of the 2-D weight's dimensions); values are finite; curvature is
    non-negative (Gram: non-negative diagonal); and, when ``fingerprint`` is given, the model's
    fingerprint over the sidecar's keys equals it. ``check_values=False`` skips the value checks
    (keys, shapes and fingerprint only), so nothing but headers and the fingerprint's sampled rows
    is read; the curvature methods check values again as they merge.
    """
    if kind not in KINDS:
        raise DistacError(f"{label}: kind '{kind}' is not one of {list(KINDS)}")
    state = _state(model_state)
    if not stats:
        raise DistacError(f"{label}: holds no tensors")
    for k in stats:
        if k not in state:
            raise DistacError(f"{label}: tensor '{k}' is not in the model{closest(k, state)} (keys do not match)")
        _check_shape(k, _shape(stats, k), _shape(state, k), kind, label)
        if check_values:
            _check_values(k, stats[k], kind, label)
    if fingerprint is not None:
        got_fp = model_fingerprint(state, sorted(stats))
        if got_fp != fingerprint:
            raise DistacError(
                f"{label}: computed on a different model (fingerprint {fingerprint[:12]}…, this model "
                f"{got_fp[:12]}…); recompute it with `distac stats` on this model"
            )


def _check_shape(k: str, got: tuple[int, ...], want: tuple[int, ...], kind: str, label: str) -> None:
    """Fisher/Adam: the parameter's shape; Gram: (d, d) with d one of the 2-D weight's dimensions."""
    if kind == "gram":
        if len(want) != 2 or len(got) != 2 or got[0] != got[1] or got[0] not in want:
            raise DistacError(f"{label}: Gram '{k}' has shape {got}, expected (d, d) with d in the weight's {want}")
    elif got != want:
        raise DistacError(f"{label}: tensor '{k}' has shape {got}, the model has {want}")


def _check_values(k: str, v: Tensor, kind: str, label: str) -> None:
    """Finite, and non-negative curvature (a Gram's diagonal)."""
    if not torch.isfinite(v).all():
        raise DistacError(f"{label}: tensor '{k}' contains NaN or Inf")
    diag = v.diagonal() if kind == "gram" else v
    if (diag < 0).any():
        raise DistacError(
            f"{label}: tensor '{k}' has negative curvature (min {float(diag.min()):.3g}); a Fisher, "
            "Adam second moment or Gram diagonal is a sum of squares and cannot be negative"
        )


def save_stats(
    path: str | os.PathLike[str],
    stats: Mapping[str, Tensor],
    *,
    kind: str,
    model: Mapping[str, Tensor] | nn.Module,
    n_examples: int,
    scale: str,
    estimator: str,
    data_fingerprint: str = "",
    rows: Mapping[str, int] | None = None,
    layout: Mapping[str, str] | None = None,
    overwrite: bool = True,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Check ``stats`` against ``model`` and write them, fp32, to ``path`` (atomically: temp file + rename).

    Args:
        path: the sidecar to write (``.safetensors``).
        stats: ``{name: tensor}`` with the model's keys (Grams: the linear weights' keys).
        kind: ``fisher``, ``adam`` or ``gram``.
        model: the model the statistics were computed on (its fingerprint goes into the file).
        n_examples, scale, estimator, data_fingerprint: recorded in the metadata.
        rows, layout: Grams only: rows per layer, ``out_in``/``in_out`` per layer.
        overwrite: replace an existing file at ``path`` (the CLI passes ``--overwrite``).
        inputs: files the statistics were computed from; ``path`` may never be one of them.

    Returns:
        ``path``. Tied tensors are written as separate copies.

    Example:
        >>> save_stats("f.safetensors", f, kind="fisher", model=m, n_examples=64, scale="sum",  # doctest: +SKIP
        ...            estimator="sampled")
    """
    check_stats(stats, model, kind=kind, label=str(path))
    if scale not in ("sum", "mean"):
        raise DistacError(f"{path}: scale '{scale}' must be 'sum' or 'mean'")
    if kind == "gram" and (rows is None or set(rows) != set(stats)):
        raise DistacError(f"{path}: a Gram sidecar needs the row count of every layer (rows={{key: n}})")
    meta = {
        "format": FORMAT,
        "kind": kind,
        "scale": scale,
        "estimator": estimator,
        "n_examples": str(int(n_examples)),
        "model_fingerprint": model_fingerprint(model, sorted(stats)),
        "data_fingerprint": data_fingerprint,
    }
    if rows is not None:
        meta["rows"] = json.dumps({k: int(v) for k, v in rows.items()}, sort_keys=True)
    if layout is not None:
        meta["layout"] = json.dumps({k: layout[k] for k in stats if k in layout}, sort_keys=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in stats.items()}
    with atomic_file(Path(path), overwrite=overwrite, inputs=[Path(p) for p in inputs]) as tmp:
        write_safetensors(tmp, tensors, meta)
    return Path(path)


def _decode(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """Sidecar metadata with ``n_examples`` as int and ``rows``/``layout`` decoded from JSON."""
    out: dict[str, Any] = dict(meta)
    try:
        out["n_examples"] = int(meta["n_examples"])
        for k in ("rows", "layout"):
            if k in meta:
                out[k] = json.loads(meta[k])
    except (KeyError, ValueError) as e:
        raise DistacError(f"{path}: corrupt statistics metadata ({e!r}); recompute it with `distac stats`") from e
    if out.get("kind") not in KINDS or out.get("scale") not in ("sum", "mean"):
        raise DistacError(f"{path}: corrupt statistics metadata (kind {out.get('kind')!r}, scale {out.get('scale')!r})")
    return out


@dataclass
class Sidecar:
    """A statistics file opened (and checked) once: what it holds, and a lazy reader of its tensors.

    ``kind``/``scale`` are None for a plain safetensors file keyed like the model (taken as is).
    ``source`` is a :class:`~distac.io.Checkpoint` (a ``TensorSource``); closing the sidecar closes it.
    """

    path: Path
    source: Checkpoint
    kind: str | None
    scale: str | None
    metadata: dict[str, Any]

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_kind(path: Path, kind: Any, use: str | None, role: str | None) -> None:
    """The sidecar's kind fits its use (checked before the rest of the metadata: the use is the
    caller's choice, and a wrong one is the first thing to tell)."""
    accepted = ACCEPTED_KINDS.get(use, (use,)) if use else KINDS
    if kind not in accepted:
        if role:
            raise DistacError(f"{path}: holds '{kind}' statistics, but {role} uses it as '{use}'")
        raise DistacError(f"{path}: holds '{kind}' statistics, expected {use}")


def _check_scale(path: Path, meta: dict[str, Any], scale: str | None) -> None:
    if scale is not None and meta["scale"] != scale:
        raise DistacError(
            f"{path}: is on the {meta['scale']} scale but {scale} is needed; recompute it with "
            f"`distac stats ... --scale {scale}` or convert it with load_stats(path, scale='{scale}')"
        )


def open_sidecar(
    path: str | os.PathLike[str],
    *,
    use: str | None = None,
    model: Any = None,
    scale: str | None = None,
    check_values: bool = False,
    plain_ok: bool = True,
    label: str | None = None,
    role: str | None = None,
) -> Sidecar:
    """Open a statistics file once: read and check its header, verify it against the model, keep it open.

    Args:
        path: a ``distac stats`` sidecar, or (with ``plain_ok``) any checkpoint file keyed like the model.
        use: what the caller uses it as (``fisher``, ``adam`` or ``gram``): the sidecar's kind must fit
            (``fisher`` also accepts Adam second moments).
        model: a state dict, an ``nn.Module`` or a ``TensorSource`` (read lazily) to check keys, shapes
            and the fingerprint against; None skips that check.
        scale: demand this scale (the curvature methods need ``"sum"`` Fishers).
        check_values: also read every value (finite, non-negative curvature); the curvature methods
            check values again while they merge, so a merge passes False and reads only headers and
            the ≤ 64 sampled rows per tensor of the fingerprint.
        plain_ok: accept a file without distac metadata (``kind``/``scale`` None, not checked).
        label: how the reader names the file in messages (default: ``path``).
        role: who uses it, for the kind-mismatch message (e.g. ``"the config"``).

    Returns:
        A :class:`Sidecar` (close it, or use it as a context manager).

    Raises:
        DistacError: naming the file and what does not fit.

    Example:
        >>> with open_sidecar("fisher.safetensors", use="fisher", model=ck, scale="sum") as sc:  # doctest: +SKIP
        ...     merge_with(sc.source)
    """
    p = Path(path)
    src = open_checkpoint(p, label=label or str(p))
    try:
        raw = src.metadata()
        if not str(raw.get("format", "")).startswith(STATS_FORMAT):
            if not plain_ok:
                raise DistacError(f"{p}: not a distac statistics sidecar (metadata format={raw.get('format')!r})")
            return Sidecar(p, src, None, None, dict(raw))
        if use:
            _check_kind(p, raw.get("kind"), use, role)
        meta = _decode(p, raw)
        _check_kind(p, meta["kind"], use, role)
        _check_scale(p, meta, scale)
        if model is not None:
            check_stats(
                _SourceView(src),
                model,
                kind=meta["kind"],
                fingerprint=meta["model_fingerprint"],
                label=str(p),
                check_values=check_values,
            )
    except BaseException:
        src.close()
        raise
    return Sidecar(p, src, meta["kind"], meta["scale"], meta)


def read_stats_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar's metadata, with ``n_examples`` as int and ``rows``/``layout`` decoded."""
    with open_sidecar(path, plain_ok=False) as sc:
        return sc.metadata


def load_stats(
    path: str | os.PathLike[str],
    *,
    model: Mapping[str, Tensor] | nn.Module | None = None,
    scale: str | None = None,
) -> dict[str, Tensor]:
    """Read a sidecar as ``{name: fp32 tensor}``.

    Args:
        path: the sidecar.
        model: if given, the sidecar is checked against it (keys, shapes, fingerprint, values).
        scale: convert to ``"sum"`` or ``"mean"`` (×/÷ n_examples; Grams: ×/÷ rows per layer).
            Default: as stored. Curvature methods expect Fishers on the sum scale.

    Returns:
        ``{name: tensor}``.

    Example:
        >>> f = load_stats("fisher.safetensors", scale="sum")  # doctest: +SKIP
    """
    if scale is not None and scale not in ("sum", "mean"):
        raise DistacError(f"load_stats: scale '{scale}' must be 'sum' or 'mean'")
    with open_sidecar(path, plain_ok=False) as sc:
        meta = sc.metadata
        stats = {k: sc.source.get(k) for k in sc.source.keys()}
    if model is not None:
        check_stats(stats, model, kind=meta["kind"], fingerprint=meta["model_fingerprint"], label=str(path))
    if scale is not None and scale != meta["scale"]:
        counts = meta.get("rows") or dict.fromkeys(stats, meta["n_examples"])
        for k in stats:
            n = float(counts[k])
            stats[k] = stats[k] * n if scale == "sum" else stats[k] / n
    return stats


def verify_sidecar(
    path: str | os.PathLike[str],
    model: Any,
    *,
    kind: str | None = None,
    scale: str | None = None,
    check_values: bool = True,
) -> dict[str, Any]:
    """Check a sidecar file against a model before a merge reads it; return its metadata.

    ``model`` is a state dict, an ``nn.Module`` or any source with ``keys()``/``get(name)`` (an
    engine ``TensorSource`` such as :func:`distac.open_checkpoint`), read one tensor at a time.
    ``kind="fisher"`` accepts Fisher and Adam sidecars; ``scale`` demands a scale (the curvature
    methods expect ``"sum"``). :func:`open_sidecar` does the same and keeps the file open.
    """
    with open_sidecar(path, use=kind, model=model, scale=scale, check_values=check_values, plain_ok=False) as sc:
        return sc.metadata

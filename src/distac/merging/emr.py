"""EMR-Merging: one unified task vector, a 1-bit mask and a rescaler per task, in one streaming pass.

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024 (arXiv
2405.17461); official code ``harveyhuang18/EMR_Merging``, ``merge_vit/src/main_emr_merging.py``
(``emr_merge``). For every floating-point tensor that is not a head, with task vectors τ_t:

* γ = sign(mean_t τ_t), where an exact zero counts as **−1** (the official ``(mean > 0) * 2 − 1``);
* M_t = [τ_t · γ > 0] (so at a zero mean, the tasks with τ_t < 0 keep the entry);
* ε = max_t |M_t ⊙ τ_t| (0 where no task agrees with γ), τ_uni = γ ⊙ ε;
* λ_t = Σ_l mean|τ_t,l| / Σ_l mean|M_t,l ⊙ τ_uni,l|: sums over tensors l of per-tensor means.

Task t is then θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni (elementwise, in fp32, cast to θ0's dtype). **It is not
one model**: inference needs the task id. Heads (``heads`` patterns) are not merged; each task keeps
its own model's head. Non-float tensors (int buffers) stay θ0's, as in the official code (its task
vectors skip int64/uint8 entries). Two cases the official code turns into NaN are defined here: a
tensor with no elements adds nothing to the sums (the official mean of an empty tensor is NaN), and
a task whose masked unified vector is zero everywhere gets λ_t = 1 (its θ̂_t is θ0 whatever λ_t;
the official 0/0 is NaN).

Everything is computed in **one pass** over the tensors (:func:`emr_merge`): each tensor (or row
chunk of a large tensor, with the engine's reader, prefetch and NaN/Inf check) gives τ_uni and the
masks at once, and both sums of every λ_t are accumulated in the same pass. The sums use float64
(the official code accumulates per-tensor fp32 means in fp32; λ agrees to ~1e-7 relative).

**The bundle** (``emr_merge(..., out=folder)``, read back with :func:`load_emr_bundle`)::

    folder/emr.json                      tasks, λ_t (exact float64), base path, heads, fingerprints
    folder/unified/model*.safetensors    τ_uni per merged tensor, in θ0's dtype
    folder/masks/model*.safetensors      per merged tensor: uint8 (N, ⌈numel/8⌉), 1 bit per entry
    folder/heads/<task>.safetensors      each task's head tensors (when ``heads`` are given)
    folder/tasks/<task>/                 with ``export_per_task``: each θ̂_t as a normal checkpoint

Why τ_uni plus a reference to the base, and not the "unified model" θ0 + τ_uni: θ̂_t needs θ0
itself wherever M_t = 0, so θ0 + τ_uni alone cannot rebuild any task, and storing both would double
the bundle. τ_uni is stored exactly as computed (no θ0 + τ − θ0 cancellation); in θ0's dtype, whose
rounding of τ_uni is below the rounding of θ̂_t to that same dtype (|λ τ_uni| ≪ |θ0|); fp32
checkpoints (the official ViT setting) round-trip exactly. The base is referenced by path and, per
tensor, by a BLAKE2 fingerprint of its fp32 values taken during the pass: materialising a task
against a different base fails with the tensor's name instead of producing a wrong model. So the
bundle is ≈ one model in θ0's dtype plus N·numel/8 bytes of masks (plus heads).

Masks are packed with numpy's default (big-endian) bit order: ``numpy.unpackbits(row)[:numel]``
reads task t's mask of a tensor from row t of its ``masks`` entry.

Example:
    >>> bundle = emr_merge(base, [ft_a, ft_b], tasks=["a", "b"])          # doctest: +SKIP
    >>> theta_a = bundle.task("a")                                        # doctest: +SKIP
    >>> emr_merge("base/", ["a/", "b/"], out="emr-bundle")                # doctest: +SKIP
    >>> export_per_task(load_emr_bundle("emr-bundle"), "per-task")        # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DistacError
from ..io import (
    DEFAULT_SHARD_BYTES,
    BackgroundWriter,
    ShardWriter,
    atomic_dir,
    copy_model_files,
    open_checkpoint,
    parse_size,
)
from ..io.readers import Checkpoint
from ..methods.base import Method
from ..nn.models import default_device
from ..progress import Progress, track
from ..taskvector import match_heads
from ..tensors import DictSource, TensorSource, check_compatible
from .config import UNSAFE_NAME_CHARS, default_name
from .engine import DEFAULT_CHUNK_BYTES
from .pieces import BufferPool, Work, load_piece, split_rows, stream

__all__ = [
    "EMR",
    "EMRBundle",
    "bundle_card",
    "describe_emr",
    "emr_merge",
    "emr_piece",
    "export_per_task",
    "load_emr_bundle",
    "pack_bits",
    "unpack_bits",
]

FORMAT = "distac-emr/1"
MANIFEST = "emr.json"
_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' default (big-endian) order

Source = TensorSource | Mapping[str, Tensor] | str | Path


# ----------------------------------------------------------------------------------------------
# the method's record: what the merge config, the model card and ``distac methods`` show
# ----------------------------------------------------------------------------------------------
def _not_per_tensor(base: Tensor, deltas: Tensor, *, ctx: Any) -> Tensor:
    # EMR's λ_t sums over every tensor, and its result is one model per task: the per-tensor
    # engine cannot run it, so the record only describes it and ``merge_checkpoints`` calls emr_merge
    raise DistacError(
        "method 'emr' is not a per-tensor merge (it writes a bundle, one model per task); "
        "run it with `distac merge` or distac.merging.emr.emr_merge"
    )


#: EMR-Merging's record: outside ``distac.METHODS`` (not one model, not per tensor), read by
#: ``load_config`` (``merge_method: emr``), the model card and ``distac methods``.
EMR = Method(
    name="emr",
    fn=_not_per_tensor,
    summary="bundle: one model per task, needs the task id at inference. τ_uni = γ ⊙ max_t |M_t ⊙ τ_t| "
    "with γ = sign(mean_t τ_t), 1-bit masks M_t = [τ_t · γ > 0] and rescalers λ_t; task t is "
    "θ0 + λ_t · M_t ⊙ τ_uni",
    paper="Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024 (arXiv 2405.17461)",
    notes="γ = −1 where mean_t τ_t is exactly 0, as in the official code; λ_t = Σ_l mean|τ_t,l| / "
    "Σ_l mean|M_t,l ⊙ τ_uni,l| (sums over tensors of per-tensor means, accumulated in float64), 1 where "
    "the denominator is 0; heads are not merged (each task keeps its own); int buffers stay θ0's",
    memory="N+1 fp32 copies of one piece (row chunks of large tensors); the bundle is one model in the "
    "base's dtype + N bits per parameter",
)


def describe_emr(full: bool = False) -> list[str]:
    """The lines ``distac methods`` prints for EMR; ``full`` (``distac methods emr``) adds formula and layout.

    Example:
        >>> describe_emr()[0]
        'emr  (bundle: one model per task, needs the task id at inference; 1+ models; no parameters)'
    """
    lines = [
        f"{EMR.name}  (bundle: one model per task, needs the task id at inference; 1+ models; no parameters)",
        f"    {EMR.paper}",
    ]
    if not full:
        return lines
    return [
        *lines,
        f"    {EMR.summary}",
        f"    convention: {EMR.notes}",
        f"    memory: {EMR.memory}",
        "    output: OUT/emr.json (tasks, exact λ_t, base path, base fingerprints), OUT/unified/ (τ_uni in the "
        "base's dtype), OUT/masks/ (uint8 (N, ⌈numel/8⌉) per tensor), OUT/heads/<task>.safetensors, README.md, "
        "distac_config.yml; --export-per-task adds OUT/tasks/<task>/, each θ̂_t as a normal checkpoint",
        "    use: distac.merging.emr.load_emr_bundle(OUT).task(name), or `distac export-tasks OUT --out DIR`",
        "    parameters: none (tuning-free); dtype/out_dtype are refused: the bundle keeps the base's dtype",
    ]


# ----------------------------------------------------------------------------------------------
# the formulas, on one piece
# ----------------------------------------------------------------------------------------------
def emr_piece(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EMR on the task vectors of one tensor (or row chunk), shape (N, *S).

    Args:
        deltas: the task vectors τ_t, fp32.

    Returns:
        ``(tau_uni, masks, abs_sums, masked_sums)``: τ_uni (flat, numel of S), the masks M_t as a
        bool (N, numel), and per task the float64 sums Σ|τ_t| and Σ|M_t ⊙ τ_uni| over the piece
        (the λ_t numerator and denominator before the per-tensor division by numel).

    Example:
        >>> uni, m, a, b = emr_piece(torch.tensor([[1.0, -2.0, 0.0], [-3.0, 1.0, -1.0]]))
        >>> uni.tolist(), m.tolist()  # means -1, -0.5, -0.5 -> γ = -1 everywhere
        ([-3.0, -2.0, -1.0], [[False, True, False], [True, False, True]])
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    # official: (mean > 0) * 2 - 1, so an exact zero mean gives γ = -1 (the mean, not the sum:
    # mean = sum / N can underflow to 0 where the sum does not)
    sign = torch.where(flat.mean(0) > 0, 1.0, -1.0)
    masks = flat * sign > 0
    eps = torch.where(masks, flat.abs(), 0.0).amax(0)
    uni = sign * eps
    abs_sums = flat.abs().sum(1, dtype=torch.float64)
    masked_sums = torch.where(masks, eps, 0.0).sum(1, dtype=torch.float64)
    return uni, masks, abs_sums, masked_sums


def pack_bits(masks: Tensor) -> Tensor:
    """Pack a bool (N, k) into uint8 (N, ⌈k/8⌉), 8 entries per byte, numpy's big-endian bit order.

    Example:
        >>> pack_bits(torch.tensor([[True, False, True]])).tolist()
        [[160]]
    """
    n, k = masks.shape
    pad = (-k) % 8
    bits = masks.to(torch.uint8)
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=masks.device)
    return (bits.view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits` for one row: uint8 (⌈numel/8⌉,) -> bool (numel,).

    Example:
        >>> unpack_bits(torch.tensor([160], dtype=torch.uint8), 3).tolist()
        [True, False, True]
    """
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel].bool()


def rescalers(abs_means: Tensor, masked_means: Tensor) -> Tensor:
    """λ_t = Σ_l mean|τ_t,l| / Σ_l mean|M_t,l ⊙ τ_uni,l|; 1 where the denominator is 0 (θ̂_t = θ0 anyway)."""
    return torch.where(masked_means > 0, abs_means / masked_means.clamp_min(1e-300), 1.0)


def _fingerprint() -> Any:
    return hashlib.blake2b(digest_size=16)


def _fp32_bytes(t: Tensor) -> Any:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy()


# ----------------------------------------------------------------------------------------------
# the one streaming pass
# ----------------------------------------------------------------------------------------------
def _row_ranges(shape: Sequence[int], n_inputs: int, chunk_bytes: int | None) -> list[tuple[int, int]] | None:
    """The engine's row split, with every chunk but the last holding a multiple of 8 entries.

    Then each chunk's masks pack into whole bytes, and the packed chunks simply concatenate.
    """
    ranges = split_rows(shape, n_inputs, chunk_bytes)
    if ranges is None:
        return None
    row = int(torch.Size(shape[1:]).numel())
    unit = 8 // math.gcd(row, 8) if row else 1
    step = max(unit, (ranges[0][1] - ranges[0][0]) // unit * unit)
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


@dataclass
class _TensorState:
    """What the pass accumulates for the tensor whose chunks are being read."""

    packed: list[Tensor] = field(default_factory=list)
    abs_sums: Tensor | None = None
    masked_sums: Tensor | None = None
    hasher: Any = field(default_factory=_fingerprint)

    def add(self, abs_sums: Tensor, masked_sums: Tensor) -> None:
        self.abs_sums = abs_sums if self.abs_sums is None else self.abs_sums + abs_sums
        self.masked_sums = masked_sums if self.masked_sums is None else self.masked_sums + masked_sums


@dataclass
class _PassResult:
    abs_means: Tensor  # (N,) float64: Σ_l mean|τ_t,l|
    masked_means: Tensor  # (N,) float64: Σ_l mean|M_t,l ⊙ τ_uni,l|
    fingerprints: dict[str, str]


def _emr_pass(
    base: TensorSource,
    models: Sequence[TensorSource],
    names: Sequence[str],
    *,
    on_unified: Callable[[str, Tensor], None],
    on_masks: Callable[[str, Tensor], None],
    device: torch.device,
    chunk_bytes: int | None,
    prefetch: bool = False,
    on_piece: Callable[[int, bool], None] | None = None,
) -> _PassResult:
    """Read every merged tensor once (in row chunks when large), emit τ_uni and packed masks, sum for λ."""
    n = len(models)
    work = []
    for k in names:
        ranges = _row_ranges(base.shape(k), n + 1, chunk_bytes)
        work.extend([Work(k)] if ranges is None else [Work(k, r) for r in ranges])
    pool = BufferPool(2 if prefetch else 1, device)
    abs_means = torch.zeros(n, dtype=torch.float64)
    masked_means = torch.zeros(n, dtype=torch.float64)
    fingerprints: dict[str, str] = {}
    state = _TensorState()
    for item in stream(
        work,
        lambda w: load_piece(base, models, w, {}, device, pool),
        prefetch=prefetch,
        release=lambda x: pool.give(x.buffer),
    ):
        name, rows = item.work.name, item.work.rows
        assert item.deltas is not None
        uni, masks, abs_sums, masked_sums = emr_piece(item.deltas)
        state.hasher.update(_fp32_bytes(item.base))
        state.add(abs_sums.cpu(), masked_sums.cpu())
        state.packed.append(pack_bits(masks).cpu())
        on_unified(name, uni.view(item.base.shape))
        last = rows is None or rows[1] == base.shape(name)[0]
        if last:
            numel = _numel(base.shape(name))
            if numel:  # an empty tensor adds nothing (the official mean of it is NaN)
                assert state.abs_sums is not None and state.masked_sums is not None
                abs_means += state.abs_sums / numel
                masked_means += state.masked_sums / numel
            on_masks(name, torch.cat(state.packed, dim=1))
            fingerprints[name] = state.hasher.hexdigest()
            state = _TensorState()
        if on_piece is not None:
            on_piece(item.nbytes, last)
    return _PassResult(abs_means, masked_means, fingerprints)


# ----------------------------------------------------------------------------------------------
# the bundle: in memory or on disk, one way to materialise a task
# ----------------------------------------------------------------------------------------------
@dataclass
class EMRBundle:
    """An EMR merge: θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni for each task t, materialised on demand.

    ``unified`` holds τ_uni and ``masks`` the packed masks of every merged tensor; ``base`` is θ0;
    ``heads`` each task's own head tensors. :meth:`task` builds one task's full state dict (CPU,
    θ0's dtypes, the base's key order); :meth:`iter_task` yields it tensor by tensor.
    """

    tasks: list[str]
    rescalers: Tensor  # (N,) float64
    base: TensorSource
    unified: TensorSource
    masks: TensorSource
    heads: dict[str, TensorSource]
    head_names: list[str]
    fingerprints: dict[str, str]
    base_path: str | None = None
    path: Path | None = None  # the bundle folder, when loaded from disk

    def index(self, which: int | str) -> int:
        """The position of a task given by name or index; a clear error for anything else."""
        if isinstance(which, str):
            if which not in self.tasks:
                raise DistacError(f"EMR bundle has no task {which!r}; its tasks are {self.tasks}")
            return self.tasks.index(which)
        if isinstance(which, bool) or not isinstance(which, int) or not -len(self.tasks) <= which < len(self.tasks):
            raise DistacError(f"EMR bundle task index {which!r} is out of range: it has {len(self.tasks)} tasks")
        return which % len(self.tasks)

    def _merged(self, name: str, t: int) -> Tensor:
        theta0 = self.base.get(name)
        b32 = theta0.to(torch.float32)
        h = _fingerprint()
        h.update(_fp32_bytes(b32))
        if h.hexdigest() != self.fingerprints.get(name):
            where = self.base_path or getattr(self.base, "label", "the base")
            raise DistacError(
                f"{where}: tensor '{name}' differs from the base this EMR bundle was built from; "
                "pass the original base (load_emr_bundle(path, base=...))"
            )
        mask = unpack_bits(self.masks.get(name)[t], b32.numel()).view(b32.shape)
        uni = self.unified.get(name).to(torch.float32)
        lam = float(self.rescalers[t])
        return (b32 + (uni * mask) * lam).to(theta0.dtype)

    def _tensors(self, which: int | str) -> Iterator[tuple[str, Tensor, bool]]:
        """``(name, tensor, fresh)`` of θ̂_t in the base's order; ``fresh``: built here, nobody else holds it."""
        t = self.index(which)
        merged = set(self.unified.keys())
        head_src = self.heads.get(self.tasks[t])
        head_set = set(self.head_names)
        for name in self.base.keys():
            if name in head_set:
                assert head_src is not None
                yield name, head_src.get(name), False
            elif name in merged:
                yield name, self._merged(name, t), True
            else:
                yield name, self.base.get(name), False

    def iter_task(self, which: int | str) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` of θ̂_t in the base's order, one tensor in memory at a time.

        Heads and int buffers may be the sources' own tensors: copy them before editing in place.
        """
        for name, v, _ in self._tensors(which):
            yield name, v

    def task(self, which: int | str) -> dict[str, Tensor]:
        """θ̂_t as a full state dict (task by name or index); its tensors alias nothing else.

        Example:
            >>> theta = load_emr_bundle("emr-bundle").task("cars")  # doctest: +SKIP
        """
        return {k: v if fresh else v.clone() for k, v, fresh in self._tensors(which)}

    def close(self) -> None:
        """Close the files a loaded bundle reads (a later :meth:`task` reopens them)."""
        for src in (self.base, self.unified, self.masks, *self.heads.values()):
            close = getattr(src, "close", None)
            if close is not None:
                close()


# ----------------------------------------------------------------------------------------------
# inputs: paths, state dicts, sources
# ----------------------------------------------------------------------------------------------
def _as_source(x: Source, label: str) -> tuple[TensorSource, Path | None]:
    """A ``TensorSource`` for a path (opened lazily), a state dict or a source, and its path if any."""
    if isinstance(x, str | Path):
        path = Path(x).expanduser().resolve()
        return open_checkpoint(path), path
    if isinstance(x, Mapping):
        return DictSource(x, label), None
    own = getattr(x, "path", None)  # a Checkpoint: recorded absolute, so the bundle loads from anywhere
    return x, Path(own).expanduser().resolve() if own is not None else None


def _task_names(tasks: Sequence[str] | None, paths: Sequence[Path | None]) -> list[str]:
    names = list(tasks) if tasks is not None else [default_name(p) if p else f"task{i}" for i, p in enumerate(paths)]
    if len(names) != len(paths):
        raise DistacError(f"emr_merge: {len(names)} task names for {len(paths)} models; give one name per model")
    for nm in names:
        if not isinstance(nm, str) or not nm or nm.startswith(".") or UNSAFE_NAME_CHARS.search(nm):
            raise DistacError(f"emr_merge: task name {nm!r} may only use letters, digits, '.', '_' and '-'")
    dup = sorted({nm for nm in names if names.count(nm) > 1})
    if dup:
        raise DistacError(f"emr_merge: task names {dup} are used twice; give each model its own name")
    return names


def _plan(base: TensorSource, models: Sequence[TensorSource], heads: Sequence[str] | None) -> tuple[list, list]:
    """(merged tensor names, head tensor names), both in the base's order."""
    if not models:
        raise DistacError("emr_merge needs at least one fine-tuned model")
    for m in models:
        check_compatible(base, m, base_label=f"the base {base.label}")
    head_set = match_heads(base.keys(), heads)
    if heads and not head_set:
        raise DistacError(f"heads patterns {list(heads)} match no tensor of {base.label}")
    keys = base.keys()
    merged = [k for k in keys if k not in head_set and base.dtype(k).is_floating_point]
    return merged, [k for k in keys if k in head_set]


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def emr_merge(
    base: Source,
    models: Sequence[Source],
    *,
    tasks: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    export_per_task: bool = False,
    device: torch.device | str | None = None,
    chunk_bytes: int | str | None = DEFAULT_CHUNK_BYTES,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    quiet: bool = False,
    finish: Callable[[Path, EMRBundle], None] | None = None,
) -> EMRBundle:
    """EMR-Merging in one streaming pass; in memory, or written as a bundle folder when ``out`` is given.

    Args:
        base: θ0 as a path (any form :func:`distac.open_checkpoint` reads), a state dict or a ``TensorSource``.
        models: the fine-tuned models, same forms; one task each.
        tasks: one name per model (default: the folder/file names for paths, else ``task0``, ``task1``...).
        heads: name patterns of task-specific tensors (globs or ``re:``): not merged, each task keeps its own.
        out: the bundle folder to write (atomically; refused if it exists unless ``overwrite``).
        overwrite: replace an existing distac output at ``out``.
        export_per_task: with ``out``, also write ``out/tasks/<task>/``, each θ̂_t as a normal checkpoint.
        device: where to compute (default: CUDA when available, else CPU).
        chunk_bytes: budget for one piece's N+1 fp32 copies; larger tensors are read in row chunks.
        max_shard_bytes: the largest safetensors shard of the bundle.
        quiet: no progress bar.
        finish: with ``out``, called with the temporary folder and its bundle before the folder is
            renamed into place, to add files (``distac merge`` writes its model card and config).

    Returns:
        The :class:`EMRBundle` (read back from ``out`` when given).

    Example:
        >>> b = emr_merge(base_sd, [sd_a, sd_b], tasks=["a", "b"])  # doctest: +SKIP
        >>> b.rescalers, b.task("b")["layer.weight"]               # doctest: +SKIP
    """
    if (export_per_task or finish is not None) and out is None:
        raise DistacError(f"emr_merge: {'export_per_task' if export_per_task else 'finish'} needs out=FOLDER")
    dev = default_device(device)
    chunk = None if chunk_bytes is None else parse_size(chunk_bytes)
    with ExitStack() as opened:
        pairs = [_as_source(x, "base" if i == 0 else f"model {i - 1}") for i, x in enumerate([base, *models])]
        for (src, _), x in zip(pairs, [base, *models], strict=True):
            if isinstance(x, str | Path) and isinstance(src, Checkpoint):
                opened.enter_context(closing(src))  # files distac opened are closed here, whatever happens
        (base_src, base_path), srcs = pairs[0], pairs[1:]
        names = _task_names(tasks, [p for _, p in srcs])
        model_srcs = [s for s, _ in srcs]
        merged, head_names = _plan(base_src, model_srcs, heads)
        if out is None:
            # the bundle keeps reading θ0 after this function returns: give it its own handle
            keep = open_checkpoint(base_path) if isinstance(base, str | Path) and base_path else base_src
            res, unified, masks = _in_memory_pass(base_src, model_srcs, merged, dev, chunk)
            own_heads: dict[str, TensorSource] = {}
            for t, m in zip(names, model_srcs, strict=True):
                if head_names:  # cloned: the bundle must not alias (or keep open) the caller's models
                    own_heads[t] = DictSource({k: m.get(k).clone() for k in head_names}, t)
            lam = rescalers(res.abs_means, res.masked_means)
            return EMRBundle(
                names,
                lam,
                keep,
                DictSource(unified, "unified"),
                DictSource(masks, "masks"),
                own_heads,
                head_names,
                res.fingerprints,
                str(base_path) if base_path else None,
            )
        inputs = [p for p in (base_path, *(p for _, p in srcs)) if p is not None]
        with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
            _write_bundle(
                tmp, base_src, model_srcs, names, merged, head_names, base_path, dev, chunk, max_shard_bytes, quiet
            )
            if export_per_task or finish is not None:
                written = load_emr_bundle(tmp, base=base_src)
                if export_per_task:
                    (tmp / "tasks").mkdir()
                    _export_into(written, tmp / "tasks", parse_size(max_shard_bytes), quiet)
                if finish is not None:
                    finish(tmp, written)
    return load_emr_bundle(out, base=None if isinstance(base, str | Path) else base)


def _in_memory_pass(
    base: TensorSource, models: Sequence[TensorSource], merged: list[str], device: torch.device, chunk: int | None
) -> tuple[_PassResult, dict[str, Tensor], dict[str, Tensor]]:
    """The pass with τ_uni (in θ0's dtypes, on the CPU) and the packed masks kept in dicts."""
    parts: dict[str, list[Tensor]] = {}
    masks: dict[str, Tensor] = {}

    def keep_unified(name: str, piece: Tensor) -> None:
        parts.setdefault(name, []).append(piece.to(device="cpu", dtype=base.dtype(name)))

    res = _emr_pass(
        base, models, merged, on_unified=keep_unified, on_masks=masks.__setitem__, device=device, chunk_bytes=chunk
    )
    unified = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
    return res, unified, masks


def _write_bundle(
    tmp: Path,
    base: TensorSource,
    models: Sequence[TensorSource],
    tasks: list[str],
    merged: list[str],
    head_names: list[str],
    base_path: Path | None,
    device: torch.device,
    chunk: int | None,
    max_shard_bytes: int | str,
    quiet: bool,
) -> None:
    """Stream the pass into ``tmp``: unified/ and masks/ shards, heads/, emr.json, README.md."""
    n = len(models)
    shard = parse_size(max_shard_bytes)
    (tmp / "unified").mkdir()
    (tmp / "masks").mkdir()
    meta = {"distac_method": "emr"}
    layout = [(k, base.shape(k), base.dtype(k)) for k in merged]
    unified = BackgroundWriter(ShardWriter(tmp / "unified", layout, max_shard_bytes=shard, metadata=meta))
    mask_layout = [(k, (n, -(-_numel(base.shape(k)) // 8)), torch.uint8) for k in merged]
    masks = ShardWriter(tmp / "masks", mask_layout, max_shard_bytes=shard, metadata=meta)
    in_bytes = sum(_numel(base.shape(k)) * base.dtype(k).itemsize * (n + 1) for k in merged)
    with Progress(total_bytes=in_bytes, total_items=len(merged), desc="merge (emr)", quiet=quiet) as bar:
        try:
            res = _emr_pass(
                base,
                models,
                merged,
                on_unified=unified.write,
                on_masks=masks.write,
                device=device,
                chunk_bytes=chunk,
                prefetch=True,
                on_piece=lambda nbytes, done: bar.update(nbytes=nbytes, items=int(done)),
            )
            unified.close()
            masks.close()
        except BaseException:
            unified.abort()
            masks.abort()
            raise
    if head_names:
        (tmp / "heads").mkdir()
        for t, m in zip(tasks, models, strict=True):
            save_file({k: m.get(k).contiguous() for k in head_names}, str(tmp / "heads" / f"{t}.safetensors"))
    lam = rescalers(res.abs_means, res.masked_means)
    manifest = {
        "format": FORMAT,
        "tasks": tasks,
        "rescalers": [float(x) for x in lam],  # json writes repr(float): float64 round-trips exactly
        "base": str(base_path) if base_path else None,
        "heads": head_names,
        "mask_bit_order": "big",
        "fingerprint": "blake2b-128 of each base tensor's float32 values",
        "fingerprints": res.fingerprints,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (tmp / "README.md").write_text(_card(tasks, lam, base_path, bool(head_names)))


def _numel(shape: Sequence[int]) -> int:
    return int(torch.Size(shape).numel())


def _card(tasks: Sequence[str], lam: Tensor, base_path: Path | None, heads: bool) -> str:
    return "# EMR-Merging bundle (distac)\n\n" + _usage(tasks, lam, base_path, heads=heads)


def _usage(tasks: Sequence[str], lam: Tensor, base_path: Path | str | None, *, heads: bool) -> str:
    rows = "\n".join(f"| {t} | {float(x):.6g} |" for t, x in zip(tasks, lam, strict=True))
    own = "; each task keeps its own head (`heads/<task>.safetensors`)" if heads else ""
    return (
        "Not one model: task t is θ0 + λ_t · M_t ⊙ τ_uni (Huang et al., EMR-Merging, NeurIPS 2024, "
        f"arXiv 2405.17461){own}.\n"
        "Load it with `distac.merging.emr.load_emr_bundle(path).task(name)`, or export every task as a normal "
        "checkpoint with `distac export-tasks path --out DIR` (`distac.merging.emr.export_per_task(path, out)`).\n\n"
        f"Base model: `{base_path or 'given in memory: pass base= when loading'}`\n\n"
        f"| task | λ_t |\n|---|---|\n{rows}\n"
    )


def bundle_card(bundle: EMRBundle) -> str:
    """The model card's section for a bundle: what it is, how to load or export it, the base and each λ_t.

    Example:
        >>> "| a |" in bundle_card(emr_merge(base_sd, [sd_a], tasks=["a"]))  # doctest: +SKIP
        True
    """
    return "## EMR-Merging bundle\n\n" + _usage(
        bundle.tasks, bundle.rescalers, bundle.base_path, heads=bool(bundle.head_names)
    )


def load_emr_bundle(path: str | Path, *, base: Source | None = None) -> EMRBundle:
    """Open a bundle written by :func:`emr_merge` (lazily: tensors are read when a task is built).

    Args:
        path: the bundle folder.
        base: θ0 (path, state dict or source); default: the base path recorded in the bundle.

    Returns:
        The :class:`EMRBundle`.

    Example:
        >>> sd = load_emr_bundle("emr-bundle").task(0)  # doctest: +SKIP
    """
    folder = Path(path)
    man = _read_manifest(folder)
    if base is None and not man["base"]:
        raise DistacError(f"{folder}: the bundle was built from an in-memory base; pass base= to load it")
    base_src, base_path = _as_source(base if base is not None else man["base"], "base")
    heads: dict[str, TensorSource] = {}
    if man["heads"]:
        heads = {t: open_checkpoint(folder / "heads" / f"{t}.safetensors") for t in man["tasks"]}
    return EMRBundle(
        list(man["tasks"]),
        torch.tensor(man["rescalers"], dtype=torch.float64),
        base_src,
        open_checkpoint(folder / "unified"),
        open_checkpoint(folder / "masks"),
        heads,
        list(man["heads"]),
        dict(man["fingerprints"]),
        str(base_path) if base_path else man["base"],
        folder,
    )


def _read_manifest(folder: Path) -> dict[str, Any]:
    f = folder / MANIFEST
    try:
        man = json.loads(f.read_text())
    except FileNotFoundError:
        raise DistacError(
            f"{folder}: not an EMR bundle (no {MANIFEST}); write one with emr_merge(..., out=...)"
        ) from None
    except (OSError, ValueError) as e:
        raise DistacError(f"{f}: cannot read the EMR manifest ({e})") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        found = man.get("format") if isinstance(man, dict) else None
        raise DistacError(f"{f}: not a {FORMAT} manifest (format {found!r})")
    missing = [k for k in ("tasks", "rescalers", "base", "heads", "fingerprints") if k not in man]
    if missing or len(man["tasks"]) != len(man["rescalers"]):
        raise DistacError(f"{f}: damaged EMR manifest (missing {missing}, or not one λ per task)")
    return man


def _export_into(bundle: EMRBundle, folder: Path, shard: int, quiet: bool) -> dict[str, Path]:
    """Write each task's θ̂_t into ``folder/<task>/`` (``folder`` exists, inside an atomic folder)."""
    base = bundle.base
    head_src = next(iter(bundle.heads.values()), None)
    head_set = set(bundle.head_names)

    def dtype(k: str) -> torch.dtype:
        return head_src.dtype(k) if head_src is not None and k in head_set else base.dtype(k)

    layout = [(k, base.shape(k), dtype(k)) for k in base.keys()]
    base_folder = Path(bundle.base_path) if bundle.base_path else None
    result = {}
    for t in track(bundle.tasks, desc="export (emr)", unit="task", quiet=quiet):
        dst = folder / t
        dst.mkdir()
        writer = ShardWriter(dst, layout, max_shard_bytes=shard, metadata={"distac_method": "emr", "distac_task": t})
        try:
            for k, v in bundle.iter_task(t):
                writer.write(k, v)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if base_folder is not None and base_folder.is_dir():
            copy_model_files(base_folder, dst)
        result[t] = dst
    return result


def export_per_task(
    bundle: EMRBundle | str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    quiet: bool = False,
) -> dict[str, Path]:
    """Write every task's θ̂_t as a normal checkpoint folder ``out/<task>/`` (safetensors, HF shard names).

    The base's config/tokenizer files are copied in when the base is a folder, so each task folder
    loads like the base. Written atomically through the one output policy.

    Args:
        bundle: an :class:`EMRBundle` or a bundle folder.
        out: the folder to create (refused if it exists unless ``overwrite``).
        overwrite: replace an existing distac output at ``out``.
        max_shard_bytes: the largest shard.
        quiet: no progress bar.

    Returns:
        ``{task: folder}``.

    Example:
        >>> export_per_task("emr-bundle", "per-task")  # doctest: +SKIP
    """
    b = load_emr_bundle(bundle) if isinstance(bundle, str | Path) else bundle
    inputs = [p for p in (b.path, b.base_path) if p is not None]
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        _export_into(b, tmp, parse_size(max_shard_bytes), quiet)
    return {t: Path(out) / t for t in b.tasks}

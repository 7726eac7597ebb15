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

The result is an :class:`~distac.merging.emr_bundle.EMRBundle`, in memory or written as a bundle
folder (``out=``); its format, loading and per-task export live in :mod:`distac.merging.emr_bundle`
and are re-exported here.

Example:
    >>> bundle = emr_merge(base, [ft_a, ft_b], tasks=["a", "b"])          # doctest: +SKIP
    >>> theta_a = bundle.task("a")                                        # doctest: +SKIP
    >>> emr_merge("base/", ["a/", "b/"], out="emr-bundle")                # doctest: +SKIP
    >>> export_per_task(load_emr_bundle("emr-bundle"), "per-task")        # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DistacError
from ..io import DEFAULT_SHARD_BYTES, BackgroundWriter, ShardWriter, atomic_dir, open_checkpoint, parse_size
from ..io.readers import Checkpoint
from ..methods.base import Method
from ..nn.models import default_device
from ..progress import Progress
from ..taskvector import match_heads
from ..tensors import DictSource, TensorSource, check_compatible
from .config import UNSAFE_NAME_CHARS, default_name
from .emr_bundle import (
    FORMAT,
    MANIFEST,
    EMRBundle,
    Source,
    as_source,
    bundle_card,
    export_into,
    export_per_task,
    fp32_bytes,
    load_emr_bundle,
    new_fingerprint,
    numel_of,
    pack_bits,
    unpack_bits,
    write_heads,
    write_manifest,
)
from .engine import DEFAULT_CHUNK_BYTES
from .pieces import BufferPool, Work, load_piece, split_rows, stream

__all__ = [
    "EMR",
    "FORMAT",
    "MANIFEST",
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


def rescalers(abs_means: Tensor, masked_means: Tensor) -> Tensor:
    """λ_t = Σ_l mean|τ_t,l| / Σ_l mean|M_t,l ⊙ τ_uni,l|; 1 where the denominator is 0 (θ̂_t = θ0 anyway)."""
    return torch.where(masked_means > 0, abs_means / masked_means.clamp_min(1e-300), 1.0)


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
    hasher: Any = field(default_factory=new_fingerprint)

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
        state.hasher.update(fp32_bytes(item.base))
        state.add(abs_sums.cpu(), masked_sums.cpu())
        state.packed.append(pack_bits(masks).cpu())
        on_unified(name, uni.view(item.base.shape))
        last = rows is None or rows[1] == base.shape(name)[0]
        if last:
            numel = numel_of(base.shape(name))
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
        check_compatible(base, m, base_label=f"the base {base.label}", buffers_from_base=True)
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
        pairs = [as_source(x, "base" if i == 0 else f"model {i - 1}") for i, x in enumerate([base, *models])]
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
                    export_into(written, tmp / "tasks", parse_size(max_shard_bytes), quiet)
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
    """Stream the pass into ``tmp``: unified/ and masks/ shards, then heads/, emr.json and README.md."""
    n = len(models)
    shard = parse_size(max_shard_bytes)
    (tmp / "unified").mkdir()
    (tmp / "masks").mkdir()
    meta = {"distac_method": "emr"}
    layout = [(k, base.shape(k), base.dtype(k)) for k in merged]
    unified = BackgroundWriter(ShardWriter(tmp / "unified", layout, max_shard_bytes=shard, metadata=meta))
    mask_layout = [(k, (n, -(-numel_of(base.shape(k)) // 8)), torch.uint8) for k in merged]
    masks = ShardWriter(tmp / "masks", mask_layout, max_shard_bytes=shard, metadata=meta)
    in_bytes = sum(numel_of(base.shape(k)) * base.dtype(k).itemsize * (n + 1) for k in merged)
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
    write_heads(tmp, tasks, models, head_names)
    lam = rescalers(res.abs_means, res.masked_means)
    write_manifest(tmp, tasks, lam, base_path, head_names, res.fingerprints)

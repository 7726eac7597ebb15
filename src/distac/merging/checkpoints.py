"""Merging checkpoints on disk: ``merge_checkpoints`` (config -> output folder), heads, per-task export.

Every merge writes the merged weights (HF shard names), the base's ``config.json``/tokenizer files,
``heads/<name>.safetensors`` per model when the config has ``heads``, a model card (``README.md``:
method, paper, resolved parameters, the config) and ``distac_config.yml`` (the config with
absolute paths, re-runnable as is). The output goes through :mod:`distac.io.atomic`: a temporary
folder next to ``out``, renamed when complete, never touching an input. ``merge_method: emr``
writes an EMR-Merging bundle instead (:mod:`distac.merging.emr`: one model per task), with the
same card and config.

A model entry's ``prefix`` (``{"bert.": ""}``: its names to the base's; ``null`` leaves tensors
out) is applied when the model is opened, as a :class:`~distac.tensors.RenamedSource`; its
statistics sidecars, keyed like the model as saved, are checked against it as saved and renamed
the same way. With ``out_dtype``, the copied ``config.json`` names the dtype written
(:func:`distac.io.writer.update_model_config`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DistacError
from ..io import (
    DEFAULT_SHARD_BYTES,
    BackgroundWriter,
    Checkpoint,
    ShardWriter,
    atomic_dir,
    check_output,
    copy_model_files,
    open_checkpoint,
    parse_size,
    update_model_config,
)
from ..io.lora import AdapterSource, is_adapter, open_model
from ..nn.models import default_device
from ..progress import Progress, track
from ..taskvector import match_heads
from ..tensors import RenamedSource, TensorSource
from .card import write_card, write_task_card
from .config import STAT_KEYS, MergeConfig, ModelSpec, load_config
from .emr import EMR, EMRBundle, bundle_card, emr_merge
from .engine import DEFAULT_CHUNK_BYTES, ZeroReference, check_finite_output, run_merge
from .lora_out import LoraWriter
from .slices import is_slices_config, merge_slices
from .temperatures import read_temperatures
from .vocab import Vocab, align_models, finish_tokenizer

__all__ = ["export_task_models", "merge_checkpoints"]


def _input_paths(cfg: MergeConfig) -> list[Path]:
    """Every file the merge reads: the YAML config, models and statistics sidecars (the output may not touch them)."""
    specs = [cfg.base, *cfg.models]
    config = [cfg.source] if cfg.source is not None else []
    adapters = [s.adapter for s in specs if s.adapter is not None]
    return config + adapters + [p for s in specs for p in (s.path, *s.stats.values())]


def _open_sidecar(path: Path, key: str, what: str, model: TensorSource) -> Checkpoint:
    """Open a statistics file once, lazily, after checking it against the model it was computed on.

    A ``distac.stats`` sidecar must hold the right kind of statistic, on the sum scale for Fishers,
    with the model's keys and shapes, and the model's fingerprint (:func:`distac.stats.open_sidecar`
    with ``check_values=False``: it reads its header once, and the ≤ 64 sampled rows per tensor of
    the fingerprint, not the model; the methods check the values as they merge). A plain
    safetensors file keyed like the model is taken as is."""
    from ..stats.sidecar import open_sidecar

    try:
        sc = open_sidecar(
            path,
            use=key,
            model=model,
            scale="sum" if key == "fisher" else None,
            label=f"{what} ({path})",
            role="the config",
        )
    except DistacError as e:
        raise DistacError(f"{e} (the {what}, checked against {model.label})") from None
    return sc.source


def _renamed(
    src: TensorSource, prefix: Mapping[str, str | None], what: str, *, check_used: bool = True
) -> TensorSource:
    """``src`` under the base's names: a model entry's ``prefix`` mapping applied (nothing is copied).

    Each name takes the longest prefix of the mapping it starts with: ``{"bert.": ""}`` strips
    ``bert.``, ``{"": "bert."}`` adds it, ``{"classifier.": None}`` leaves those tensors out; names
    that match no prefix keep theirs.
    ``check_used`` refuses a prefix that matches none of the names (a model's mapping; a sidecar
    may hold a subset of them).
    """
    if not prefix:
        return src
    names: dict[str, str] = {}
    used = set()
    for k in src.keys():
        p = max((p for p in prefix if k.startswith(p)), key=len, default=None)
        if p is not None:
            used.add(p)
        to = prefix[p] if p is not None else ""
        if to is None:
            continue
        new = k if p is None else to + k[len(p) :]
        if new in names:
            raise DistacError(
                f"{what}: 'prefix: {dict(prefix)}' gives two tensors the name '{new}' ('{names[new]}' and '{k}')"
            )
        names[new] = k
    unused = [p for p in prefix if p not in used]
    if check_used and unused:
        raise DistacError(f"{what}: 'prefix' {unused[0]!r} matches none of its tensors (e.g. {src.keys()[:2]})")
    return RenamedSource(src, names)


def _open_stats(
    cfg: MergeConfig, base: TensorSource, models: Sequence[TensorSource], opened: ExitStack
) -> dict[str, Any]:
    """Open statistics sidecars lazily as ``{"fisher": [..N], "base_fisher": src, "gram": [..N]}``.

    Each one is registered with ``opened`` as soon as it is open, so an error on a later one still
    closes it. A sidecar is checked against its model as saved, then seen under the base's names
    (the model entry's ``prefix``)."""
    stats: dict[str, Any] = {}

    def open_(path: Path, key: str, what: str, model: TensorSource, spec: ModelSpec | None = None) -> TensorSource:
        src = opened.enter_context(closing(_open_sidecar(path, key, what, model)))
        return _renamed(src, spec.prefix, what, check_used=False) if spec is not None else src

    for key in STAT_KEYS:
        have = [m for m in cfg.models if key in m.stats]
        if have and len(have) != len(cfg.models):
            missing = [m.name for m in cfg.models if key not in m.stats]
            raise DistacError(f"'{key}' statistics are given for some models but not for {missing}")
        if have:
            stats[key] = [
                open_(m.stats[key], key, f"{key} of {m.name}", src, m)
                for m, src in zip(cfg.models, models, strict=True)
            ]
    if "fisher" in cfg.base.stats:
        stats["base_fisher"] = open_(cfg.base.stats["fisher"], "fisher", "base fisher", base)
    # (a statistic the method needs and lacks is the engine's check, with the command to compute it)
    wanted = {s.rstrip("?") for s in cfg.method.stats}
    for key in stats:
        if key not in wanted:
            raise DistacError(
                f"method '{cfg.method.name}' does not use '{key}' statistics; remove them from the config"
            )
    return stats


def _layout(base: TensorSource, out_dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    def dt(k: str) -> torch.dtype:
        d = base.dtype(k)
        return out_dtype if out_dtype is not None and d.is_floating_point else d

    return [(k, base.shape(k), dt(k)) for k in base.keys()]


def _write_heads(
    folder: Path,
    models: Sequence[TensorSource],
    specs: Sequence[ModelSpec],
    heads: Sequence[str],
    out_dtype: torch.dtype | None,
    allow_nonfinite: bool,
) -> None:
    """``heads/<name>.safetensors``: each model's own head tensors (small; written whole).

    They are copied, not merged, so the engine's input and output checks never see them: a head
    holding NaN/Inf (or overflowing ``out_dtype``) is refused here unless ``allow_nonfinite``."""
    (folder / "heads").mkdir()
    for m, spec in zip(models, specs, strict=True):
        state = {}
        for k in heads:
            t = m.get(k)
            dtype = out_dtype if out_dtype is not None and t.is_floating_point() else t.dtype
            if not allow_nonfinite:
                check_finite_output(k, t, dtype, where=f"{m.file_of(k)} (head of {spec.name})")
            state[k] = t.to(dtype).contiguous()
        path = folder / "heads" / f"{spec.name}.safetensors"
        save_file(state, str(path), metadata={"format": "pt", "model": spec.name})


def merge_checkpoints(
    config: Mapping[str, Any] | str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    export_per_task: bool = False,
    quiet: bool = False,
    allow_nonfinite: bool = False,
    lora_rank: int | None = None,
    max_error: float | None = None,
) -> Path:
    """Merge the checkpoints a config names, streaming tensor by tensor, into ``out``; return ``out``.

    Args:
        config: a YAML path or a dict (see the module docstring).
        out: the output folder. It is written to a temporary folder next to it and renamed when
            complete; an existing folder is refused unless ``overwrite``.
        device: where to compute (default: CUDA when available, else CPU).
        max_shard_bytes: the largest safetensors shard ("1GB" by default; a larger tensor gets its own).
        chunk_bytes: budget for the (N+1) fp32 copies of one piece; larger tensors are merged in
            row chunks when the method is element-wise (16 MiB by default).
        export_per_task: also write ``out/tasks/<name>/``, one complete model per fine-tuned model
            (merged shared weights + that model's head); needs ``heads`` in the config, except with
            ``emr`` (each task's θ̂_t).
        quiet: no progress bar (it is also hidden when stderr is not a terminal).
        allow_nonfinite: write merged tensors and heads that hold NaN/Inf or overflow the output
            dtype (also the config's ``allow_nonfinite: true``); by default they stop the merge.
        lora_rank: write a PEFT LoRA adapter of this rank instead of the full model (the models
            must include LoRA adapters): each target module's merged ΔW by truncated SVD, the
            relative Frobenius error per module in the card (:mod:`distac.merging.lora_out`).
        max_error: with ``lora_rank``, stop (writing nothing) when a module's relative error exceeds it.

    Returns:
        ``out``, holding the merged weights (HF shard names), the base's ``config.json``/tokenizer
        files when the base is a folder, ``heads/<name>.safetensors`` per model when ``heads`` is
        set, ``README.md`` (model card) and ``distac_config.yml``.

    Example:
        >>> distac.merge_checkpoints(  # doctest: +SKIP
        ...     {"merge_method": "ties", "base_model": "base/", "models": ["ft-a/", "ft-b/"],
        ...      "parameters": {"density": 0.2}}, "merged/")
        PosixPath('merged')
    """
    if is_slices_config(config):  # a frankenmerge: its own planner, the same engine
        if export_per_task:
            raise DistacError("export_per_task is not available for 'slices:' configs (they have no heads)")
        return merge_slices(
            config,
            out,
            overwrite=overwrite,
            device=device,
            max_shard_bytes=max_shard_bytes,
            chunk_bytes=chunk_bytes,
            quiet=quiet,
            allow_nonfinite=allow_nonfinite,
        )
    cfg = load_config(config)
    cfg.allow_nonfinite = cfg.allow_nonfinite or allow_nonfinite
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=_input_paths(cfg))
    shard = parse_size(max_shard_bytes)
    chunk = parse_size(chunk_bytes)
    dev = default_device(device)
    if cfg.method is EMR:
        if allow_nonfinite:
            raise DistacError("allow_nonfinite is not accepted with method 'emr': it always stops at NaN/Inf")
        if lora_rank is not None:
            raise DistacError("lora_rank is not accepted with method 'emr': its bundle is one model per task")
        _merge_emr(cfg, out, overwrite, dev, shard, chunk, export_per_task, quiet)
        return out
    if export_per_task and not cfg.heads:
        raise DistacError("export_per_task needs 'heads' patterns in the config (which tensors are task-specific)")
    _check_lora_output(lora_rank, max_error, export_per_task)
    with ExitStack() as opened:  # every checkpoint's file descriptors are closed, whatever happens
        real = opened.enter_context(closing(_open_base(cfg.base)))
        # a LoRA fine-tune is θ0 + ΔW on the real base, even when the merge's reference is zero
        saved = [opened.enter_context(closing(open_model(m.path, adapter=m.adapter, base=real))) for m in cfg.models]
        base: TensorSource = ZeroReference(real) if cfg.base.zero else real  # no base_model: τ = the full weights
        stats = _open_stats(cfg, base, saved, opened)
        models = [
            _renamed(src, m.prefix, f"model {m.name} ({m.path})") for m, src in zip(cfg.models, saved, strict=True)
        ]
        vocab, base_in, models_in = align_models(cfg.vocab, cfg.base.path, base, [m.path for m in cfg.models], models)
        _merge_into(
            cfg,
            out,
            base_in,
            models_in,
            stats,
            vocab=vocab,
            overwrite=overwrite,
            device=dev,
            shard=shard,
            chunk=chunk,
            export_per_task=export_per_task,
            quiet=quiet,
            lora=None if lora_rank is None else (lora_rank, max_error),
        )
    return out


def _check_lora_output(lora_rank: int | None, max_error: float | None, export_per_task: bool) -> None:
    if lora_rank is None:
        if max_error is not None:
            raise DistacError(
                "max_error (--max-error) bounds the LoRA output's error; give lora_rank (--lora-rank) too"
            )
        return
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise DistacError(f"lora_rank (--lora-rank) must be a positive integer, got {lora_rank!r}")
    if max_error is not None and not 0 <= max_error:
        raise DistacError(f"max_error (--max-error) must be >= 0, got {max_error!r}")
    if export_per_task:
        raise DistacError("export_per_task writes full models; it cannot go with a LoRA output (lora_rank)")


def _open_base(spec: ModelSpec) -> Checkpoint:
    """The base model: a checkpoint (an adapter is a fine-tune of it, never the base itself)."""
    if spec.adapter is not None or is_adapter(spec.path):
        raise DistacError(
            f"base_model '{spec.ref}': the base must be a full checkpoint; a LoRA adapter belongs under 'models' "
            "(as ADAPTER or BASE+ADAPTER), or merge it into its base first"
        )
    return open_checkpoint(spec.path)


def _merge_emr(
    cfg: MergeConfig,
    out: Path,
    overwrite: bool,
    device: torch.device,
    shard: int,
    chunk: int,
    export_per_task: bool,
    quiet: bool,
) -> None:
    """EMR-Merging's bundle (task names = model names), with the model card and the re-runnable config."""

    def card(tmp: Path, bundle: EMRBundle) -> None:
        write_card(tmp, cfg, None, out.name, bundle=bundle_card(bundle))
        for task in bundle.tasks if (tmp / "tasks").is_dir() else ():
            write_task_card(tmp / "tasks" / task, tmp, task)

    with ExitStack() as opened:
        # LoRA fine-tunes are θ0 + ΔW on the base; a 'prefix' mapping hands a model over renamed; the rest
        # go as paths (emr_merge opens them)
        lora = any(m.adapter is not None or is_adapter(m.path) for m in cfg.models)
        base = opened.enter_context(closing(_open_base(cfg.base))) if lora else None
        models: list[Path | TensorSource] = []
        for m in cfg.models:
            if not lora and not m.prefix:
                models.append(m.path)
                continue
            src = open_model(m.path, adapter=m.adapter, base=base) if lora else open_checkpoint(m.path)
            models.append(_renamed(opened.enter_context(closing(src)), m.prefix, f"model {m.name} ({m.path})"))
        emr_merge(
            cfg.base.path,
            models,
            tasks=[m.name for m in cfg.models],
            heads=cfg.heads or None,
            out=out,
            overwrite=overwrite,
            export_per_task=export_per_task,
            device=device,
            chunk_bytes=chunk,
            max_shard_bytes=shard,
            quiet=quiet,
            finish=card,
        )


def _merge_into(
    cfg: MergeConfig,
    out: Path,
    base: TensorSource,
    models: Sequence[TensorSource],
    stats: dict[str, Any],
    *,
    vocab: Vocab | None = None,
    overwrite: bool,
    device: torch.device,
    shard: int,
    chunk: int,
    export_per_task: bool,
    quiet: bool,
    lora: tuple[int, float | None] | None = None,
) -> None:
    """The merge proper: stream into a temporary folder, add heads, config files and card, rename.

    With ``lora`` = (rank, max_error) the merged model is written as a LoRA adapter (:class:`LoraWriter`)."""
    heads = sorted(match_heads(base.keys(), cfg.heads), key=base.keys().index)
    if cfg.heads and not heads:
        raise DistacError(f"heads patterns {cfg.heads} match no tensor of {base.label}")
    layout = _layout(base, cfg.out_dtype)
    dtypes = {k: d for k, _, d in layout}
    # what the engine will read: N+1 copies of each merged tensor, one (the base's) of the rest
    head_set = set(heads)
    in_bytes = sum(
        math.prod(base.shape(k))
        * base.dtype(k).itemsize
        * (len(models) + 1 if base.dtype(k).is_floating_point and k not in head_set else 1)
        for k in base.keys()
    )

    def prepass_progress(names: Iterator[str], desc: str) -> Iterator[str]:
        return track(names, desc=desc, unit="piece", quiet=quiet)

    with atomic_dir(out, overwrite=overwrite, inputs=_input_paths(cfg)) as tmp:
        writer: BackgroundWriter | LoraWriter = (
            BackgroundWriter(
                ShardWriter(tmp, layout, max_shard_bytes=shard, metadata={"distac_method": cfg.method.name})
            )
            if lora is None
            else LoraWriter(
                tmp, base, [m for m in models if isinstance(m, AdapterSource)], lora[0], cfg.out_dtype, lora[1]
            )
        )
        with Progress(
            total_bytes=in_bytes, total_items=len(layout), desc=f"merge ({cfg.method.name})", quiet=quiet
        ) as bar:
            try:
                plan = run_merge(
                    base,
                    models,
                    cfg.method,
                    cfg.params,
                    writer.write,
                    head_patterns=cfg.heads,
                    stats=stats,
                    device=device,
                    chunk_bytes=chunk,
                    prefetch=True,
                    progress=prepass_progress,
                    on_piece=lambda _n, nbytes, done: bar.update(nbytes=nbytes, items=int(done)),
                    out_dtype=lambda k: dtypes[k],
                    allow_nonfinite=cfg.allow_nonfinite,
                )
                writer.close()
            except BaseException:
                writer.abort()
                raise
        if heads:
            _write_heads(tmp, models, cfg.models, heads, cfg.out_dtype, cfg.allow_nonfinite)
        if cfg.base.path.is_dir() and lora is None:
            copy_model_files(cfg.base.path, tmp)
        paths = [cfg.base.path, *(m.path for m in cfg.models)]
        values = finish_tokenizer(cfg.vocab, vocab, tmp, donor=cfg.base.path, models=paths)
        update_model_config(tmp, values, dtype=cfg.out_dtype)
        write_card(tmp, cfg, plan.params, out.name, buffers=plan.copied)
        if isinstance(writer, LoraWriter):  # the card describes an adapter: peft loads it
            card = (tmp / "README.md").read_text().replace("library_name: transformers", "library_name: peft", 1)
            (tmp / "README.md").write_text(card + "\n" + writer.card())
        if export_per_task:
            export_task_models(tmp, tmp / "tasks", max_shard_bytes=shard, quiet=quiet)


def export_task_models(
    merged: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    quiet: bool = False,
) -> dict[str, Path]:
    """Write one complete model per task: the merged shared weights plus that task's own head.

    Reads ``merged/heads/<name>.safetensors`` (written by :func:`merge_checkpoints` when the config
    has ``heads``) and writes ``out/<name>/`` (default ``merged/tasks/<name>/``), each with the
    merged folder's config/tokenizer files. Returns ``{name: folder}``.

    When ``merged/temperatures.json`` (written by ``distac calibrate``) holds a temperature T for a
    task, the exported model is calibrated: its logits are divided by T, which for the head's final
    linear layer is the same as dividing that layer's weight and bias by T (see :func:`_temperature_scaled`).
    """
    merged = Path(merged)
    temperatures = read_temperatures(merged)
    head_files = sorted((merged / "heads").glob("*.safetensors")) if (merged / "heads").is_dir() else []
    if not head_files:
        raise DistacError(f"{merged}: no heads/<name>.safetensors; merge with 'heads' patterns in the config first")
    out = Path(out) if out is not None else merged / "tasks"
    src = open_checkpoint(merged)
    layout = [(k, src.shape(k), src.dtype(k)) for k in src.keys()]
    result: dict[str, Path] = {}
    with atomic_dir(out, overwrite=overwrite, inputs=[merged / "heads"]) as tmp:
        for hf in head_files:
            head = open_checkpoint(hf)
            missing = [k for k in head.keys() if k not in set(src.keys())]
            if missing:
                raise DistacError(f"{hf}: head tensors {missing[:3]} are not in the merged model {merged}")
            folder = tmp / hf.stem
            folder.mkdir()
            meta = {"distac_task": hf.stem}
            scaled: dict[str, Tensor] = {}
            if hf.stem in temperatures:
                scaled = _temperature_scaled(head, temperatures[hf.stem], hf)
                meta["distac_temperature"] = repr(temperatures[hf.stem])
            writer = ShardWriter(folder, layout, max_shard_bytes=parse_size(max_shard_bytes), metadata=meta)
            hk = set(head.keys())
            try:
                for k in src.keys():
                    writer.write(k, scaled[k] if k in scaled else head.get(k) if k in hk else src.get(k))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            copy_model_files(merged, folder)
            write_task_card(folder, merged, hf.stem, temperature=temperatures.get(hf.stem))
            result[hf.stem] = out / hf.stem
    return result


def _temperature_scaled(head: TensorSource, temperature: float, path: Path) -> dict[str, Tensor]:
    """The head's final linear layer divided by T: softmax(W x / T + b / T) = softmax((W x + b) / T).

    The final layer is the last 2-D ``*.weight`` in the head file's order (classification heads end
    with their output projection), together with the ``*.bias`` of the same module when present.
    """
    weights = [k for k in head.keys() if k.endswith("weight") and len(head.shape(k)) == 2]
    if not weights:
        raise DistacError(f"{path}: a temperature is calibrated for this task, but its head has no 2-D weight to scale")
    w = weights[-1]
    out = {w: (head.get(w).float() / temperature).to(head.dtype(w))}
    b = w[: -len("weight")] + "bias"
    if b in head.keys():
        out[b] = (head.get(b).float() / temperature).to(head.dtype(b))
    return out

"""Config-driven merges of checkpoints on disk: ``distac merge CONFIG.yaml --out DIR`` and its Python twin.

The YAML is the one a mergekit user already writes::

    merge_method: ties
    base_model: ./base                      # or {model: ./base, parameters: {fisher: ./base.fisher.safetensors}}
    models:
      - model: ./finetuned_a
        name: a                             # distac extra: names heads/<name>.safetensors (default: folder name)
        parameters: {weight: 1.0, density: 0.5, fisher: ./a.fisher.safetensors}
      - model: ./finetuned_b
    parameters: {scale: 0.4, density: 0.2}  # global; per-model values override them
    dtype: float32                          # see below
    out_dtype: bfloat16
    heads: ["classifier.*"]                 # distac extra: task-specific tensors, not merged

Conventions, and where they differ from mergekit:

* per-model ``weight`` becomes the method's ``weights`` list; any other per-model key must be a
  parameter the method accepts per model (``distac methods`` marks them), or a statistics sidecar
  (``fisher``, ``gram``; on the base model ``fisher`` becomes ``base_fisher``);
* a ``models`` entry whose path is the base model is dropped (mergekit's TIES examples list it);
* distac always computes in fp32. ``dtype`` is accepted for mergekit configs: a half type there
  only sets the output dtype when ``out_dtype`` is absent, as in mergekit; ``out_dtype`` defaults
  to each tensor's dtype in the base;
* unknown keys are errors (with the closest valid names), never silently ignored;
* relative paths resolve against the YAML's folder.

Every merge writes a model card (``README.md``: method, paper, resolved parameters, the config)
and ``distac_config.yml`` (the config with absolute paths, re-runnable as is).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DistacError, closest
from ..io import (
    DEFAULT_SHARD_BYTES,
    BackgroundWriter,
    Checkpoint,
    ShardWriter,
    atomic_dir,
    check_output,
    copy_model_files,
    open_checkpoint,
    read_header,
)
from ..io import parse_size as parse_size
from ..io.readers import SafetensorsFile
from ..methods import METHODS, Method, get_method
from ..methods.base import missing_statistic
from ..nn.models import default_device
from ..progress import Progress, track
from ..taskvector import match_heads
from .engine import DEFAULT_CHUNK_BYTES, TensorSource, run_merge

__all__ = [
    "MergeConfig",
    "export_task_models",
    "load_config",
    "merge_checkpoints",
    "merge_command",
    "methods_command",
]

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "heads")
MODEL_KEYS = ("model", "name", "parameters")
STAT_KEYS = ("fisher", "gram")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass
class ModelSpec:
    """One checkpoint of the config: where it is, what it is called, its statistics sidecars."""

    path: Path
    name: str
    stats: dict[str, Path] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A validated merge config (see the module docstring for the YAML)."""

    method: Method
    base: ModelSpec
    models: list[ModelSpec]
    params: dict[str, Any]  # as the user gave them, per-model values gathered into lists
    out_dtype: torch.dtype | None
    heads: list[str]
    raw: dict[str, Any]  # the config with absolute paths (written to distac_config.yml)


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise DistacError(f"{where}: unknown key '{k}'{closest(str(k), allowed)}; valid keys: {', '.join(allowed)}")


def _dtype(value: Any, key: str, where: str) -> torch.dtype:
    d = DTYPES.get(str(value).lower().removeprefix("torch."))
    if d is None:
        raise DistacError(
            f"{where}: '{key}: {value}' is not a dtype{closest(str(value), DTYPES)}; use one of "
            "float32, bfloat16, float16, float64"
        )
    return d


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


_GENERIC_STEMS = ("model", "weights", "pytorch_model", "checkpoint", "state_dict", "adapter_model")


def _default_name(path: Path) -> str:
    """The folder's name, or the file's stem unless it is a generic one (model.safetensors -> its folder)."""
    stem = path.name if path.is_dir() or not path.suffix else path.name.split(".")[0]
    if not path.is_dir() and stem in _GENERIC_STEMS:
        stem = path.parent.name
    return _SAFE_NAME.sub("_", stem) or "model"


def _model_entry(entry: Any, folder: Path, where: str) -> tuple[ModelSpec, dict[str, Any]]:
    """Parse ``{model, name, parameters}`` (or a bare path): the spec, and its non-statistics parameters."""
    if isinstance(entry, str | Path):
        entry = {"model": str(entry)}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise DistacError(f"{where}: expected a path or a mapping with a 'model' key, got {entry!r}")
    _check_keys(entry, MODEL_KEYS, where)
    path = (folder / str(entry["model"])).resolve()
    params = dict(entry.get("parameters") or {})
    stats = {k: (folder / str(params.pop(k))).resolve() for k in STAT_KEYS if k in params}
    name = str(entry["name"]) if entry.get("name") is not None else _default_name(path)
    if _SAFE_NAME.search(name):
        raise DistacError(f"{where}: name {name!r} may only use letters, digits, '.', '_' and '-'")
    return ModelSpec(path, name, stats), params


def _gather_params(
    method: Method,
    global_params: Mapping[str, Any],
    per_model: list[dict[str, Any]],
    where: str,
    yaml_index: Sequence[int],
) -> dict[str, Any]:
    """Merge global and per-model parameters into the method's keyword arguments.

    Per-model values become lists (``weight`` -> ``weights``); a model without its own value takes
    the global one, else the method's default.
    """
    specs = method.params
    params = dict(global_params)
    if "weight" in params and "weight" not in specs:
        params["weights"] = params.pop("weight")
    keys: list[str] = []
    spellings = [*specs, "weight"] if "weights" in specs else list(specs)
    for i, p in zip(yaml_index, per_model, strict=True):
        for k in list(p):
            name = "weights" if k == "weight" and "weight" not in specs else k
            if name not in specs:
                raise DistacError(
                    f"{where}: models[{i}]: method '{method.name}' has no parameter '{k}'{closest(k, spellings)}; "
                    "per-model parameters: "
                    + ", ".join([*(n for n, s in specs.items() if s.per_model), "fisher", "gram"])
                )
            if not specs[name].per_model:
                raise DistacError(
                    f"{where}: models[{i}]: parameter '{name}' of '{method.name}' is one value for all models; "
                    "set it under the top-level 'parameters'"
                )
            p[name] = p.pop(k)
            if name not in keys:
                keys.append(name)
    for name in keys:
        shared = params.get(name, specs[name].default)
        if isinstance(shared, list | tuple):
            raise DistacError(f"{where}: parameter '{name}' is given both as a list and per model; use one")
        if shared is None and any(name not in p for p in per_model):
            # a None default (e.g. weights=None, "all ones") has no per-model meaning to fill in
            lacking = [i for i, p in zip(yaml_index, per_model, strict=True) if name not in p]
            raise DistacError(
                f"{where}: parameter '{name}' is set for some models but not for models{lacking}; set it for "
                "every model, or give a shared value under the top-level 'parameters'"
            )
        params[name] = [p.get(name, shared) for p in per_model]
    return params


def load_config(config: Mapping[str, Any] | str | Path) -> MergeConfig:
    """Read and validate a merge config (YAML path or dict). Relative paths resolve against the YAML's folder
    (the current directory for a dict). Raises :class:`DistacError` naming the key at fault."""
    if isinstance(config, Mapping):
        raw, folder, where = dict(config), Path.cwd(), "config"
    else:
        path = Path(config)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise DistacError(f"{path}: config file not found") from None
        except (OSError, yaml.YAMLError) as e:
            raise DistacError(f"{path}: cannot read the YAML config: {e}") from e
        if not isinstance(raw, dict):
            raise DistacError(f"{path}: the config must be a YAML mapping (merge_method, base_model, models, ...)")
        folder = path.resolve().parent
    _check_keys(raw, TOP_KEYS, where)
    for k in ("merge_method", "base_model", "models"):
        if k not in raw:
            raise DistacError(f"{where}: missing required key '{k}'")
    method = get_method(str(raw["merge_method"]))
    base, base_params = _model_entry(raw["base_model"], folder, f"{where}: base_model")
    if base_params:
        raise DistacError(
            f"{where}: base_model: only statistics (fisher) may be set on the base, got {sorted(base_params)}"
        )
    if "gram" in base.stats:
        raise DistacError(f"{where}: base_model: 'gram' statistics belong to the fine-tuned models")
    if not isinstance(raw["models"], list) or not raw["models"]:
        raise DistacError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models, per_model, entries, yaml_index = [], [], [], []
    for i, entry in enumerate(raw["models"]):
        spec, params = _model_entry(entry, folder, f"{where}: models[{i}]")
        if spec.path == base.path:
            continue  # mergekit lists the base among the models; it has no task vector
        models.append(spec)
        per_model.append(params)
        yaml_index.append(i)
        p = {**params, **{k: str(v) for k, v in spec.stats.items()}}
        entries.append({"model": str(spec.path), "name": spec.name, **({"parameters": p} if p else {})})
    if not models:
        raise DistacError(f"{where}: 'models' lists only the base model")
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistacError(f"{where}: several models are named {dup}; give each a distinct 'name'")
    gparams = raw.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        raise DistacError(f"{where}: 'parameters' must be a mapping")
    params = _gather_params(method, gparams, [dict(p) for p in per_model], where, yaml_index)
    method.resolve(params, len(models))  # validate now: ranges, unknown names, model counts
    dtype = _dtype(raw["dtype"], "dtype", where) if raw.get("dtype") is not None else torch.float32
    out_dtype = _dtype(raw["out_dtype"], "out_dtype", where) if raw.get("out_dtype") is not None else None
    if dtype == torch.float64:
        raise DistacError(f"{where}: 'dtype: float64' is not supported; distac computes in float32")
    if out_dtype is None and dtype in (torch.float16, torch.bfloat16):
        out_dtype = dtype  # mergekit: out_dtype defaults to dtype. The arithmetic stays fp32.
    heads = raw.get("heads") or []
    heads = [heads] if isinstance(heads, str) else [str(h) for h in heads]
    # the config with absolute paths and explicit names, so the output's copy re-runs from anywhere
    norm = copy.deepcopy(dict(raw))
    norm["base_model"] = {"model": str(base.path)}
    if base.stats:
        norm["base_model"]["parameters"] = {k: str(v) for k, v in base.stats.items()}
    norm["models"] = entries
    return MergeConfig(method, base, models, params, out_dtype, heads, norm)


# ----------------------------------------------------------------------------------------------
# merging checkpoints
# ----------------------------------------------------------------------------------------------
def _input_paths(cfg: MergeConfig) -> list[Path]:
    """Every file the merge reads: models and statistics sidecars (the output may not touch them)."""
    specs = [cfg.base, *cfg.models]
    return [p for s in specs for p in (s.path, *s.stats.values())]


def _open_sidecar(path: Path, key: str, what: str, model: Checkpoint) -> Checkpoint:
    """Open a statistics file lazily, after checking it against the model it was computed on.

    A ``distac.stats`` sidecar must hold the right kind of statistic, on the sum scale for Fishers,
    with the model's keys and shapes, and the model's fingerprint (:func:`distac.stats.verify_sidecar`
    with ``check_values=False``: it reads headers and the ≤ 64 sampled rows per tensor of the
    fingerprint, not the model; the methods check the values as they merge). A plain safetensors
    file keyed like the model is taken as is."""
    from ..stats.sidecar import ACCEPTED_KINDS, verify_sidecar

    src = open_checkpoint(path, label=f"{what} ({path})")
    meta = read_header(src.files[0].path)[1] if isinstance(src.files[0], SafetensorsFile) else {}
    if meta.get("format", "").startswith("distac-stats/"):
        if meta.get("kind") not in ACCEPTED_KINDS[key]:
            src.close()
            raise DistacError(f"{path}: holds '{meta.get('kind')}' statistics, but the config uses it as '{key}'")
        try:
            verify_sidecar(path, model, scale="sum" if key == "fisher" else None, check_values=False)
        except DistacError as e:
            src.close()
            raise DistacError(f"{e} (the {what}, checked against {model.label})") from None
    return src


def _open_stats(cfg: MergeConfig, base: Checkpoint, models: Sequence[Checkpoint], opened: ExitStack) -> dict[str, Any]:
    """Open statistics sidecars lazily as ``{"fisher": [..N], "base_fisher": src, "gram": [..N]}``.

    Each one is registered with ``opened`` as soon as it is open, so an error on a later one still
    closes it."""
    stats: dict[str, Any] = {}

    def open_(path: Path, key: str, what: str, model: Checkpoint) -> Checkpoint:
        return opened.enter_context(closing(_open_sidecar(path, key, what, model)))

    for key in STAT_KEYS:
        have = [m for m in cfg.models if key in m.stats]
        if have and len(have) != len(cfg.models):
            missing = [m.name for m in cfg.models if key not in m.stats]
            raise DistacError(f"'{key}' statistics are given for some models but not for {missing}")
        if have:
            stats[key] = [
                open_(m.stats[key], key, f"{key} of {m.name}", src) for m, src in zip(cfg.models, models, strict=True)
            ]
    if "fisher" in cfg.base.stats:
        stats["base_fisher"] = open_(cfg.base.stats["fisher"], "fisher", "base fisher", base)
    wanted = {s.rstrip("?") for s in cfg.method.stats}
    required = {s for s in cfg.method.stats if not s.endswith("?")}
    for key in stats:
        if key not in wanted:
            raise DistacError(
                f"method '{cfg.method.name}' does not use '{key}' statistics; remove them from the config"
            )
    for key in sorted(required - set(stats)):
        raise missing_statistic(cfg.method.name, key)
    return stats


def _layout(base: Checkpoint, out_dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    def dt(k: str) -> torch.dtype:
        d = base.dtype(k)
        return out_dtype if out_dtype is not None and d.is_floating_point else d

    return [(k, base.shape(k), dt(k)) for k in base.keys()]


def _write_heads(
    folder: Path,
    models: Sequence[Checkpoint],
    specs: Sequence[ModelSpec],
    heads: Sequence[str],
    out_dtype: torch.dtype | None,
) -> None:
    """``heads/<name>.safetensors``: each model's own head tensors (small; written whole)."""
    (folder / "heads").mkdir()
    for m, spec in zip(models, specs, strict=True):
        state = {}
        for k in heads:
            t = m.get(k)
            if out_dtype is not None and t.is_floating_point():
                t = t.to(out_dtype)
            state[k] = t.contiguous()
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
            (merged shared weights + that model's head); needs ``heads`` in the config.
        quiet: no progress bar (it is also hidden when stderr is not a terminal).

    The output holds the merged weights (HF shard names), the base's ``config.json``/tokenizer
    files when the base is a folder, ``heads/<name>.safetensors`` per model when ``heads`` is set,
    ``README.md`` (model card) and ``distac_config.yml``.
    """
    cfg = load_config(config)
    out = Path(out)
    check_output(out, overwrite=overwrite, inputs=_input_paths(cfg))
    shard = parse_size(max_shard_bytes)
    chunk = parse_size(chunk_bytes)
    dev = default_device(device)
    if export_per_task and not cfg.heads:
        raise DistacError("export_per_task needs 'heads' patterns in the config (which tensors are task-specific)")
    with ExitStack() as opened:  # every checkpoint's file descriptors are closed, whatever happens
        base = opened.enter_context(closing(open_checkpoint(cfg.base.path)))
        models = [opened.enter_context(closing(open_checkpoint(m.path))) for m in cfg.models]
        stats = _open_stats(cfg, base, models, opened)
        _merge_into(
            cfg,
            out,
            base,
            models,
            stats,
            overwrite=overwrite,
            device=dev,
            shard=shard,
            chunk=chunk,
            export_per_task=export_per_task,
            quiet=quiet,
        )
    return out


def _merge_into(
    cfg: MergeConfig,
    out: Path,
    base: Checkpoint,
    models: list[Checkpoint],
    stats: dict[str, Any],
    *,
    overwrite: bool,
    device: torch.device,
    shard: int,
    chunk: int,
    export_per_task: bool,
    quiet: bool,
) -> None:
    """The merge proper: stream into a temporary folder, add heads, config files and card, rename."""
    heads = sorted(match_heads(base.keys(), cfg.heads), key=base.keys().index)
    if cfg.heads and not heads:
        raise DistacError(f"heads patterns {cfg.heads} match no tensor of {base.label}")
    layout = _layout(base, cfg.out_dtype)
    # what the engine will read: N+1 copies of each merged tensor, one (the base's) of the rest
    head_set = set(heads)
    in_bytes = sum(
        base.nbytes(k) * (len(models) + 1 if base.dtype(k).is_floating_point and k not in head_set else 1)
        for k in base.keys()
    )

    def prepass_progress(names: Iterator[str], desc: str) -> Iterator[str]:
        return track(names, desc=desc, unit="piece", quiet=quiet)

    with atomic_dir(out, overwrite=overwrite, inputs=_input_paths(cfg)) as tmp:
        writer = BackgroundWriter(
            ShardWriter(tmp, layout, max_shard_bytes=shard, metadata={"distac_method": cfg.method.name})
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
                )
                writer.close()
            except BaseException:
                writer.abort()
                raise
        if heads:
            _write_heads(tmp, models, cfg.models, heads, cfg.out_dtype)
        if cfg.base.path.is_dir():
            copy_model_files(cfg.base.path, tmp)
        _write_card(tmp, cfg, plan.params, out.name)
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
    from ..conditioning.calibrate import read_temperatures

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


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------
def _yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, allow_unicode=True)


def model_card(cfg: MergeConfig, params: Mapping[str, Any], title: str) -> str:
    """The README.md of a merged model: front matter for the Hub, method, paper, parameters and config."""
    from .. import __version__

    m = cfg.method
    front = {
        "library_name": "transformers" if (cfg.base.path / "config.json").exists() else None,
        "tags": ["merge", "distac", m.name],
        "base_model": str(cfg.base.path),
    }
    lines = [
        "---",
        _yaml({k: v for k, v in front.items() if v is not None}).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Merged with distac {__version__} using **{m.name}**: {m.summary}",
        "",
        f"Reference: {m.paper}",
        "",
    ]
    if m.notes:
        lines += [f"Convention: {m.notes}", ""]
    lines += ["## Models", "", f"* base: `{cfg.base.path}`"]
    lines += [f"* {s.name}: `{s.path}`" for s in cfg.models]
    if cfg.heads:
        lines += [
            "",
            f"Task-specific heads ({', '.join(cfg.heads)}) are not merged: the weights hold the base's, and "
            "`heads/<name>.safetensors` each model's own.",
        ]
    lines += [
        "",
        "## Parameters (resolved, with defaults)",
        "",
        "```yaml",
        _yaml(dict(params)).rstrip(),
        "```",
        "",
        "Arithmetic ran in float32"
        + (
            f"; tensors were written as {str(cfg.out_dtype).removeprefix('torch.')}."
            if cfg.out_dtype
            else "; tensors were written in the base's dtypes."
        ),
        "",
        "## Configuration",
        "",
        "```yaml",
        _yaml(cfg.raw).rstrip(),
        "```",
        "",
        "Reproduce with `distac merge distac_config.yml --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def _write_card(folder: Path, cfg: MergeConfig, params: Mapping[str, Any], title: str) -> None:
    (folder / "README.md").write_text(model_card(cfg, params, title))
    (folder / "distac_config.yml").write_text(_yaml(cfg.raw))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (written to a temporary folder, renamed when complete).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available).")
@click.option("--shard-size", default="1GB", show_default=True, help="Largest output shard, e.g. 500MB, 2GiB.")
@click.option(
    "--chunk-size",
    default="16MiB",
    show_default=True,
    help="Memory budget for the N+1 fp32 copies of one piece; larger tensors are row-chunked.",
)
@click.option("--export-per-task", is_flag=True, help="Also write OUT/tasks/<name>/: one full model per task.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge_command(
    config: Path,
    out: Path,
    overwrite: bool,
    device: str | None,
    shard_size: str,
    chunk_size: str,
    export_per_task: bool,
    quiet: bool,
) -> None:
    """Merge the checkpoints named in CONFIG (mergekit-style YAML) into OUT."""
    path = merge_checkpoints(
        config,
        out,
        overwrite=overwrite,
        device=device,
        max_shard_bytes=shard_size,
        chunk_bytes=chunk_size,
        export_per_task=export_per_task,
        quiet=quiet,
    )
    click.echo(str(path))


def describe_method(m: Method) -> list[str]:
    """Lines describing one method for ``distac methods``: summary, paper, parameters, engine needs."""
    needs = [
        "row-chunked"
        if m.chunkable is True
        else "whole tensors"
        if m.chunkable is False
        else "row-chunked for some parameters"
    ]
    if m.prepass is not None:
        needs.append("global pre-pass for some parameters")
    if m.stats:
        needs.append("statistics: " + ", ".join(m.stats))
    count = f"{m.min_models}" + (f"..{m.max_models}" if m.max_models != m.min_models else "")
    count = count.replace("..None", "+")
    lines = [f"{m.name}  ({count} models; {'; '.join(needs)})", f"    {m.summary}", f"    paper: {m.paper}"]
    lines += [f"    {p.describe()}" for p in m.params.values()] or ["    (no parameters)"]
    lines.append(f"    memory: {m.memory}")
    return lines


@click.command("methods")
@click.argument("name", required=False)
def methods_command(name: str | None) -> None:
    """List every merge method with its parameters (name=default, range, per model) and paper."""
    chosen = [get_method(name)] if name else list(METHODS.values())
    for i, m in enumerate(chosen):
        if i:
            click.echo("")
        click.echo("\n".join(describe_method(m)))
        if name and m.notes:
            click.echo(f"    convention: {m.notes}")
    if not name:
        click.echo(f"\n{len(chosen)} methods. `distac methods NAME` adds the convention notes.", file=sys.stdout)

"""The merge config: its YAML schema, and :func:`load_config`, which reads and validates it.

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
* relative paths resolve against the YAML's folder;
* ``allow_nonfinite: true`` (distac extra, default false) writes merged tensors even when they
  hold NaN/Inf or overflow the output dtype; by default such a tensor stops the merge.

The file is read with the restricted YAML loader (:func:`distac.merging.yaml_loader.read_yaml`): anchors and aliases are
refused (a few hundred bytes of nested aliases can expand to gigabytes), so are duplicate keys
(YAML would silently keep the last one), nesting deeper than 64 levels, files over 1 MiB and
text that is not UTF-8. Every value is type-checked at load, method parameters included.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DistacError, closest
from ..io.hub import is_repo_id, resolve_model
from ..io.lora import split_adapter_ref
from ..methods import Method, get_method
from ..taskvector import compile_head_pattern
from .mergekit import (
    GTA_DEFAULTS,
    MERGEKIT_ONLY,
    NO_BASE,
    NO_WEIGHT,
    MergekitParams,
    Reading,
    check_keys,
    check_no_mix,
    check_setting,
    count_mean_note,
    global_flags,
    mergekit_reason,
    varies,
    warn,
)
from .vocab import VocabSpec, absolute_settings, parse_vocab
from .yaml_loader import MAX_YAML_BYTES, MAX_YAML_DEPTH, dump_yaml, read_yaml

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MergeConfig", "ModelSpec", "dump_yaml", "load_config", "read_yaml"]

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "heads",
    "allow_nonfinite",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
MODEL_KEYS = ("model", "name", "parameters", "prefix")
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
    #: ``{prefix in this model's names: the base's prefix, or None to drop those tensors}``
    prefix: dict[str, str | None] = field(default_factory=dict)
    #: the base of a merge without ``base_model``: zero weights laid out like the model at ``path``
    #: (:class:`distac.merging.engine.ZeroReference`), so task vectors are the full weights
    zero: bool = False
    #: a LoRA adapter applied to ``path`` (mergekit's ``model+adapter``), or None
    adapter: Path | None = None

    @property
    def ref(self) -> str:
        """The model as the config names it: the path, or ``path+adapter``."""
        return str(self.path) + (f"+{self.adapter}" if self.adapter is not None else "")


@dataclass
class MergeConfig:
    """A validated merge config (see the module docstring for the YAML)."""

    method: Method
    base: ModelSpec
    models: list[ModelSpec]
    #: as the user gave them, per-model values gathered into lists; for a mergekit config, a
    #: :class:`~distac.merging.mergekit.MergekitParams` (the engine asks it for per-tensor values)
    params: Mapping[str, Any]
    out_dtype: torch.dtype | None
    heads: list[str]
    raw: dict[str, Any]  # the config with absolute paths (written to distac_config.yml)
    #: write merged tensors even when they hold NaN/Inf or overflow the output dtype
    allow_nonfinite: bool = False
    #: the YAML file the config was read from (None for a dict); the output may not touch it
    source: Path | None = None
    #: tokenizer_source / tokenizer / chat_template (:mod:`distac.merging.vocab`); None when absent
    vocab: VocabSpec | None = None
    #: why the config is read with mergekit's meaning (None: distac's), and the differences noted
    mergekit: str | None = None
    notes: list[str] = field(default_factory=list)


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


UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


_GENERIC_STEMS = ("model", "weights", "pytorch_model", "checkpoint", "state_dict", "adapter_model")


def default_name(path: Path) -> str:
    """The folder's name, or the file's stem unless it is a generic one (model.safetensors -> its folder)."""
    stem = path.name if path.is_dir() or not path.suffix else path.name.split(".")[0]
    if not path.is_dir() and stem in _GENERIC_STEMS:
        stem = path.parent.name
    return UNSAFE_NAME_CHARS.sub("_", stem) or "model"


def _path(folder: Path, value: Any, where: str) -> Path:
    """A path of the config, resolved against its folder; a bad value is one line naming the key."""
    if not isinstance(value, str | Path) or not str(value) or "\0" in str(value) or len(str(value)) > 4096:
        raise DistacError(f"{where}: expected a file or folder path, got {value!r}")
    try:
        return (folder / value).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name the OS refuses
        raise DistacError(f"{where}: cannot resolve the path {str(value)!r}: {e}") from e


def _model_path(folder: Path, value: Any, where: str) -> tuple[Path, str | None]:
    """A model reference: a path against the config's folder, or a Hub repo id (``org/name[@rev]``)
    when no such path exists, resolved through the local Hugging Face cache (:mod:`distac.io.hub`).
    Returns the path and, for a repo id, the repo's name (the default model name)."""
    if isinstance(value, str) and is_repo_id(value) and not (folder / value).exists():
        return resolve_model(value, where=where).resolve(), value.split("@")[0].split("/")[-1]
    return _path(folder, value, where), None


def _prefix_map(value: Any, where: str) -> dict[str, str | None]:
    """A model's ``prefix`` mapping: ``{"bert.": ""}`` strips, ``{"": "bert."}`` adds, ``{"head.": null}`` drops."""
    if value is None:
        return {}
    if (
        not isinstance(value, Mapping)
        or not value
        or not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items())
    ):
        raise DistacError(
            f"{where}: 'prefix' maps this model's name prefixes to the base's, e.g. {{'bert.': ''}} "
            f"(null drops those tensors); got {value!r}"
        )
    return dict(value)


def _model_entry(entry: Any, folder: Path, where: str) -> tuple[ModelSpec, dict[str, Any]]:
    """Parse ``{model, name, parameters}`` (or a bare path): the spec, and its non-statistics parameters."""
    if isinstance(entry, str | Path):
        entry = {"model": str(entry)}
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise DistacError(f"{where}: expected a path or a mapping with a 'model' key, got {entry!r}")
    _check_keys(entry, MODEL_KEYS, where)
    ref, adapter_ref = (
        (entry["model"], None) if not isinstance(entry["model"], str) else split_adapter_ref(entry["model"], folder)
    )
    path, repo_name = _model_path(folder, ref, f"{where}: model")
    adapter, adapter_repo = _model_path(folder, adapter_ref, f"{where}: adapter") if adapter_ref else (None, None)
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise DistacError(f"{where}: 'parameters' must be a mapping, got {params!r}")
    params = dict(params)
    stats = {k: _path(folder, params.pop(k), f"{where}: {k}") for k in STAT_KEYS if k in params}
    if entry.get("name") is not None and not isinstance(entry["name"], str):
        raise DistacError(f"{where}: 'name' must be a string, got {entry['name']!r}")
    auto = adapter_repo or default_name(adapter) if adapter is not None else repo_name or default_name(path)
    name = entry["name"] if entry.get("name") is not None else auto
    if UNSAFE_NAME_CHARS.search(name):
        raise DistacError(f"{where}: name {name!r} may only use letters, digits, '.', '_' and '-'")
    return ModelSpec(path, name, stats, _prefix_map(entry.get("prefix"), f"{where}: prefix"), adapter=adapter), params


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


def _read(config: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], Path, str]:
    """The raw mapping, the folder relative paths resolve against, and the name to use in messages."""
    if isinstance(config, Mapping):
        return dict(config), Path.cwd(), "config"
    path = Path(config)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise DistacError(f"{path}: the config must be a YAML mapping (merge_method, base_model, models, ...)")
    return raw, path.resolve().parent, str(path)


def _base_entry(raw: Mapping[str, Any], folder: Path, where: str) -> ModelSpec:
    base, base_params = _model_entry(raw["base_model"], folder, f"{where}: base_model")
    if base_params:
        raise DistacError(
            f"{where}: base_model: only statistics (fisher) may be set on the base, got {sorted(base_params)}"
        )
    if base.prefix:
        raise DistacError(f"{where}: base_model: 'prefix' maps a model's names to the base's; set it on the models")
    if "gram" in base.stats:
        raise DistacError(f"{where}: base_model: 'gram' statistics belong to the fine-tuned models")
    return base


@dataclass
class _Models:
    """The fine-tuned models of a config, the base's entries dropped."""

    specs: list[ModelSpec] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)  # non-statistics parameters, per model
    entries: list[dict[str, Any]] = field(default_factory=list)  # normalized YAML entries
    yaml_index: list[int] = field(default_factory=list)  # position of each in the YAML's list


def _model_entries(raw: Mapping[str, Any], base: ModelSpec, folder: Path, where: str) -> _Models:
    if not isinstance(raw["models"], list) or not raw["models"]:
        raise DistacError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    out = _Models()
    dropped = []
    for i, entry in enumerate(raw["models"]):
        spec, params = _model_entry(entry, folder, f"{where}: models[{i}]")
        if spec.path == base.path and spec.adapter is None:
            dropped.append(i)  # mergekit lists the base among the models; it has no task vector
            continue
        out.specs.append(spec)
        out.params.append(params)
        out.yaml_index.append(i)
        p = {**params, **{k: str(v) for k, v in spec.stats.items()}}
        out.entries.append({"model": spec.ref, "name": spec.name, **({"parameters": p} if p else {})})
        if spec.prefix:
            out.entries[-1]["prefix"] = spec.prefix
    if not out.specs:
        raise DistacError(f"{where}: 'models' lists only the base model")
    if dropped:
        warn(f"models{dropped} is the base_model: it has no task vector and is left out, as in mergekit")
    names = [m.name for m in out.specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistacError(f"{where}: several models are named {dup}; give each a distinct 'name'")
    return out


def _scalar_types(typ: Any) -> set[Any]:
    """The scalar types a parameter annotation allows: ``float | list[float] | None`` -> {float, None}."""
    if typ is Any:
        return {Any}
    if typing.get_origin(typ) in (list, tuple):
        return set().union(*(_scalar_types(a) for a in typing.get_args(typ) if a is not Ellipsis))
    args = typing.get_args(typ)
    if args:  # a union
        return set().union(*(_scalar_types(a) for a in args))
    return {None if typ is type(None) else typ}


def _check_scalar(x: Any, allowed: set[Any], what: str) -> None:
    if Any in allowed or (x is None and None in allowed):
        return
    if isinstance(x, bool):
        ok = bool in allowed
    elif isinstance(x, int):
        ok = bool(allowed & {int, float})
    elif isinstance(x, float):
        if float in allowed and not math.isfinite(x):
            raise DistacError(f"{what} must be a finite number, got {x}")
        ok = float in allowed
    else:
        ok = type(x) in allowed
    if not ok:
        names = sorted("null" if t is None else getattr(t, "__name__", str(t)) for t in allowed)
        raise DistacError(f"{what} must be {' or '.join(names)}, got {x!r}")


def _check_param_types(method: Method, params: Mapping[str, Any], where: str) -> None:
    """Every parameter value has its annotation's type (lists only where per model); floats are finite."""
    for name, value in params.items():
        spec = method.params.get(name)
        if spec is None:
            continue  # Method.resolve names the unknown parameter with its closest valid names
        allowed = _scalar_types(spec.type)
        if isinstance(value, list | tuple):
            if not spec.per_model:
                raise DistacError(f"{where}: parameter '{name}' is one value for all models, got a list {value!r}")
            for i, x in enumerate(value):
                _check_scalar(x, allowed, f"{where}: parameter '{name}' (value {i + 1} of {len(value)})")
        else:
            _check_scalar(value, allowed, f"{where}: parameter '{name}'")


def _heads(raw: Mapping[str, Any], where: str) -> list[str]:
    """The ``heads`` patterns; each ``re:`` pattern must compile."""
    heads = raw.get("heads") or []
    heads = [heads] if isinstance(heads, str) else heads
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise DistacError(f"{where}: 'heads' must be a pattern or a list of patterns, got {raw.get('heads')!r}")
    for h in heads:
        compile_head_pattern(h)
    return heads


def _dtypes(raw: Mapping[str, Any], where: str) -> torch.dtype | None:
    """The output dtype from ``dtype``/``out_dtype`` (None: each tensor's dtype in the base).

    As in mergekit, ``out_dtype`` defaults to ``dtype`` (``dtype: float32`` on bf16 models writes
    float32); distac's arithmetic is fp32 whatever ``dtype`` says (mergekit computes in ``dtype``).
    """
    dtype = _dtype(raw["dtype"], "dtype", where) if raw.get("dtype") is not None else None
    out_dtype = _dtype(raw["out_dtype"], "out_dtype", where) if raw.get("out_dtype") is not None else None
    if dtype == torch.float64:
        raise DistacError(f"{where}: 'dtype: float64' is not supported; distac computes in float32")
    return dtype if out_dtype is None else out_dtype


def _method(name: str) -> Method:
    """The registered method, or EMR-Merging's record (a bundle writer, outside the per-tensor registry)."""
    if name == "emr":
        from .emr import EMR  # here: emr.py imports this module

        return EMR
    return get_method(name)


def _check_emr(
    raw: Mapping[str, Any], gparams: Mapping[str, Any], base: ModelSpec, models: _Models, where: str
) -> None:
    """What EMR-Merging refuses: parameters, statistics, dtypes, allow_nonfinite (each one line, with why)."""
    given = [*gparams, *(k for p in models.params for k in p)]
    if given:
        raise DistacError(
            f"{where}: method 'emr' takes no parameters (got {sorted(set(given))}): it is tuning-free, each "
            "task's rescaler λ_t comes from the task vectors; remove them"
        )
    stats = sorted({k for s in (base, *models.specs) for k in s.stats})
    if stats:
        raise DistacError(f"{where}: method 'emr' reads no statistics; remove {stats} from the config")
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            raise DistacError(
                f"{where}: '{key}' is not accepted with method 'emr': its bundle stores τ_uni in the base's dtype "
                "and the exact λ_t, and rebuilds each task in the base's dtype; remove it"
            )
    if raw.get("allow_nonfinite"):
        raise DistacError(f"{where}: 'allow_nonfinite' is not accepted with method 'emr': it always stops at NaN/Inf")


# ----------------------------------------------------------------------------------------------
# a mergekit config (see distac.merging.mergekit for the rule that recognises one)
# ----------------------------------------------------------------------------------------------
@dataclass
class _MkModels:
    """The models of a mergekit config after the base is placed: specs, settings, YAML positions."""

    specs: list[ModelSpec] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    yaml_index: list[int] = field(default_factory=list)
    base_at: list[int] = field(default_factory=list)  # YAML positions of entries that are the base


def _mk_models(raw: Mapping[str, Any], base: ModelSpec | None, folder: Path, where: str) -> _MkModels:
    if not isinstance(raw["models"], list) or not raw["models"]:
        raise DistacError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    out = _MkModels()
    for i, entry in enumerate(raw["models"]):
        spec, params = _model_entry(entry, folder, f"{where}: models[{i}]")
        for k, v in params.items():
            check_setting(v, f"{where}: models[{i}]: parameter '{k}'")
        if base is not None and spec.path == base.path and spec.adapter is None:  # BASE+ADAPTER is a fine-tune
            out.base_at.append(i)
        out.specs.append(spec)
        out.settings.append(params)
        out.yaml_index.append(i)
    return out


def _keep(models: _MkModels, keep: list[int]) -> None:
    """Keep the models at list positions ``keep``, in that order."""
    models.specs = [models.specs[j] for j in keep]
    models.settings = [models.settings[j] for j in keep]
    models.yaml_index = [models.yaml_index[j] for j in keep]


def _place_base(
    mk: str, base: ModelSpec | None, models: _MkModels, gparams: Mapping[str, Any], notes: list[str], where: str
) -> ModelSpec:
    """The engine's reference, and the base among the models where mergekit merges it as one.

    ``linear``/``average``: the base is one of the averaged models (listed or, with a top-level
    weight, added) and the reference is zero. ``karcher``: the base is one more averaged point
    (reference zero). ``slerp``: the base is the start point θ_1. Every other method: the base is
    the reference and an entry listing it has no task vector.
    """
    listed = [models.yaml_index.index(i) for i in models.base_at]
    if base is None:
        if mk not in NO_BASE:
            raise DistacError(f"{where}: method '{mk}' needs a base_model (its task vectors are taken against it)")
        return ModelSpec(models.specs[0].path, models.specs[0].name, zero=True)
    if mk in ("linear", "average"):
        if not listed:
            if "weight" not in gparams:
                raise DistacError(
                    f"{where}: base_model is not among the models of '{mk}'; mergekit averages it in with the "
                    "top-level weight: list it under models with a weight, or remove base_model"
                )
            models.specs.append(base)
            models.settings.append({})
            models.yaml_index.append(len(models.yaml_index))
            notes.append(f"base_model {base.name} is averaged in with the top-level weight, as in mergekit")
        return ModelSpec(models.specs[0].path, models.specs[0].name, zero=True)
    if mk == "karcher":
        # mergekit gathers the base_model with the models and takes the Karcher mean of them all
        if not listed:
            models.specs.append(base)
            models.settings.append({})
            models.yaml_index.append(len(models.yaml_index))
            notes.append(f"karcher: base_model {base.name} is one of the averaged points, as in mergekit")
        return ModelSpec(models.specs[0].path, models.specs[0].name, zero=True)
    if mk == "slerp":
        others = [j for j in range(len(models.specs)) if j not in listed]
        if listed:
            _keep(models, [listed[0], *others])  # mergekit interpolates from the base to the other model
        elif len(models.specs) == 1:
            models.specs.insert(0, base)
            models.settings.insert(0, {})
            models.yaml_index.insert(0, -1)
        else:
            notes.append(
                "slerp: the base_model is not among the models; distac interpolates between the two models "
                "(mergekit refuses three models)"
            )
        return base
    if listed:
        _keep(models, [j for j in range(len(models.specs)) if j not in listed])
        notes.append(
            f"models{sorted(models.base_at)} is the base_model: it has no task vector and is left out of '{mk}', "
            "as in mergekit"
        )
    if not models.specs:
        raise DistacError(f"{where}: 'models' lists only the base model")
    return base


def _mk_reading(mk: str, gparams: Mapping[str, Any], models: _MkModels, notes: list[str], where: str) -> Reading:
    """mergekit's method and config-wide options in distac terms, with the notes they call for."""
    flags = global_flags(mk, gparams, where)
    method = ("average" if flags["normalize"] else "task_arithmetic") if mk == "linear" else mk
    if flags["rescale"] and mk in GTA_DEFAULTS and not mk.startswith(("dare", "della")):
        raise DistacError(
            f"{where}: 'rescale: true' with '{mk}' (mergekit rescales the trimmed task vectors to their L1 norm) "
            "is not offered by distac; remove it"
        )
    if gparams.get("filter_wise") not in (None, False):
        raise DistacError(f"{where}: 'filter_wise: true' (per-row Model Stock) is not offered by distac; remove it")
    dens = [v for p in models.settings for k, v in p.items() if k == "density"] + [gparams.get("density", 1.0)]
    if mk.startswith("dare") and flags["rescale"] and any(varies(d) or d < 1 for d in dens):
        notes.append(
            f"{mk}: distac rescales the kept entries by exactly 1/density (DARE paper) where mergekit matches their "
            "L1 norm, and draws its own random mask: results differ from mergekit's by design"
        )
    if mk.startswith("breadcrumbs") and any(varies(d) or d < 1 for d in dens):
        notes.append(f"{mk}: distac masks each row (official Breadcrumbs) where mergekit masks the whole tensor")
    if mk in NO_WEIGHT and any("weight" in p for p in models.settings):
        notes.append(f"{mk}: the per-model 'weight' is ignored, as mergekit ignores it")
        for p in models.settings:
            p.pop("weight", None)
    ignored = sorted(k for k in MERGEKIT_ONLY if k in gparams and mk not in GTA_DEFAULTS and mk != "linear")
    if ignored:
        notes.append(f"{mk}: {ignored} ignored, as mergekit ignores them for this method")
    return Reading(mk, method, flags, notes)


def _validate_settings(method: Method, params: MergekitParams, n: int) -> None:
    """Check the values every tensor can get: each filter's, at every gradient knot."""
    names = {""} | {
        c["filter"]
        for s in [*params.settings.values(), *(v for p in params.model_settings for v in p.values())]
        if isinstance(s, list)
        for c in s
        if isinstance(c, Mapping) and isinstance(c.get("filter"), str)
    }
    knots = {0.0, 1.0} | {
        i / (len(s) - 1)
        for s in [*params.settings.values(), *(v for p in params.model_settings for v in p.values())]
        if isinstance(s, list) and len(s) > 1 and not isinstance(s[0], Mapping)
        for i in range(len(s))
    }
    for name in sorted(names):
        for t in sorted(knots):
            at = f"for tensors matching {name!r} at layer position {t:g}" if name else f"at layer position {t:g}"
            try:
                values = params.evaluate(name, t)
                _check_param_types(method, values, at)
                method.resolve(values, n)
            except DistacError as e:
                raise DistacError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None


def _load_mergekit(raw: dict[str, Any], folder: Path, where: str, reason: str, source: Path | None) -> MergeConfig:
    """A config read with mergekit's meaning (see :mod:`distac.merging.mergekit`)."""
    check_no_mix(raw, where)
    if "models" not in raw:
        raise DistacError(f"{where}: missing required key 'models'")
    mk = raw["merge_method"]
    gparams = raw.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        raise DistacError(f"{where}: 'parameters' must be a mapping")
    for k, v in gparams.items():
        check_setting(v, f"{where}: parameter '{k}'")
    notes = [f"read with mergekit's meaning ({reason}); see 'Coming from mergekit' in distac's README"]
    base = _base_entry(raw, folder, where) if raw.get("base_model") is not None else None
    models = _mk_models(raw, base, folder, where)
    check_keys(mk, gparams, models.settings, where)
    ref = _place_base(mk, base, models, gparams, notes, where)
    reading = _mk_reading(mk, gparams, models, notes, where)
    method = _method(reading.method)
    settings = {k: v for k, v in gparams.items() if k not in MERGEKIT_ONLY or k == "lambda"}
    try:
        params = MergekitParams(reading, settings, [dict(p) for p in models.settings])
        _validate_settings(method, params, len(models.specs))
    except DistacError as e:
        raise DistacError(f"{where}: {e}") from None
    names = [m.name for m in models.specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistacError(f"{where}: several models are named {dup}; give each a distinct 'name'")
    norm = copy.deepcopy(dict(raw))
    if base is not None:
        norm["base_model"] = {"model": str(base.path)}
    norm["models"] = [
        {"model": str(m.path), "name": m.name, **({"parameters": raw_params} if raw_params else {})}
        for m, raw_params in zip(models.specs, models.settings, strict=True)
    ]
    if reading.method == "slerp" and models.yaml_index and models.yaml_index[0] == -1:
        norm["models"] = norm["models"][1:]
    vocab = parse_vocab(raw, lambda v, what: _model_path(folder, v, f"{where}: {what}")[0], where)
    norm |= absolute_settings(raw, vocab)
    for note in notes:
        warn(note)
    cfg = MergeConfig(
        method,
        ref,
        models.specs,
        params,
        _dtypes(raw, where),
        _heads(raw, where),
        norm,
        bool(raw.get("allow_nonfinite", False)),
        source,
        vocab,
    )
    cfg.mergekit, cfg.notes = reason, notes
    return cfg


def load_config(config: Mapping[str, Any] | str | Path) -> MergeConfig:
    """Read and validate a merge config (see the module docstring for the YAML).

    Args:
        config: a YAML path, or the same content as a dict. Relative paths resolve against the
            YAML's folder (the current directory for a dict).

    Returns:
        The validated :class:`MergeConfig`.

    Raises:
        DistacError: naming the file and the key at fault.

    Example:
        >>> cfg = load_config("merge.yml")  # doctest: +SKIP
        >>> cfg.method.name, [m.name for m in cfg.models]  # doctest: +SKIP
        ('ties', ['a', 'b'])
    """
    raw, folder, where = _read(config)
    _check_keys(raw, TOP_KEYS, where)
    if "merge_method" in raw and not isinstance(raw["merge_method"], str):
        raise DistacError(f"{where}: 'merge_method' must be a method name, got {raw['merge_method']!r}")
    reason = mergekit_reason(raw) if "merge_method" in raw else None
    if reason is not None:
        if not isinstance(raw.get("allow_nonfinite", False), bool):
            raise DistacError(f"{where}: 'allow_nonfinite' must be true or false, got {raw['allow_nonfinite']!r}")
        source = None if isinstance(config, Mapping) else Path(config).resolve()
        return _load_mergekit(raw, folder, where, reason, source)
    for k in ("merge_method", "base_model", "models"):
        if k not in raw:
            raise DistacError(f"{where}: missing required key '{k}'")
    if not isinstance(raw["merge_method"], str):
        raise DistacError(f"{where}: 'merge_method' must be a method name, got {raw['merge_method']!r}")
    allow_nonfinite = raw.get("allow_nonfinite", False)
    if not isinstance(allow_nonfinite, bool):
        raise DistacError(f"{where}: 'allow_nonfinite' must be true or false, got {allow_nonfinite!r}")
    method = _method(raw["merge_method"])
    base = _base_entry(raw, folder, where)
    models = _model_entries(raw, base, folder, where)
    gparams = raw.get("parameters") or {}
    if not isinstance(gparams, Mapping):
        raise DistacError(f"{where}: 'parameters' must be a mapping")
    if method.name == "emr":
        _check_emr(raw, gparams, base, models, where)
    params = _gather_params(method, gparams, [dict(p) for p in models.params], where, models.yaml_index)
    _check_param_types(method, params, where)
    method.resolve(params, len(models.specs))  # validate now: ranges, unknown names, model counts
    note = count_mean_note(method.name, params)
    if note:
        warn(note)
    out_dtype = _dtypes(raw, where)
    heads = _heads(raw, where)
    # the config with absolute paths and explicit names, so the output's copy re-runs from anywhere
    norm = copy.deepcopy(dict(raw))
    norm["base_model"] = {"model": base.ref}
    if base.stats:
        norm["base_model"]["parameters"] = {k: str(v) for k, v in base.stats.items()}
    norm["models"] = models.entries
    source = None if isinstance(config, Mapping) else Path(config).resolve()
    vocab = parse_vocab(raw, lambda v, what: _model_path(folder, v, f"{where}: {what}")[0], where)
    norm |= absolute_settings(raw, vocab)
    return MergeConfig(method, base, models.specs, params, out_dtype, heads, norm, allow_nonfinite, source, vocab)

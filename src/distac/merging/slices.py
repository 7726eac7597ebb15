"""Frankenmerges: mergekit's ``slices:`` configs, each output layer built from named layers of the inputs.

The YAML is mergekit's (``examples/orcamini-platy-44layer.yml``)::

    merge_method: passthrough               # or any method: a slice with several sources is merged per layer
    base_model: ./a                         # optional; a slice may set its own
    slices:
      - sources:
          - model: ./a
            layer_range: [0, 24]            # layers 0..23 of ./a become output layers 0..23
      - sources:
          - model: ./b
            layer_range: [20, 40]           # layers 20..39 of ./b become output layers 24..43
        parameters: {t: [0, 0.5, 1]}        # per slice; per source under sources[i].parameters
    dtype: float16
    tokenizer_source: union                 # see distac.merging.vocab

Rules, all mergekit's (``mergekit/plan.py``):

* the sources of one slice name the same number of layers; output layers are numbered in order;
* a slice with one source copies its layers (any method, as mergekit's passthrough); a slice with
  several merges them layer by layer with the method, the base being the source whose model is
  the slice's (else the config's) ``base_model``;
* non-layer tensors before the layers (embeddings: a name with ``embed``, ``wte`` or ``wpe``) come
  from the first slice's sources, the others (final norm, LM head) from the last slice's, merged
  like a layer when the slice has several sources;
* parameters: a source's own value, else the slice's, else the config's; gradient lists
  (``t: [0, 0.5, 1]``) are interpolated over the layers *of the slice* (t = k/(n-1)), filter lists
  (``- filter: mlp``) match a substring of the output tensor's name; non-layer tensors use t = 0;
* ``config.json`` comes from the base model (else the first slice's first source), with
  ``num_hidden_layers`` (``n_layer``, ``num_layers``) set to the output's layer count and every
  per-layer list (``layer_types``) rebuilt from each output layer's source.

Each merged group of tensors runs through the normal engine (:func:`distac.merging.engine.run_merge`)
on :class:`distac.tensors.RenamedSource` views: output layer ``j`` of a source view reads its layer
``i``. The method's parameters go through :func:`distac.merging.config.load_config`, so a slice is
merged exactly as a ``models:`` config with the same scalar parameters would be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DistacError
from ..io import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    atomic_dir,
    check_output,
    copy_model_files,
    open_checkpoint,
    parse_size,
    update_model_config,
)
from ..nn.models import default_device
from ..progress import track
from ..tensors import RenamedSource, TensorSource
from .card import slices_card

# config's own readers: one message for unknown keys, one path/Hub-id resolver, one dtype rule
from .config import DTYPES, _check_keys, _dtypes, _model_path, _read, dump_yaml, load_config
from .engine import DEFAULT_CHUNK_BYTES, check_finite_output, run_merge
from .mergekit import evaluate_setting
from .vocab import Vocab, VocabSpec, absolute_settings, align_sources, build_vocab, finish_tokenizer, parse_vocab

__all__ = ["SlicesConfig", "is_slices_config", "load_slices", "merge_slices"]

TOP_KEYS = (
    "merge_method",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "allow_nonfinite",
)
SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
#: ``model.layers.3.mlp.up_proj.weight``: Llama/Mistral ``layers``, BERT ``layer``, GPT-2 ``h``, ``blocks``
LAYER = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|layer|h|blocks))\.(?P<i>\d+)\.(?P<rest>.+)$")
#: config.json keys that hold the layer count (mergekit's num_layers_config_key, per architecture)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class SliceSource:
    """One input of an output slice: layers ``start..stop-1`` of ``path``."""

    path: Path
    start: int
    stop: int
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """Consecutive output layers, built from the same layers of each source."""

    sources: list[SliceSource]
    base: Path | None
    params: Mapping[str, Any]

    @property
    def n_layers(self) -> int:
        return self.sources[0].stop - self.sources[0].start


@dataclass
class SlicesConfig:
    """A validated ``slices:`` config (see the module docstring)."""

    method: str
    slices: list[OutputSlice]
    base: Path | None
    params: Mapping[str, Any]
    raw: dict[str, Any]  # with absolute paths: re-runnable from anywhere (distac_config.yml)
    out_dtype: torch.dtype | None
    vocab: VocabSpec | None
    allow_nonfinite: bool = False
    source: Path | None = None

    @property
    def donor(self) -> Path:
        """The model whose config.json and other files the output takes (mergekit's rule)."""
        return self.base or self.slices[0].sources[0].path

    def models(self) -> list[Path]:
        """Every model the config reads, the donor first, each once."""
        seen = [self.donor]
        for s in self.slices:
            seen += [src.path for src in s.sources if src.path not in seen]
        return seen


def is_slices_config(config: Mapping[str, Any] | str | Path) -> bool:
    """Whether ``config`` (a YAML path or a dict) is a ``slices:`` config (a frankenmerge).

    Example:
        >>> is_slices_config({"merge_method": "passthrough", "slices": []})
        True
    """
    raw = config if isinstance(config, Mapping) else _read(config)[0]
    return "slices" in raw


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DistacError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 2 and all(type(x) is int for x in value)
    if not ok or not 0 <= value[0] < value[1]:
        raise DistacError(f"{where}: 'layer_range' must be [start, stop] with 0 <= start < stop, got {value!r}")
    return int(value[0]), int(value[1])


def _source(entry: Any, folder: Path, where: str) -> SliceSource:
    if not isinstance(entry, Mapping) or "model" not in entry or "layer_range" not in entry:
        raise DistacError(f"{where}: expected {{model: PATH, layer_range: [start, stop]}}, got {entry!r}")
    _check_keys(entry, SOURCE_KEYS, where)
    path = _model_path(folder, entry["model"], f"{where}: model")[0]
    start, stop = _layer_range(entry["layer_range"], where)
    return SliceSource(path, start, stop, _mapping(entry.get("parameters"), f"{where}: parameters"))


def _slice(entry: Any, folder: Path, where: str) -> OutputSlice:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
        raise DistacError(f"{where}: expected {{sources: [{{model: PATH, layer_range: [start, stop]}}, ...]}}")
    _check_keys(entry, SLICE_KEYS, where)
    sources = [_source(e, folder, f"{where}: sources[{i}]") for i, e in enumerate(entry["sources"])]
    lengths = sorted({s.stop - s.start for s in sources})
    if len(lengths) > 1:
        raise DistacError(f"{where}: its sources name {lengths} layers; every source of a slice names as many")
    base = _model_path(folder, entry["base_model"], f"{where}: base_model")[0] if entry.get("base_model") else None
    return OutputSlice(sources, base, _mapping(entry.get("parameters"), f"{where}: parameters"))


def _normalized(raw: Mapping[str, Any], cfg_slices: list[OutputSlice], base: Path | None) -> dict[str, Any]:
    """The config with absolute paths, so the output's copy re-runs from anywhere."""
    norm = dict(raw)
    if base is not None:
        norm["base_model"] = str(base)
    norm["slices"] = []
    for s, given in zip(cfg_slices, raw["slices"], strict=True):
        out: dict[str, Any] = {
            "sources": [{**dict(e), "model": str(src.path)} for src, e in zip(s.sources, given["sources"], strict=True)]
        }
        out |= {k: v for k, v in given.items() if k != "sources"}
        if s.base is not None:
            out["base_model"] = str(s.base)
        norm["slices"].append(out)
    return norm


def load_slices(config: Mapping[str, Any] | str | Path) -> SlicesConfig:
    """Read and validate a ``slices:`` config (see the module docstring).

    Args:
        config: a YAML path, or the same content as a dict (paths relative to the current directory).

    Returns:
        The validated :class:`SlicesConfig`; layer ranges are checked against the models when merging.

    Example:
        >>> cfg = load_slices("frankenmerge.yml")  # doctest: +SKIP
        >>> [s.n_layers for s in cfg.slices]  # doctest: +SKIP
        [24, 20]
    """
    raw, folder, where = _read(config)
    if "models" in raw:
        raise DistacError(f"{where}: give 'models' or 'slices', not both (as in mergekit)")
    _check_keys(raw, TOP_KEYS, where)
    if not isinstance(raw.get("merge_method"), str):
        raise DistacError(f"{where}: 'merge_method' must be a method name, got {raw.get('merge_method')!r}")
    if not isinstance(raw["slices"], list) or not raw["slices"]:
        raise DistacError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}")
    slices = [_slice(e, folder, f"{where}: slices[{i}]") for i, e in enumerate(raw["slices"])]
    base = _model_path(folder, raw["base_model"], f"{where}: base_model")[0] if raw.get("base_model") else None
    allow = raw.get("allow_nonfinite", False)
    if not isinstance(allow, bool):
        raise DistacError(f"{where}: 'allow_nonfinite' must be true or false, got {allow!r}")

    def resolve(value: Any, what: str) -> Path:
        return _model_path(folder, value, f"{where}: {what}")[0]

    vocab = parse_vocab(raw, resolve, where)
    return SlicesConfig(
        method=raw["merge_method"],
        slices=slices,
        base=base,
        params=_mapping(raw.get("parameters"), f"{where}: parameters"),
        raw=_normalized(raw, slices, base) | absolute_settings(raw, vocab),
        out_dtype=_dtypes(raw, where),
        vocab=vocab,
        allow_nonfinite=allow,
        source=None if isinstance(config, Mapping) else Path(config).resolve(),
    )


def _first_set(levels: Sequence[Mapping[str, Any]], name: str, tensor: str, t: float) -> Any:
    """The first level whose ``name`` evaluates to a value (mergekit's precedence), else None."""
    for level in levels:
        if name in level:
            value = evaluate_setting(tensor, level[name], t)
            if value is not None:
                return value
    return None


def _params_at(
    out_slice: OutputSlice, top: Mapping[str, Any], tensor: str, t: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scalar parameters of one output tensor: the shared ones, and each source's own."""
    shared_names = list(dict.fromkeys([*out_slice.params, *top]))
    shared = {n: v for n in shared_names if (v := _first_set([out_slice.params, top], n, tensor, t)) is not None}
    own = [
        {n: v for n in src.params if (v := evaluate_setting(tensor, src.params[n], t)) is not None}
        for src in out_slice.sources
    ]
    return shared, own


# --------------------------------------------------------------------------- the plan


@dataclass
class Group:
    """Output tensors merged (or copied) together: same sources, same scalar parameters."""

    out_slice: OutputSlice
    names: dict[str, list[str]]  # output name -> the input name in each source
    shared: dict[str, Any]
    own: list[dict[str, Any]]

    def same_setting(self, out_slice: OutputSlice, shared: Mapping[str, Any], own: Sequence[Mapping[str, Any]]) -> bool:
        return self.out_slice is out_slice and self.shared == shared and self.own == list(own)


@dataclass
class Layers:
    """A model's tensors sorted into layers and the rest."""

    layers: dict[int, list[tuple[str, str, str]]]  # layer -> (name, prefix, rest), in key order
    pre: list[str]  # non-layer tensors before the layers (embeddings)
    post: list[str]  # the other non-layer tensors (final norm, LM head)


def _is_pre(name: str) -> bool:
    """Embedding-like tensors come before the layers (mergekit's pre_weights)."""
    parts = name.split(".")
    return "embed" in name or "wte" in parts or "wpe" in parts


def split_layers(keys: Sequence[str]) -> Layers:
    """Sort tensor names into numbered layers, tensors before the layers and tensors after them.

    Example:
        >>> split_layers(["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.norm.weight"]).layers
        {0: [('model.layers.0.mlp.w', 'model.layers', 'mlp.w')]}
    """
    out = Layers({}, [], [])
    for k in keys:
        m = LAYER.match(k)
        if m is None:
            (out.pre if _is_pre(k) else out.post).append(k)
        else:
            out.layers.setdefault(int(m["i"]), []).append((k, m["pre"], m["rest"]))
    return out


def _check_ranges(cfg: SlicesConfig, layouts: Mapping[Path, Layers]) -> None:
    for i, s in enumerate(cfg.slices):
        for j, src in enumerate(s.sources):
            n = len(layouts[src.path].layers)
            if src.stop > n:
                raise DistacError(
                    f"slices[{i}]: sources[{j}]: layer_range [{src.start}, {src.stop}] is past the {n} layers of "
                    f"{src.path}"
                )


def plan_groups(cfg: SlicesConfig, layouts: Mapping[Path, Layers]) -> list[Group]:
    """Every output tensor in output order, grouped by sources and parameters (one engine run per group).

    Args:
        cfg: the slices config.
        layouts: each model's :func:`split_layers`.

    Returns:
        The groups; their ``names`` together are the output checkpoint, in order.
    """
    _check_ranges(cfg, layouts)
    groups: list[Group] = []

    def add(out_slice: OutputSlice, out_name: str, in_names: list[str], t: float) -> None:
        shared, own = _params_at(out_slice, cfg.params, out_name, t)
        if groups and groups[-1].same_setting(out_slice, shared, own):
            groups[-1].names[out_name] = in_names
        else:
            groups.append(Group(out_slice, {out_name: in_names}, shared, own))

    first, last = cfg.slices[0], cfg.slices[-1]
    for name in layouts[first.sources[0].path].pre:
        add(first, name, [name] * len(first.sources), 0.0)
    out_layer = 0
    for s in cfg.slices:
        donor = layouts[s.sources[0].path]
        for k in range(s.n_layers):
            t = k / (s.n_layers - 1) if s.n_layers > 1 else 1.0
            for _name, prefix, rest in donor.layers[s.sources[0].start + k]:
                add(s, f"{prefix}.{out_layer}.{rest}", [f"{prefix}.{src.start + k}.{rest}" for src in s.sources], t)
            out_layer += 1
    for name in layouts[last.sources[0].path].post:
        add(last, name, [name] * len(last.sources), 0.0)
    return groups


def layer_sources(cfg: SlicesConfig) -> list[tuple[Path, int]]:
    """For each output layer, the model and layer it is taken from (the slice's first source)."""
    return [(s.sources[0].path, s.sources[0].start + k) for s in cfg.slices for k in range(s.n_layers)]


# --------------------------------------------------------------------------- config.json


def _read_config(model: Path) -> dict[str, Any]:
    path = model / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def layer_config_values(cfg: SlicesConfig, n_donor_layers: int) -> dict[str, Any]:
    """The config.json values a frankenmerge changes: the layer count and every per-layer list.

    A per-layer list is a top-level list as long as the donor's layer count (``layer_types``);
    output layer ``j`` takes the entry of the layer it was copied from, in that layer's own model.
    """
    donor = _read_config(cfg.donor)
    per_layer = [k for k, v in donor.items() if isinstance(v, list) and len(v) == n_donor_layers]
    configs = {p: _read_config(p) for p in cfg.models()}
    sources = layer_sources(cfg)
    values: dict[str, Any] = {k: len(sources) for k in LAYER_COUNT_KEYS if k in donor}
    for key in per_layer:
        values[key] = [_entry(configs[p].get(key), donor[key], i) for p, i in sources]
    return values


def _entry(own: Any, donor: list[Any], i: int) -> Any:
    """Layer ``i``'s entry of a per-layer list: its own model's, else the donor's (clamped to its length)."""
    return own[i] if isinstance(own, list) and i < len(own) else donor[min(i, len(donor) - 1)]


# --------------------------------------------------------------------------- running


def _group_config(cfg: SlicesConfig, group: Group) -> dict[str, Any]:
    """The ``models:`` config merging one group, with its scalar parameters (validated by load_config)."""
    base = group.out_slice.base or cfg.base
    entries = [
        {"model": str(src.path), "name": f"source{i}", **({"parameters": own} if own else {})}
        for i, (src, own) in enumerate(zip(group.out_slice.sources, group.own, strict=True))
    ]
    raw: dict[str, Any] = {"merge_method": cfg.method, "models": entries, "allow_nonfinite": cfg.allow_nonfinite}
    if base is not None:
        raw["base_model"] = str(base)
    if group.shared:
        raw["parameters"] = group.shared
    if cfg.out_dtype is not None:
        raw["out_dtype"] = next(k for k, v in DTYPES.items() if v == cfg.out_dtype)
    return raw


def _base_index(group: Group, base: Path, where: str) -> int:
    paths = [s.path for s in group.out_slice.sources]
    if base not in paths:
        raise DistacError(
            f"{where}: base_model {base} is not among the slice's sources; list it with its layer_range, as mergekit "
            "merges a layer with the base's same layer"
        )
    return paths.index(base)


class _Inputs:
    """The opened models, and per set of merged sources their views with the vocabulary aligned."""

    def __init__(self, cfg: SlicesConfig, stack: ExitStack):
        self.cfg = cfg
        self.opened: dict[Path, TensorSource] = {
            p: stack.enter_context(closing(open_checkpoint(p))) for p in cfg.models()
        }
        self.vocab: Vocab | None = None
        if cfg.vocab is not None and cfg.vocab.source is not None:
            self.vocab = build_vocab(cfg.vocab, cfg.base, cfg.models())
        self._views: dict[tuple[Path, ...], Mapping[Path, TensorSource]] = {}

    def sources_for(self, out_slice: OutputSlice) -> Mapping[Path, TensorSource]:
        """The models as the slice's merge reads them (mergekit aligns rows among a tensor's sources and the base)."""
        if self.vocab is None:
            return self.opened
        base = out_slice.base or self.cfg.base
        members = tuple(dict.fromkeys([*(s.path for s in out_slice.sources), *([base] if base else [])]))
        if members not in self._views:
            self._views[members] = align_sources(self.vocab, self.opened, base, members)
        return self._views[members]

    def view(self, group: Group, i: int) -> RenamedSource:
        """Source ``i`` of the group under the output's tensor names."""
        src = group.out_slice.sources[i]
        names = {out: ins[i] for out, ins in group.names.items()}
        label = f"{src.path} layers {src.start}..{src.stop - 1}"
        return RenamedSource(self.sources_for(group.out_slice)[src.path], names, label)


@dataclass
class _Run:
    """What every group's merge shares: the inputs, the writer and the run options."""

    cfg: SlicesConfig
    inputs: _Inputs
    sink: Callable[[str, Tensor], None]
    dtypes: Mapping[str, torch.dtype]
    device: torch.device
    chunk: int

    def copy(self, group: Group) -> None:
        view = self.inputs.view(group, 0)
        scale = group.own[0].get("scale", group.shared.get("scale"))  # mergekit passthrough's one parameter
        for name in view.keys():
            t = view.get(name)
            if scale is not None and t.is_floating_point():
                t = t * scale
            if not self.cfg.allow_nonfinite:
                check_finite_output(name, t, self.dtypes[name], where=str(view.file_of(name)))
            self.sink(name, t)

    def merge(self, group: Group, where: str) -> None:
        mcfg = load_config(_group_config(self.cfg, group))
        index = {f"source{i}": i for i in range(len(group.out_slice.sources))}
        base = self.inputs.view(group, _base_index(group, mcfg.base.path, where))
        models = [self.inputs.view(group, index[m.name]) for m in mcfg.models]
        run_merge(
            base,
            models,
            mcfg.method,
            mcfg.params,
            self.sink,
            device=self.device,
            chunk_bytes=self.chunk,
            out_dtype=lambda k: self.dtypes[k],
            allow_nonfinite=self.cfg.allow_nonfinite,
        )


def _layout(groups: Sequence[Group], inputs: _Inputs, out_dtype: torch.dtype | None) -> list:
    layout = []
    for g in groups:
        donor = inputs.sources_for(g.out_slice)[g.out_slice.sources[0].path]
        for out, ins in g.names.items():
            d = donor.dtype(ins[0])
            layout.append((out, donor.shape(ins[0]), out_dtype if out_dtype is not None and d.is_floating_point else d))
    return layout


def _progress(groups: Sequence[Group], quiet: bool) -> Iterator[tuple[int, Group]]:
    return track(enumerate(groups), desc="frankenmerge", total=len(groups), unit="group", quiet=quiet)


def merge_slices(
    config: Mapping[str, Any] | str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    chunk_bytes: int | str = DEFAULT_CHUNK_BYTES,
    quiet: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Build the model a ``slices:`` config describes (see the module docstring) into ``out``.

    Args:
        config: a YAML path or a dict.
        out: the output folder (written to a temporary folder, renamed when complete).
        overwrite, device, max_shard_bytes, chunk_bytes, quiet, allow_nonfinite: as for
            :func:`distac.merging.checkpoints.merge_checkpoints`.

    Returns:
        ``out``: the weights, the donor's config.json (layer count updated) and other files, the
        tokenizer, ``README.md`` and ``distac_config.yml``.

    Example:
        >>> merge_slices({"merge_method": "passthrough", "slices": [  # doctest: +SKIP
        ...     {"sources": [{"model": "a", "layer_range": [0, 4]}]},
        ...     {"sources": [{"model": "b", "layer_range": [2, 6]}]}]}, "franken/")
        PosixPath('franken')
    """
    cfg = load_slices(config)
    cfg.allow_nonfinite = cfg.allow_nonfinite or allow_nonfinite
    out = Path(out)
    inputs = [*cfg.models(), *([cfg.source] if cfg.source else [])]
    check_output(out, overwrite=overwrite, inputs=inputs)
    with ExitStack() as stack:
        models = _Inputs(cfg, stack)
        layouts = {p: split_layers(src.keys()) for p, src in models.opened.items()}
        groups = plan_groups(cfg, layouts)
        layout = _layout(groups, models, cfg.out_dtype)
        dtypes = {k: d for k, _, d in layout}
        with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
            meta = {"distac_method": cfg.method}
            writer = ShardWriter(tmp, layout, max_shard_bytes=parse_size(max_shard_bytes), metadata=meta)
            run = _Run(cfg, models, writer.write, dtypes, default_device(device), parse_size(chunk_bytes))
            try:
                for i, g in _progress(groups, quiet):
                    run.copy(g) if len(g.out_slice.sources) == 1 else run.merge(g, f"slices group {i}")
                writer.close()
            except BaseException:
                writer.abort()
                raise
            _finish(cfg, tmp, len(layouts[cfg.donor].layers), out.name, models.vocab)
    return out


def _finish(cfg: SlicesConfig, tmp: Path, n_donor_layers: int, title: str, vocab: Vocab | None) -> None:
    """The donor's files, config.json's layer count and vocabulary, the tokenizer, the card and the config."""
    if cfg.donor.is_dir():
        copy_model_files(cfg.donor, tmp)
    values = layer_config_values(cfg, n_donor_layers)
    values |= finish_tokenizer(cfg.vocab, vocab, tmp, donor=cfg.donor, models=cfg.models())
    update_model_config(tmp, values, dtype=cfg.out_dtype)  # mergekit writes the output dtype into the config
    (tmp / "README.md").write_text(slices_card(cfg, title))
    (tmp / "distac_config.yml").write_text(dump_yaml(cfg.raw))

"""LoRA adapters (PEFT folders) as checkpoints: the fine-tuned model θ_0 + ΔW, one tensor at a time.

A PEFT LoRA adapter stores, per target module, two factors A (r × in) and B (out × r) and a scale
s = α / r (rsLoRA: α / √r; ``rank_pattern``/``alpha_pattern`` override r and α per module). The
fine-tuned weight is W = W_0 + s · B A (transposed when ``fan_in_fan_out``: GPT-2's ``Conv1D``
stores weights as in × out). Besides the factors, an adapter may hold *whole tensors*:
``modules_to_save`` (a trained classifier head) and the biases trained with ``bias: lora_only`` or
``bias: all``; those replace the base's tensors.

:class:`AdapterSource` presents a base checkpoint plus an adapter as the fine-tuned checkpoint it
stands for: the same names, shapes and dtypes as the base, and each tensor computed as peft's
``merge_and_unload`` computes it (ΔW = transpose(B @ A) · s in fp32, added in place to the base's
weight in its dtype), so merging adapters gives the bits that merging the ``merge_and_unload``
models gives. Memory stays bounded: one ΔW at a time, and tensors the adapter does not touch are the
base's (their task vector is exactly zero).

The adapter's module names are those of the model peft wrapped (``base_model.model.<module>``
stripped); a base saved under another class (``BertModel`` against ``BertForSequenceClassification``:
``encoder.*`` against ``bert.encoder.*``) is matched by one common name prefix added or removed.

DoRA and the peft features that change what merging means (layer replication, trainable token
indices, parametrised expert weights, activated LoRA) are refused with one line naming the key.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistacError
from ..tensors import TensorSource
from .inputs import read_json_object
from .readers import Checkpoint, open_checkpoint

__all__ = [
    "ADAPTER_CONFIG",
    "Adapter",
    "AdapterSource",
    "LoraModule",
    "adapter_weights",
    "delta",
    "is_adapter",
    "open_model",
    "read_adapter",
    "split_adapter_ref",
]

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_MAX_CONFIG = 10_000_000
# factor tensors, by the suffix peft saves them under: (module kind, factor)
_FACTORS = {
    ".lora_A.weight": ("layer", "A"),
    ".lora_B.weight": ("layer", "B"),
    ".lora_B.bias": ("layer", "bias"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
# adapter_config.json settings that change what merging the adapter means: refused, with why
_REFUSED = {
    "use_dora": "DoRA rescales each column of W_0 + ΔW by a learned magnitude, so its task vector is not a "
    "low-rank ΔW; merge the model from peft's merge_and_unload() instead",
    "layer_replication": "the adapter duplicates base layers, so the fine-tuned model has tensors the base lacks",
    "trainable_token_indices": "the adapter trains single embedding rows outside LoRA; merge the model from "
    "peft's merge_and_unload() instead",
    "target_parameters": "LoRA on raw parameters (expert weights) is not supported yet",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, so it has no merged weights",
    "use_qalora": "QALoRA's factors act on pooled inputs, so its ΔW is not B A",
    "use_bdlora": "BD-LoRA's block-diagonal factors are not supported",
}


def adapter_weights(folder: str | Path) -> Path | None:
    """The adapter's weight file in ``folder`` (safetensors preferred over ``.bin``), or None."""
    for name in _WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (``adapter_config.json`` plus adapter weights).

    Example:
        >>> is_adapter("no/such/folder")
        False
    """
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and adapter_weights(p) is not None


def split_adapter_ref(ref: str, folder: str | Path = ".") -> tuple[str, str | None]:
    """mergekit's ``model+adapter`` syntax: ``("model", "adapter")``; a plain reference gives ``(ref, None)``.

    The split is at the last ``+``; a path that exists as written (relative to ``folder``) is never split.

    Example:
        >>> split_adapter_ref("org/base+./my-lora")
        ('org/base', './my-lora')
        >>> split_adapter_ref("./ft")
        ('./ft', None)
    """
    if "+" not in ref or (Path(folder) / ref).exists():
        return ref, None
    model, adapter = ref.rsplit("+", 1)
    if not model or not adapter:
        raise DistacError(f"'{ref}': expected MODEL+ADAPTER (a model and a LoRA adapter folder joined by '+')")
    return model, adapter


@dataclass(frozen=True)
class LoraModule:
    """One module the adapter changes: its factors (keys in the adapter file) and scale."""

    name: str  # the module's name in the adapter's naming (``bert.encoder.layer.0.attention.self.query``)
    kind: str  # "layer" (Linear, Conv1D, Conv) or "embedding"
    a: str
    b: str
    bias: str | None  # lora_B.bias (``lora_bias: true``): adds scaling · bias to the module's bias
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool

    @property
    def weight(self) -> str:
        """The tensor ΔW applies to, in the adapter's naming."""
        return f"{self.name}.weight"


@dataclass
class Adapter:
    """A parsed PEFT LoRA adapter: its config, its modules, the whole tensors it replaces.

    ``tensors`` reads the adapter file lazily (a :class:`~distac.io.Checkpoint`); ``close()`` releases it.
    """

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str | None
    modules_to_save: list[str]
    bias: str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    modules: dict[str, LoraModule]  # by module name
    #: whole tensors the fine-tuned model takes from the adapter: name (adapter naming) -> key in the file
    replaced: dict[str, str]
    tensors: Checkpoint
    config: dict[str, Any] = field(default_factory=dict)

    def factors(self, module: str) -> tuple[Tensor, Tensor]:
        """The module's (A, B) as stored."""
        m = self.modules[module]
        return self.tensors.get(m.a), self.tensors.get(m.b)

    def close(self) -> None:
        self.tensors.close()


def _pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern that matches a dotted suffix of ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _check_config(cfg: Mapping[str, Any], where: Path) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise DistacError(f"{where}: peft_type '{cfg.get('peft_type')}' is not LoRA; distac reads LoRA adapters only")
    for key, why in _REFUSED.items():
        if cfg.get(key) not in (None, False, [], {}, ""):
            raise DistacError(f"{where}: '{key}' is set: {why}")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise DistacError(f"{where}: '{key}' must be a positive number, got {v!r}")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise DistacError(f"{where}: 'bias' must be none, all or lora_only, got {cfg.get('bias')!r}")


def _scale(cfg: Mapping[str, Any], name: str, rank: int, where: Path) -> tuple[int, float, float]:
    """(r, α, scaling) of one module, as peft's ``LoraModel._create_and_replace`` computes them."""
    rp, ap = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    rk, ak = _pattern_key(list(rp), name), _pattern_key(list(ap), name)
    r = rp[rk] if rk is not None else cfg["r"]
    alpha = ap[ak] if ak is not None else cfg["lora_alpha"]
    if r != rank:
        raise DistacError(
            f"{where}: module '{name}' has rank {rank} factors, but its config says r={r}; the adapter is inconsistent"
        )
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scaling


def _classify(keys: Sequence[str], path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split the adapter file's keys into factors per module and whole replaced tensors."""
    factors: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(_PREFIX)
        for suffix, (kind, part) in _FACTORS.items():
            if name.endswith(suffix):
                factors.setdefault(name[: -len(suffix)], {"kind": kind})[part] = key
                break
        else:
            if ".lora_" in name:
                raise DistacError(f"{path}: tensor '{key}' is a LoRA part distac does not know (not lora_A/lora_B)")
            if ".original_module." in name:
                continue  # ``bias: all`` also saves the frozen original of a modules_to_save module
            # a trained bias (``bias: lora_only/all``) of a wrapped layer is saved under ``base_layer``;
            # ``bias: all`` saves a modules_to_save bias twice (plain, and under modules_to_save)
            target = re.sub(r"\.(base_layer|modules_to_save(\.default)?)\.", ".", name)
            if target not in replaced or target == name:
                replaced[target] = key
    return factors, replaced


def read_adapter(path: str | Path) -> Adapter:
    """Parse a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    Args:
        path: the adapter folder.

    Returns:
        An :class:`Adapter` (its weight file is read lazily; ``close()`` releases it).

    Raises:
        DistacError: not an adapter, a setting distac cannot merge exactly (DoRA, ...), or factors
            that disagree with the config, naming the file and the key.

    Example:
        >>> ad = read_adapter("my-lora")  # doctest: +SKIP
        >>> ad.r, sorted(ad.modules)[:1]  # doctest: +SKIP
        (16, ['model.layers.0.self_attn.q_proj'])
    """
    p = Path(path)
    cfg_path = p / ADAPTER_CONFIG
    if not p.exists():
        raise DistacError(f"{p}: no such LoRA adapter folder")
    if not cfg_path.is_file():
        raise DistacError(f"{p}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    weights = adapter_weights(p)
    if weights is None:
        raise DistacError(f"{p}: LoRA adapter without weights (expected {' or '.join(_WEIGHT_FILES)})")
    cfg = read_json_object(cfg_path, "adapter config", _MAX_CONFIG)
    _check_config(cfg, cfg_path)
    tensors = open_checkpoint(weights)
    try:
        factors, replaced = _classify(tensors.keys(), weights)
        modules = {}
        for name, parts in factors.items():
            if "A" not in parts or "B" not in parts:
                raise DistacError(f"{weights}: module '{name}' has only one of its two LoRA factors")
            rank = tensors.shape(parts["A"])[0]
            r, alpha, scaling = _scale(cfg, name, rank, cfg_path)
            fifo = bool(cfg.get("fan_in_fan_out")) and parts["kind"] == "layer"
            modules[name] = LoraModule(
                name, parts["kind"], parts["A"], parts["B"], parts.get("bias"), r, alpha, scaling, fifo
            )
    except BaseException:
        tensors.close()
        raise
    return Adapter(
        path=p,
        r=int(cfg["r"]),
        lora_alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora")),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        target_modules=cfg.get("target_modules"),
        modules_to_save=list(cfg.get("modules_to_save") or []),
        bias=str(cfg.get("bias", "none")),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        modules=modules,
        replaced=replaced,
        tensors=tensors,
        config=cfg,
    )


def _compute_dtype(t: Tensor) -> Tensor:
    # peft loads half-precision adapters as fp32 (autocast_adapter_dtype=True, its default) and
    # computes ΔW in fp32 on CPU in any case
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def delta(adapter: Adapter, module: str, *, weight_shape: Sequence[int] | None = None) -> Tensor:
    """The exact ΔW of one module, computed as peft's ``get_delta_weight`` computes it.

    ``transpose(B @ A, fan_in_fan_out) · scaling`` for Linear/Conv1D layers, ``(B @ A)ᵀ · scaling`` for
    embeddings, and the convolution forms for Conv layers (``weight_shape``, the base weight's shape,
    tells a 1×1 convolution from a larger kernel).

    Args:
        adapter: from :func:`read_adapter`.
        module: a key of ``adapter.modules``.
        weight_shape: the base weight's shape (needed for convolutions only).

    Returns:
        ΔW in fp32 (fp64 for an fp64 adapter), in the base weight's layout.

    Example:
        >>> dw = delta(read_adapter("my-lora"), "model.layers.0.self_attn.q_proj")  # doctest: +SKIP
    """
    m = adapter.modules[module]
    a, b = (_compute_dtype(t) for t in adapter.factors(module))
    if m.kind == "embedding":
        return (b @ a).T * m.scaling
    if a.ndim == 2:
        out = b @ a
        return (out.T if m.fan_in_fan_out else out) * m.scaling
    if a.ndim == 4 and b.ndim == 4:
        shape = tuple(weight_shape) if weight_shape is not None else ()
        if shape[2:4] == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * m.scaling
        if len(shape) == 4 and b.shape[1] == a.shape[0]:
            # peft's conv_fn for an ungrouped Conv2d: ΔW = conv2d(Aᵀ, B)ᵀ
            return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * m.scaling
    raise DistacError(
        f"{adapter.path}: module '{module}' has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}; "
        "distac merges LoRA on Linear, Conv1D, Embedding and ungrouped Conv2d layers only"
    )


def _base_names(adapter_names: Sequence[str], base_keys: Sequence[str], label: str) -> dict[str, str]:
    """Map the adapter's tensor names onto the base's: as they are, or with one common prefix added or removed.

    peft names modules as the wrapped model does (``bert.encoder...`` for a classifier); the base may
    be saved as the bare model (``encoder...``), or the other way round.
    """
    keys = set(base_keys)
    if all(n in keys for n in adapter_names):
        return {n: n for n in adapter_names}
    probe = next(n for n in adapter_names if n not in keys)
    candidates: list[tuple[str, str]] = []
    for k in base_keys:
        if k.endswith("." + probe):
            candidates.append(("add", k[: -len(probe)]))
    head, dot = "", probe.find(".")
    while dot >= 0:
        head = probe[: dot + 1]
        if probe[len(head) :] in keys:
            candidates.append(("drop", head))
        dot = probe.find(".", dot + 1)
    for how, prefix in candidates:

        def mapped(n: str, how: str = how, prefix: str = prefix) -> str:
            if how == "add":
                return n if n in keys else prefix + n
            return n.removeprefix(prefix) if n.startswith(prefix) and n.removeprefix(prefix) in keys else n

        out = {n: mapped(n) for n in adapter_names}
        if all(v in keys for v in out.values()):
            return out
    missing = [n for n in adapter_names if n not in keys]
    raise DistacError(
        f"{label}: the adapter changes {len(missing)} tensor(s) the base model lacks, e.g. {missing[:3]}; "
        "is it an adapter of this base?"
    )


class AdapterSource:
    """The fine-tuned model θ_0 + ΔW of a base and a LoRA adapter, as a lazy ``TensorSource``.

    Names, shapes and dtypes are the base's. A tensor the adapter changes is computed when read, as
    peft's ``merge_and_unload`` computes it (the base weight, in its dtype, plus ΔW in place); its
    rows come from the whole tensor, kept in one reusable buffer until another tensor is read
    (row-chunked reads of one tensor compute ΔW once). Every other tensor is read from the base.

    Example:
        >>> src = AdapterSource(open_checkpoint("base/"), read_adapter("my-lora"))  # doctest: +SKIP
        >>> src.get("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    """

    def __init__(self, base: TensorSource, adapter: Adapter, *, label: str | None = None, owns_base: bool = False):
        self.base = base
        self.adapter = adapter
        self.label = label or f"{getattr(base, 'label', 'base')}+{adapter.path}"
        self._owns_base = owns_base
        names = [m.weight for m in adapter.modules.values()]
        names += [f"{m.name}.bias" for m in adapter.modules.values() if m.bias is not None]
        names += list(adapter.replaced)
        base_name = _base_names(names, base.keys(), str(adapter.path))
        #: base tensor name -> its name in the adapter's naming (an adapter written back uses it)
        self.adapter_names = {v: k for k, v in base_name.items()}
        #: base tensor name -> the module whose ΔW it receives
        self.modules = {base_name[m.weight]: m for m in adapter.modules.values()}
        #: base bias name -> module whose lora_B.bias (times scaling) it receives
        self.lora_biases = {base_name[f"{m.name}.bias"]: m for m in adapter.modules.values() if m.bias is not None}
        #: base tensor name -> key of the whole tensor in the adapter file that replaces it
        self.replaced = {base_name[n]: key for n, key in adapter.replaced.items()}
        self._check_shapes()
        self._lock = threading.Lock()
        self._cached: tuple[str, Tensor] | None = None
        self._buf = torch.empty(0, dtype=torch.uint8)

    def _check_shapes(self) -> None:
        for name, key in self.replaced.items():
            got, want = tuple(self.adapter.tensors.shape(key)), tuple(self.base.shape(name))
            if got != want:
                where = self.adapter.tensors.file_of(key)
                raise DistacError(f"{where}: tensor '{key}' has shape {got}, the base's '{name}' has {want}")
        for name, m in self.modules.items():
            a, b, want = self.adapter.tensors.shape(m.a), self.adapter.tensors.shape(m.b), tuple(self.base.shape(name))
            rows, cols = (b[0], a[1]) if m.kind == "layer" else (a[1], b[0])
            if m.fan_in_fan_out:
                rows, cols = cols, rows
            if len(want) < 2 or (rows, cols) != want[:2]:
                raise DistacError(
                    f"{self.adapter.path}: module '{m.name}' has factors {tuple(a)} and {tuple(b)}, which do not fit "
                    f"the base's '{name}' of shape {want}"
                )

    # --- TensorSource ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def touched(self, name: str) -> bool:
        """Whether the adapter changes tensor ``name`` (else it reads as the base's)."""
        return name in self.modules or name in self.replaced or name in self.lora_biases

    def _view(self, name: str) -> Tensor:
        """A tensor of ``name``'s shape and dtype in this source's reusable buffer (no allocation per tensor:
        fresh multi-MB buffers are fresh pages the kernel zero-fills, see ``io.readers._Staging``)."""
        shape, dtype = self.base.shape(name), self.base.dtype(name)
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the smaller one first
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes].view(dtype).view(shape)

    def _compute(self, name: str) -> Tensor:
        w = self._view(name)
        # a whole tensor in the adapter replaces the base's; a saved ``base_layer`` weight (peft
        # saves resized embeddings) is the one ΔW is added to
        if name in self.replaced:
            w.copy_(self.adapter.tensors.get(self.replaced[name]))
        else:
            self.base.read_into(name, None, w)
        if name in self.modules:
            # in place, as peft's merge does: the sum is rounded once, to the base weight's dtype
            w += delta(self.adapter, self.modules[name].name, weight_shape=w.shape)
        if name in self.lora_biases:
            m = self.lora_biases[name]
            w += _compute_dtype(self.adapter.tensors.get(m.bias or "")) * m.scaling
        return w

    def _tensor(self, name: str) -> Tensor:
        """θ0 + ΔW of a touched tensor (a view of the buffer: valid until the next tensor; hold the lock)."""
        if self._cached is None or self._cached[0] != name:
            self._cached = None
            self._cached = (name, self._compute(name))
        return self._cached[1]

    def get(self, name: str) -> Tensor:
        if not self.touched(name):
            return self.base.get(name)
        with self._lock:
            return self._tensor(name).clone()

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        if not self.touched(name):
            return self.base.get_rows(name, start, stop)
        with self._lock:
            return self._tensor(name)[start:stop].clone()

    def file_of(self, name: str) -> str | Path:
        if name in self.replaced:
            return self.adapter.tensors.file_of(self.replaced[name])
        if name in self.modules or name in self.lora_biases:
            return f"{self.base.file_of(name)} + {self.adapter.path}"
        return self.base.file_of(name)

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        if not self.touched(name):
            return self.base.read_into(name, rows, out)
        with self._lock:  # straight from the buffer into the caller's
            raw = self._tensor(name)
            raw = raw if rows is None else raw[rows[0] : rows[1]]
            out.copy_(raw)
            return raw.numel() * raw.element_size()

    def close(self) -> None:
        """Release the adapter file (and the base, when this source opened it); later reads reopen."""
        with self._lock:
            self._cached = None
            self._buf = torch.empty(0, dtype=torch.uint8)
        self.adapter.close()
        if self._owns_base:
            close = getattr(self.base, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> AdapterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdapterSource({self.label!r}, {len(self.modules)} LoRA modules, {len(self.replaced)} whole tensors)"


def open_model(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    base: TensorSource | None = None,
    label: str | None = None,
) -> Checkpoint | AdapterSource:
    """Open a model reference as a ``TensorSource``: a checkpoint, an adapter on a base, or both.

    * ``path`` a checkpoint and no ``adapter``: :func:`~distac.io.open_checkpoint`;
    * ``path`` a checkpoint and ``adapter`` a LoRA folder (mergekit's ``path+adapter``): the
      checkpoint with the adapter applied (this source owns and closes the checkpoint);
    * ``path`` a LoRA folder: the adapter applied to ``base`` (the merge's base model).

    Args:
        path: a checkpoint path, or a LoRA adapter folder.
        adapter: a LoRA adapter folder to apply to ``path``.
        base: the source an adapter given as ``path`` applies to.
        label: how messages name the model.

    Returns:
        A :class:`~distac.io.Checkpoint` or an :class:`AdapterSource` (both have ``close()``).

    Example:
        >>> ft = open_model("my-lora", base=open_checkpoint("base/"))  # doctest: +SKIP
    """
    if adapter is not None:
        ad = read_adapter(adapter)
        try:
            ck = open_checkpoint(path)
        except BaseException:
            ad.close()
            raise
        try:
            return AdapterSource(ck, ad, label=label or f"{path}+{adapter}", owns_base=True)
        except BaseException:
            ad.close()
            ck.close()
            raise
    if is_adapter(path):
        if base is None:
            raise DistacError(f"{path}: a LoRA adapter needs the base model it applies to (use BASE+{path})")
        ad = read_adapter(path)
        try:
            return AdapterSource(base, ad, label=label or str(path))
        except BaseException:
            ad.close()
            raise
    return open_checkpoint(path, label=label)

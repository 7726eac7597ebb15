"""Model adapters: how distac calls a classifier, whatever its kind.

A *batch* is a tensor or a dict of tensors (tokenizer output). A model is any ``nn.Module`` whose
forward returns logits, or a Hugging Face model whose output has ``.logits``.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError, closest
from ..io.hub import resolve_model
from ..io.lora import AdapterSource, is_adapter, read_adapter, split_adapter_ref
from ..taskvector import match_heads
from ..tensors import DictSource, check_compatible

__all__ = [
    "Batch",
    "BoundModule",
    "EncoderClassifier",
    "LoadedModel",
    "additive_mask",
    "batch_size",
    "batch_to",
    "default_head_patterns",
    "forward_logits",
    "load_model",
    "load_state_like",
    "read_state",
    "save_state_like",
]

Batch = Tensor | Mapping[str, Tensor]


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given (checked to exist), else CUDA when available, else CPU.

    Raises:
        DistacError: for a malformed device name, or CUDA asked for where there is none.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DistacError(f"--device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistacError(f"--device {device!r}: CUDA is not available on this machine")
    return dev


def additive_mask(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 2-D padding mask (B, L; 1 = token) as the 4-D additive mask (B, 1, L, L) that HF models take as-is.

    HF's own mask builder inspects the mask's values (``mask.all()``), which ``torch.func.vmap``
    cannot trace, so per-example gradients (``distac.stats.fisher_diagonal``) of a model that hands
    HF a 2-D mask fall back to a loop over examples; a prepared 4-D mask skips the builder and gives
    the same attention (bit-identical outputs on BERT).

    Example:
        >>> additive_mask(torch.tensor([[1, 0]])).shape
        torch.Size([1, 1, 2, 2])
    """
    neg = torch.finfo(dtype).min
    add = (1.0 - mask.to(dtype))[:, None, None, :] * neg
    return add.expand(mask.shape[0], 1, mask.shape[1], mask.shape[1]).contiguous()


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Call ``model`` on a batch and return its logits, shape ``(B, C)``."""
    out: Any = model(**batch) if isinstance(batch, Mapping) else model(batch)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, tuple | list):
        out = out[0]
    return out


class BoundModule(nn.Module):
    """``model`` called with the tensors of ``state`` instead of its own (``torch.func.functional_call``).

    The one functional-call wrapper: lets :func:`forward_logits` run a fine-tune, a merged state or
    per-example parameters without ever writing into the caller's module. ``state`` is one mapping or
    a tuple of mappings (e.g. ``(trainable, frozen)``); names it lacks fall back to the module's own.
    The module is kept out of ``_modules`` so that ``.to()`` or ``.train()`` on the wrapper leave it alone.

    Example:
        >>> logits = forward_logits(BoundModule(model, finetuned_state), batch)  # doctest: +SKIP
    """

    _m: nn.Module
    _s: Any  # a dict, or a tuple of dicts

    def __init__(self, model: nn.Module, state: Mapping[str, Tensor] | tuple[Mapping[str, Tensor], ...]) -> None:
        super().__init__()
        object.__setattr__(self, "_m", model)
        object.__setattr__(self, "_s", state if isinstance(state, tuple) else dict(state))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._m, self._s, args, kwargs, tie_weights=True, strict=False)


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move a batch (tensor or dict of tensors) to a device."""
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return batch.to(device)


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch."""
    if isinstance(batch, Mapping):
        return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
    return int(batch.shape[0])


# ------------------------------------------------------------------------------------------------
# Loading models: Hugging Face classifiers, a bare encoder plus a linear head, plain torch factories
# ------------------------------------------------------------------------------------------------

# Default head patterns per Hugging Face ``model_type``. The head is the task-specific part that is
# frozen during DisTaC and kept per task by the merge; everything else is "shared" (its task vector
# is what gets measured, conditioned and merged). Families not listed fall back to the attribute
# names in ``_HEAD_ATTRIBUTES``.
HF_HEAD_PATTERNS: dict[str, tuple[str, ...]] = {
    **{
        t: ("classifier.*",)
        for t in (
            "bert",
            "roberta",
            "xlm-roberta",
            "camembert",
            "electra",
            "albert",
            "deberta",
            "deberta-v2",
            "mpnet",
            "vit",
            "beit",
            "convnext",
            "convnextv2",
            "resnet",
            "swin",
            "swinv2",
            "dinov2",
            "mobilevit",
            "efficientnet",
            "regnet",
            "levit",
            "data2vec-vision",
            "clip",
            "siglip",
        )
    },
    "distilbert": ("pre_classifier.*", "classifier.*"),
    "deit": ("classifier.*", "cls_classifier.*", "distillation_classifier.*"),
    **{t: ("score.*",) for t in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "opt")},
    **{t: ("classification_head.*",) for t in ("bart", "mbart", "t5")},
}
_HEAD_ATTRIBUTES = ("classifier", "score", "classification_head", "head", "fc")


def default_head_patterns(model: nn.Module) -> list[str]:
    """Head name patterns for ``model``: by HF ``model_type``, else a known head attribute, else its last Linear.

    The last-``nn.Linear`` rule covers plain torch classifiers (an MLP's output layer, a ResNet's ``fc``).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in HF_HEAD_PATTERNS:
        return list(HF_HEAD_PATTERNS[model_type])
    children = dict(model.named_children())
    for attr in _HEAD_ATTRIBUTES:
        if attr in children and any(True for _ in children[attr].parameters()):
            return [f"{attr}.*"]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    return [f"{linears[-1]}.*"] if linears else []


def check_head_patterns(names: list[str], patterns: list[str] | None, what: str = "model") -> None:
    """Raise if a head pattern matches no tensor name (a typo would silently train the head)."""

    for p in patterns or ():
        if not match_heads(names, [p]):
            prefixes = sorted({n.rsplit(".", 1)[0] + ".*" for n in names})
            raise DistacError(f"head pattern '{p}' matches no tensor of the {what}{closest(p, prefixes)}")


class EncoderClassifier(nn.Module):
    """A bare Hugging Face encoder plus a linear head on its pooled output.

    Pooling: ``pooler_output`` when the encoder has one, else the first token of
    ``last_hidden_state`` (CLS), or the spatial mean for convolutional image encoders.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, hidden_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        cfg = getattr(encoder, "config", None)
        hidden = hidden_size or getattr(cfg, "hidden_size", None)
        if hidden is None and cfg is not None and getattr(cfg, "hidden_sizes", None):
            hidden = cfg.hidden_sizes[-1]
        if hidden is None:
            raise DistacError("cannot tell the encoder's hidden size; its config has no hidden_size")
        self.head = nn.Linear(int(hidden), num_labels)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.encoder(*args, **kwargs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            h = out.last_hidden_state
            pooled = h[:, 0] if h.ndim == 3 else h.flatten(2).mean(-1)
        if pooled.ndim > 2:
            pooled = pooled.flatten(1)
        return self.head(pooled)


@dataclass
class LoadedModel:
    """A model ready for distac: the module, its own weights, and how to feed and save it."""

    module: nn.Module
    state: dict[str, Tensor]
    kind: str  # "hf" (a *ForXxxClassification), "hf-encoder" (EncoderClassifier) or "torch"
    source: str
    head_patterns: list[str] = field(default_factory=list)
    tokenizer: Any = None
    image_processor: Any = None


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (has a ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``package.module:factory`` to a callable, with an error that names what is missing."""
    if ":" not in spec:
        raise DistacError(f"model factory '{spec}' must look like package.module:factory")
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise DistacError(f"model factory '{spec}': cannot import module '{mod_name}' ({e})") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise DistacError(f"model factory '{spec}': module '{mod_name}' has no callable '{attr}'")
    return fn


def load_model(
    spec: str | Path,
    *,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    num_labels: int | None = None,
    heads: list[str] | None = None,
) -> LoadedModel:
    """Load the base model.

    * ``spec`` an HF directory: ``*ForSequenceClassification`` / ``*ForImageClassification`` through the
      Auto classes (their ``config.architectures`` decides), a bare encoder (no classification
      architecture) as :class:`EncoderClassifier` with ``num_labels`` outputs (default: the config's).
    * ``spec`` a weights file (``.safetensors``, or ``.pt``/``.bin`` read with ``weights_only=True``) and
      ``factory`` = ``package.module:factory``: ``factory(**factory_kwargs)`` builds the module and the file
      gives its weights (strict: every key must match).

    ``heads`` overrides the default head patterns (:func:`default_head_patterns`). A Hub repo id
    (``org/name[@revision]``, either side of ``BASE+ADAPTER``) is read from the Hugging Face cache.
    """
    spec = _resolved(str(spec))
    model_ref, adapter = split_adapter_ref(spec)
    if adapter is not None or is_adapter(spec):
        # BASE+ADAPTER: the base's module, holding θ0 + ΔW (an adapter alone has no base to apply to)
        loaded = load_model(
            model_ref if adapter is not None else _need_base(spec),
            factory=factory,
            factory_kwargs=factory_kwargs,
            num_labels=num_labels,
            heads=heads,
        )
        state = load_state_like(spec, loaded)
        loaded.module.load_state_dict(state, strict=True)
        loaded.state, loaded.source = state, spec
        return loaded
    if is_hf_dir(spec):
        module, kind, tok, proc = _load_hf(spec, num_labels=num_labels)
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        if factory is None:
            raise DistacError(
                f"'{spec}' is not a Hugging Face directory (no config.json); pass --arch package.module:factory "
                "to say which torch module its weights belong to"
            )
        module = import_factory(factory)(**dict(factory_kwargs or {}))
        if not isinstance(module, nn.Module):
            raise DistacError(f"model factory '{factory}' returned {type(module).__name__}, not a torch nn.Module")
        state = read_state(spec)
        _load_strict(module, state, spec)
        kind, tok, proc = "torch", None, None
    patterns = list(heads) if heads is not None else default_head_patterns(module)
    check_head_patterns(list(state), patterns, f"model '{spec}'")
    return LoadedModel(module, state, kind, spec, patterns, tok, proc)


def _load_hf(path: str, *, num_labels: int | None) -> tuple[nn.Module, str, Any, Any]:
    try:
        import transformers as tf
    except ImportError as e:
        raise DistacError("loading Hugging Face models needs transformers: pip install 'distac[hf]'") from e
    config = tf.AutoConfig.from_pretrained(path)
    archs = " ".join(config.architectures or [])
    tok = proc = None
    if "ForSequenceClassification" in archs:
        module, kind = tf.AutoModelForSequenceClassification.from_pretrained(path), "hf"
    elif "ForImageClassification" in archs:
        module, kind = tf.AutoModelForImageClassification.from_pretrained(path), "hf"
    else:
        encoder = tf.AutoModel.from_pretrained(path)
        n = num_labels or config.num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # one head for every run and process: two diagnoses agree
            module, kind = EncoderClassifier(encoder, n), "hf-encoder"
        head = Path(path) / "head.safetensors"
        if head.is_file():
            from safetensors.torch import load_file

            module.head.load_state_dict(load_file(str(head)))
        else:
            print(
                f"distac: warning: '{path}' has no classification head ({archs or 'no architecture in config.json'}, "
                f"no head.safetensors): a new {n}-way linear head with random weights (seed 0) reads its pooled "
                "output, so confidence, accuracy and statistics describe that head, not a task; give a classifier "
                "fine-tune for a real one",
                file=sys.stderr,
            )
    if any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tok = tf.AutoTokenizer.from_pretrained(path)
    if (Path(path) / "preprocessor_config.json").is_file():
        proc = tf.AutoImageProcessor.from_pretrained(path)
    module.eval()
    return module, kind, tok, proc


def read_state(path: str | Path) -> dict[str, Tensor]:
    """Read a whole state dict from any checkpoint :func:`distac.io.open_checkpoint` reads (a ``.safetensors``
    file, a sharded folder, a ``weights_only`` torch file), naming the file on error.
    """
    from ..io import open_checkpoint

    p = Path(path)
    if not p.exists():
        raise DistacError(f"weights '{p}' do not exist")
    ckpt = open_checkpoint(p)
    try:
        return {k: ckpt.get(k).clone() for k in ckpt.keys()}
    finally:
        ckpt.close()


def _need_base(adapter: str) -> str:
    raise DistacError(f"'{adapter}' is a LoRA adapter; name the model it applies to as BASE+{adapter}")


def load_state_like(spec: str | Path, like: LoadedModel) -> dict[str, Tensor]:
    """The weights of another checkpoint of ``like``'s architecture (an HF directory or a weights file).

    A LoRA adapter folder gives ``like``'s weights plus its ΔW (exactly as peft's ``merge_and_unload``);
    ``MODEL+ADAPTER`` gives MODEL's weights plus the adapter's.
    """
    spec = _resolved(str(spec))
    model_ref, adapter = split_adapter_ref(spec)
    if adapter is not None or is_adapter(spec):
        base = DictSource(like.state, like.source) if adapter is None else DictSource(load_state_like(model_ref, like))
        src = AdapterSource(base, read_adapter(adapter or spec), label=spec)
        try:
            return {k: src.get(k).clone() for k in src.keys()}
        finally:
            src.close()
    if is_hf_dir(spec):
        if like.kind == "torch":
            raise DistacError(f"'{spec}' is a Hugging Face directory but the base is a plain torch model")
        module, _, _, _ = _load_hf(spec, num_labels=_num_labels(like.module))
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        state = read_state(spec)
    check_compatible(like.state, state, f"'{spec}'")
    return state


def _resolved(spec: str) -> str:
    """``spec`` with a Hub repo id on either side of ``BASE+ADAPTER`` replaced by its cached snapshot, as
    merge configs read them (without it, `stats`/`diagnose`/`condition` asked for --arch)."""
    model_ref, adapter = split_adapter_ref(spec)
    model = str(resolve_model(model_ref))
    return model if adapter is None else f"{model}+{resolve_model(adapter, where='adapter')}"


def _num_labels(module: nn.Module) -> int | None:
    head = getattr(module, "head", None)
    return head.out_features if isinstance(head, nn.Linear) else None


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise DistacError(
            f"'{source}' does not fit the model: missing {missing[:3]}, unexpected {extra[:3]} "
            "(base and fine-tune must share one architecture)"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise DistacError(
                f"'{source}': tensor '{k}' has shape {tuple(state[k].shape)}, the model has {tuple(v.shape)}"
            )
    module.load_state_dict(state, strict=True)


def save_state_like(
    state: Mapping[str, Tensor],
    out: str | Path,
    like: LoadedModel,
    *,
    fmt: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state`` as an HF directory (``save_pretrained`` plus the base's tokenizer and processor
    files; ``fmt="hf"``, the default for an HF base) or one ``.safetensors`` file (``fmt="safetensors"``,
    with ``metadata`` in its header), through :mod:`distac.io.atomic`: a failure leaves nothing half-written.
    """
    from ..io import atomic_dir, atomic_file

    out = Path(out)
    fmt = fmt or ("hf" if like.kind == "hf" else "safetensors")
    if fmt == "hf" and like.kind != "hf":
        raise DistacError(f"cannot write '{out}' as a Hugging Face directory: the model is not one")
    if fmt == "hf":
        module: Any = copy.deepcopy(like.module)  # a transformers PreTrainedModel: has save_pretrained
        module.load_state_dict(dict(state), strict=True)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            module.save_pretrained(str(tmp), safe_serialization=True)
            for extra in (like.tokenizer, like.image_processor):
                if extra is not None:
                    extra.save_pretrained(str(tmp))
        return out
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in state.items()}
    with atomic_file(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **dict(metadata or {})})
    return out

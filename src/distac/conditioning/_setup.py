"""Setting up one conditioning run: which task, its data and vector, and the settings its mode implies.

Private to :mod:`distac.conditioning.distill`; kept apart so that the training loop reads on its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError, closest
from ..nn.data import Inputs
from ..nn.models import default_device
from ..taskvector import TaskVector
from ._common import check_data_fits, check_model_state, resolve_heads, shared_vector
from .config import ConditionConfig
from .diagnose import CONFIDENCE_TEMPS, NORM_TEMPS, FlagRules, diagnose, recommend
from .lowrank import FactoredVector, as_factored


def default_lr(n_params: int) -> float:
    """Default learning rate by trainable-parameter count (see the module docstring)."""
    return 1e-5 if n_params >= 20_000_000 else 1e-4


@dataclass
class Task:
    """The task being conditioned, checked against the model, with its vector measured."""

    name: str
    ft: Mapping[str, Tensor]
    ft_map: dict[str, Any]
    data: Any  # an Inputs or a sequence of batches
    patterns: list[str]
    tau: TaskVector
    norm: float
    others_mean: float | None
    adapter: FactoredVector | None = None  # the fine-tune as a LoRA adapter's task vector (heads included)


def prepare(
    model: nn.Module,
    base: Mapping[str, Tensor],
    finetuned: Mapping[str, Any],
    data: Any,
    task: str | None,
    heads: Sequence[str] | None,
) -> Task:
    name, given, ft_map = select_task(finetuned, task)
    task_data = select_data(data, name, ft_map)
    check_model_state(model, base)
    patterns = resolve_heads(model, base, heads)
    check_data_fits(model, task_data, f"data of task '{name}'")
    adapter = as_factored(given, base, f"fine-tuned model '{name}'")
    # the teacher runs whole, so an adapter is materialised once here (θ_0 + ΔW)
    ft = adapter.apply_to(base) if adapter is not None else given
    tau = shared_vector(base, ft, patterns, f"fine-tuned model '{name}'")
    norm = tau.norm()
    if norm == 0:
        raise DistacError(f"fine-tuned model '{name}' equals the base on every shared tensor: nothing to condition")
    others = [shared_norm(base, s, patterns, f"fine-tuned model '{n}'") for n, s in ft_map.items() if n != name]
    others_mean = sum(others) / len(others) if others else None
    return Task(name, ft, ft_map, task_data, patterns, tau, norm, others_mean, adapter)


def shared_norm(base: Mapping[str, Tensor], finetuned: Any, patterns: Sequence[str], what: str) -> float:
    """‖τ‖ over the shared entries of a state dict, or of an adapter from its factors (never materialised)."""
    adapter = as_factored(finetuned, base, what)
    if adapter is not None:
        return adapter.without_heads(patterns).norm()
    return shared_vector(base, finetuned, patterns, what).norm()


def resolve(
    cfg: ConditionConfig,
    job: Task,
    model: nn.Module,
    base: Mapping[str, Tensor],
    data: Any,
    rules: FlagRules | None,
    device: torch.device | str | None,
) -> ConditionConfig:
    """``cfg`` with every run-time default filled in: mode (auto's verdict), κ, temperatures, lr, warm-up."""
    mode = cfg.mode
    if mode == "auto":
        mode = _auto_mode(model, base, job, auto_data(data, job.name, job.data, job.ft_map), cfg, rules, device)
    target = cfg.target_norm if cfg.target_norm is not None else job.others_mean
    kappa, temps = _kappa_and_temps(mode, cfg.kappa, target, job)
    student = _student_kind(cfg.student, job)
    lr = cfg.lr if cfg.lr is not None else default_lr(_trainable_count(student, job, model, base))
    return replace(
        cfg,
        mode=mode,
        student=student,
        kappa=float(kappa),
        target_norm=target,
        t_teacher=float(cfg.t_teacher if cfg.t_teacher is not None else temps[0]),
        t_student=float(cfg.t_student if cfg.t_student is not None else temps[1]),
        beta=float(cfg.beta),
        lr=float(lr),
        warmup=cfg.steps // 10 if cfg.warmup is None else cfg.warmup,
    )


def _student_kind(asked: str, job: Task) -> str:
    """``auto``: a LoRA student for an adapter input (the output stays an adapter), else the full model."""
    if asked == "auto":
        return "lora" if job.adapter is not None else "full"
    if asked == "lora" and job.adapter is None:
        raise DistacError(
            f"student 'lora' needs a LoRA adapter as the fine-tune of task '{job.name}' (it trains the adapter's "
            "factors); this one is a full checkpoint: use student 'full' or 'auto'"
        )
    return asked


def _trainable_count(student: str, job: Task, model: nn.Module, base: Mapping[str, Tensor]) -> int:
    """How many numbers train: the adapter's shared factors and whole tensors, or the shared parameters."""
    if student == "lora" and job.adapter is not None:
        shared = job.adapter.without_heads(job.patterns)
        return sum(f.a.numel() + f.b.numel() for f in shared.low_rank.values()) + sum(
            v.numel() for v in shared.dense.values()
        )
    return sum(base[n].numel() for n, _ in model.named_parameters() if n in job.tau)


def _kappa_and_temps(
    mode: str, kappa: float | None, target: float | None, job: Task
) -> tuple[float, tuple[float, float]]:
    if mode in ("norm", "both"):
        if kappa is None:
            if target is None:
                raise DistacError(
                    f"mode '{mode}' needs kappa, target_norm, or the other tasks' fine-tunes to take their mean norm"
                )
            kappa = target / job.norm
            if kappa > 1:
                warnings.warn(
                    f"task '{job.name}': the target norm {target:.4g} is above its norm {job.norm:.4g}, so kappa = "
                    f"{kappa:.3g} > 1 would stretch it (shrink, don't stretch); using it as asked",
                    stacklevel=4,
                )
        return kappa, CONFIDENCE_TEMPS if mode == "both" else NORM_TEMPS
    if mode == "confidence":
        return (1.0 if kappa is None else kappa), CONFIDENCE_TEMPS
    return 1.0, NORM_TEMPS  # "none": auto found nothing to fix


def _auto_mode(
    model: nn.Module,
    base: Mapping[str, Tensor],
    job: Task,
    data: dict[str, Any],
    cfg: ConditionConfig,
    rules: FlagRules | None,
    device: torch.device | str | None,
) -> str:
    """``auto``: diagnose the task (confidence on the data given, relative to the other tasks' when their data is
    given too; norm against ``target_norm`` or the other tasks' mean), as :func:`diagnose` would flag it.
    """
    rules = rules or FlagRules()
    ft_map = job.ft_map or {job.name: job.ft}
    rep = diagnose(model, base, ft_map, data, heads=job.patterns, rules=rules, max_batches=8, device=device)
    ref = cfg.target_norm if cfg.target_norm is not None else job.others_mean
    outlier = ref is not None and job.norm / ref >= rules.norm_ratio
    low = "low_confidence" in rep[job.name].flags
    return recommend(norm=job.norm, others_mean=ref, norm_outlier=outlier, low_confidence=low)[0]


def make_accelerator(device: torch.device | str | None) -> Any:
    from accelerate import Accelerator

    dev = default_device(device)
    return Accelerator(cpu=dev.type == "cpu")


@contextmanager
def accelerator_session(device: torch.device | str | None) -> Iterator[Any]:
    """:func:`make_accelerator`'s accelerator for one command, whose process group every process drops at the end.

    A process group left alive under torchrun can abort the interpreter at exit (gloo: "terminate
    called without an active exception"), after the output is written.
    """
    accelerator = make_accelerator(device)
    try:
        yield accelerator
    finally:
        accelerator.end_training()


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, Tensor) for v in x.values())


def _is_finetune(x: Any) -> bool:
    """A fine-tune: a state dict, or a LoRA adapter (its factored task vector)."""
    return _is_state_dict(x) or as_factored(x) is not None


def select_task(finetuned: Any, task: str | None) -> tuple[str, Any, dict]:
    """``(name, fine-tune, {task: fine-tune} or {})`` of the task to condition (a state dict or an adapter)."""
    if _is_finetune(finetuned):
        return task or "task", finetuned, {}
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise DistacError("finetuned must be a state dict or a non-empty {task: state dict} mapping")
    ft_map = dict(finetuned)
    if task is None:
        if len(ft_map) != 1:
            raise DistacError(f"several fine-tuned models given ({list(ft_map)}): say which one with task=")
        task = next(iter(ft_map))
    if task not in ft_map:
        raise DistacError(f"no fine-tuned model named '{task}'{closest(task, ft_map)}; the tasks are {list(ft_map)}")
    if not _is_finetune(ft_map[task]):
        raise DistacError(f"fine-tuned model '{task}' is not a state dict (name -> tensor) nor a LoRA adapter")
    return task, ft_map[task], ft_map


def select_data(data: Any, name: str, ft_map: Mapping[str, Any]) -> Any:
    """The data of task ``name``: ``data[name]`` for a ``{task: data}`` mapping; a tensor becomes an Inputs."""
    if isinstance(data, Mapping) and not _is_state_dict(data):
        if name not in data:
            raise DistacError(f"no data for task '{name}' (data given for {list(data)})")
        data = data[name]
    if isinstance(data, Tensor) or _is_state_dict(data):
        data = Inputs(data, source=f"data of task '{name}'")
    return data


def auto_data(data: Any, name: str, task_data: Any, ft_map: Mapping[str, Any]) -> dict[str, Any]:
    """Data for ``auto``'s diagnosis: every task's when ``data`` maps tasks to inputs, else this task's."""
    own = task_data if isinstance(task_data, Inputs) else list(task_data)
    if not (isinstance(data, Mapping) and not _is_state_dict(data)):
        return {name: own}
    out = {n: select_data(data, n, ft_map) for n in data if n in ft_map and n != name}
    return {**{n: d if isinstance(d, Inputs) else list(d) for n, d in out.items()}, name: own}

"""DisTaC conditioning: distil a fine-tuned model into a student that starts at θ_0 + κ·τ (DisTaC §1–2).

The loop (Yoshida et al., arXiv 2508.01148; official code ``src/distac.py``), exactly::

    θ_init = θ_0 + κ·τ over the shared entries       (head and integer buffers: the fine-tune's)
    for k in 1..K:                                    (unlabeled batches of the task's inputs)
        z_T = f(x; θ_t)       frozen teacher = the fine-tuned model, no grad
        z_S = f(x; θ)
        L_kd = T_t·T_s · KL(softmax(z_T/T_t) ‖ softmax(z_S/T_s))      (batchmean)
        g    = ∇L_kd + 2β(θ − θ_init)                 anchor gradient added before clipping
        clip g to global norm 1.0; Adam step (β1 .9, β2 .999, eps 1e-8, no weight decay)
    τ' = θ − θ_0

Only the shared *parameters* train; the head is frozen (the paper's frozen zero-shot CLIP head).
Floating-point buffers (BatchNorm statistics) are scaled by κ with the parameters, as in a merge, and
then stay fixed: the student runs in eval mode unless ``train_mode=True`` (dropout on; BatchNorm would
then update its statistics, which DDP broadcasts from rank 0).

Differences from the official code, on purpose:

* Warm-up: linear for ``warmup`` steps (default K/10), then cosine decay to 0 at K. The official
  default warm-up equals K = 500, so its whole run is warm-up (§6.4.6); distac refuses ``warmup ≥ K``.
* ``lr`` default depends on model size (:func:`default_lr`): 1e-5 (the paper's, for CLIP ViT-B/32)
  from 20M parameters up, 1e-4 below: at 1e-5, 500 Adam steps barely move a small model, and on the
  test MLPs (2.4k shared parameters) 1e-4 with β = 0.1 ends at 1.10× the target norm where 1e-3 ends at 1.65×.
* A NaN/Inf loss or gradient stops the run before the step is applied (:class:`ConditioningDiverged`),
  and the last good state is kept.

Many processes: the student is wrapped by Hugging Face Accelerate (DDP, gloo on CPU / NCCL on GPU).
The global batch ``batch_size`` is split into equal per-process slices of the same deterministic
global batch, so W processes compute the same update as one (up to float summation order).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from ..nn.data import Inputs, iter_batches
from ..nn.evaluate import confidence_stats
from ..nn.models import Batch, batch_to, default_device, forward_logits
from ..nn.models import batch_size as _batch_len
from ._common import (
    check_data_fits,
    check_model_state,
    check_positive,
    resolve_heads,
    shared_vector,
)
from .diagnose import CONFIDENCE_TEMPS, NORM_TEMPS, Thresholds, diagnose, recommend, write_text_atomic

__all__ = [
    "MODES",
    "ConditionReport",
    "ConditionResult",
    "ConditioningDiverged",
    "condition",
    "condition_with_report",
    "default_lr",
    "distill_loss",
    "lr_factor",
]

StateDict = dict[str, Tensor]
MODES = ("auto", "norm", "confidence", "both")
CHECKPOINT = "checkpoint.pt"


class ConditioningDiverged(DistacError):
    """The loss or gradient became NaN/Inf; ``.result`` holds the last good state and the report so far."""

    def __init__(self, message: str, result: ConditionResult):
        super().__init__(message)
        self.result = result


@dataclass
class ConditionReport:
    """What happened during one conditioning run (written as JSON by the CLI)."""

    task: str
    mode: str
    kappa: float
    t_teacher: float
    t_student: float
    beta: float
    steps: int
    lr: float
    batch_size: int
    warmup: int
    seed: int
    max_grad_norm: float
    world_size: int = 1
    norm_before: float = 0.0  # ‖τ‖ of the fine-tune
    norm_init: float = 0.0  # ‖κτ‖, the student's start
    norm_after: float = 0.0  # ‖τ'‖
    target_norm: float | None = None
    agreement_init: float | None = None  # student (at init) argmax == teacher argmax
    agreement: float | None = None  # after conditioning
    confidence_before: dict[str, Any] | None = None  # the teacher's
    confidence_after: dict[str, Any] | None = None  # the student's
    loss_curve: list[float] = field(default_factory=list)  # total loss per step (KD + anchor)
    norm_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, ‖θ − θ_0‖)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run in this call
    steps_done: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    note: str = ""

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self), indent=2)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text


@dataclass
class ConditionResult:
    state: StateDict
    report: ConditionReport


def default_lr(n_params: int) -> float:
    """Default learning rate by trainable-parameter count (see the module docstring)."""
    return 1e-5 if n_params >= 20_000_000 else 1e-4


def lr_factor(step: int, *, warmup: int, steps: int) -> float:
    """LR multiplier at 0-based ``step``: linear warm-up ``(step+1)/warmup``, then cosine to 0 at ``steps``.

    Same shape as the official ``cosine_lr``; only the default warm-up length differs (§6.4.6).
    """
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, *, t_teacher: float, t_student: float) -> Tensor:
    """T_t·T_s·KL(softmax(z_T/T_t) ‖ softmax(z_S/T_s)), summed over classes and averaged over the batch.

    ``F.kl_div(input=log q, target=p)`` is KL(p ‖ q): p is the teacher, q the student (official code l.143–146).
    """
    logq = F.log_softmax(student_logits.float() / t_student, dim=-1)
    p = F.softmax(teacher_logits.float() / t_teacher, dim=-1)
    return F.kl_div(logq, p, reduction="batchmean") * (t_teacher * t_student)


def condition(
    model: nn.Module,
    base: Mapping[str, Tensor],
    finetuned: Mapping[str, Any],
    data: Any,
    **options: Any,
) -> StateDict:
    """Condition one fine-tuned model with DisTaC and return its conditioned state dict (τ' = result − base).

    See :func:`condition_with_report` for the arguments; this returns only ``.state``.
    """
    return condition_with_report(model, base, finetuned, data, **options).state


def condition_with_report(
    model: nn.Module,
    base: Mapping[str, Tensor],
    finetuned: Mapping[str, Any],
    data: Any,
    *,
    task: str | None = None,
    mode: str = "auto",
    kappa: float | None = None,
    target_norm: float | None = None,
    t_teacher: float | None = None,
    t_student: float | None = None,
    beta: float = 0.1,
    steps: int = 500,
    lr: float | None = None,
    batch_size: int = 128,
    warmup: int | None = None,
    seed: int = 0,
    heads: Sequence[str] | None = None,
    max_grad_norm: float = 1.0,
    train_mode: bool = False,
    eval_examples: int = 1024,
    state_dir: str | Path | None = None,
    save_every: int = 100,
    resume: bool = True,
    log_every: int = 10,
    progress: bool = True,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    thresholds: Thresholds | None = None,
) -> ConditionResult:
    """Run DisTaC on one task and return the conditioned state dict and a :class:`ConditionReport`.

    Args:
        model: a module of the common architecture (forward returns logits); copied, never modified.
        base: θ_0.
        finetuned: either one fine-tuned state dict, or ``{task: state dict}`` for all tasks with ``task``
            naming the one to condition (the others only supply the default target norm and ``auto``'s diagnosis).
        data: the task's unlabeled inputs: an :class:`~distac.nn.data.Inputs` or a tensor (re-batched to
            ``batch_size``, shuffled with ``seed``), or a sequence of ready batches (cycled as given;
            ``batch_size`` is then their size). With ``{task: ...}`` finetuned, may also be ``{task: inputs}``.
        mode: ``norm`` (κ from ``kappa`` / ``target_norm`` / mean of the other tasks' norms; temperatures
            (10, 10)), ``confidence`` (κ = 1, (1, 10)), ``both`` (κ as ``norm``, (1, 10)), or ``auto`` (what
            :func:`~distac.conditioning.diagnose.diagnose` recommends; if nothing is flagged, the fine-tune is
            returned unchanged and the report says so). Explicit ``kappa`` / temperatures override any mode.
        beta: anchor weight β (README 0.1; the official argparse default is 1.0).
        steps: K (500, official ``max_steps``). lr: Adam learning rate (default :func:`default_lr`).
        batch_size: the *global* batch (official 128), split evenly over processes.
        warmup: linear warm-up steps (default K // 10; must be < K).
        heads: head patterns (frozen; default per model type).
        train_mode: run the student in train mode (dropout); default eval mode.
        eval_examples: how many of the task's examples measure agreement and confidence for the report.
        state_dir: where to save a resumable state every ``save_every`` steps; with ``resume`` a run
            continues from the state found there (same settings required).
        device / accelerator: an existing ``accelerate.Accelerator`` (multi-process runs), else one is made
            for ``device`` (default CUDA when available).
    """
    import time

    t0 = time.perf_counter()
    name, ft, ft_map = _select_task(finetuned, task)
    task_data = _select_data(data, name, ft_map)
    if mode not in MODES:
        raise DistacError(f"mode must be one of {list(MODES)}, got '{mode}'")
    for pname, v in (
        ("kappa", kappa),
        ("target_norm", target_norm),
        ("t_teacher", t_teacher),
        ("t_student", t_student),
        ("lr", lr),
        ("max_grad_norm", max_grad_norm),
    ):
        check_positive(pname, v)
    if beta < 0:
        raise DistacError(f"beta must be >= 0, got {beta}")
    if steps < 1 or batch_size < 1 or save_every < 1 or log_every < 1:
        raise DistacError("steps, batch_size, save_every and log_every must be >= 1")
    warmup = steps // 10 if warmup is None else warmup
    if not 0 <= warmup < steps:
        raise DistacError(
            f"warmup must be in [0, steps) so that the warm-up ends before the run does, got warmup={warmup}, "
            f"steps={steps} (the official code's default warm-up of 500 = K never ends, DisTaC §6.4.6)"
        )
    check_model_state(model, base)
    patterns = resolve_heads(model, base, heads)
    check_data_fits(model, task_data, f"data of task '{name}'")
    tau = shared_vector(base, ft, patterns, f"fine-tuned model '{name}'")
    norm_before = tau.norm()
    if norm_before == 0:
        raise DistacError(f"fine-tuned model '{name}' equals the base on every shared tensor: nothing to condition")
    others = [
        shared_vector(base, s, patterns, f"fine-tuned model '{n}'").norm() for n, s in ft_map.items() if n != name
    ]
    others_mean = sum(others) / len(others) if others else None

    # ---- settings from the mode ---------------------------------------------------------------
    if mode == "auto":
        mode = _auto_mode(
            model,
            base,
            ft_map or {name: ft},
            name,
            _auto_data(data, name, task_data, ft_map),
            patterns,
            target_norm,
            others_mean,
            norm_before,
            thresholds,
            device,
        )
    target = target_norm if target_norm is not None else others_mean
    if mode in ("norm", "both"):
        if kappa is None:
            if target is None:
                raise DistacError(
                    f"mode '{mode}' needs kappa, target_norm, or the other tasks' fine-tunes to take their mean norm"
                )
            kappa = target / norm_before
            if kappa > 1:
                warnings.warn(
                    f"task '{name}': the target norm {target:.4g} is above its norm {norm_before:.4g}, so kappa = "
                    f"{kappa:.3g} > 1 would stretch it (DisTaC §1.3: shrink, don't stretch); using it as asked",
                    stacklevel=2,
                )
        temps = CONFIDENCE_TEMPS if mode == "both" else NORM_TEMPS
    elif mode == "confidence":
        kappa = 1.0 if kappa is None else kappa
        temps = CONFIDENCE_TEMPS
    else:  # "none": auto found nothing to fix
        kappa, temps = 1.0, NORM_TEMPS
    tt = t_teacher if t_teacher is not None else temps[0]
    ts = t_student if t_student is not None else temps[1]

    acc = accelerator if accelerator is not None else _make_accelerator(device)
    dev = acc.device
    world, rank = acc.num_processes, acc.process_index
    if isinstance(task_data, Inputs) and batch_size % world:
        raise DistacError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")

    trainable = [n for n, _ in model.named_parameters() if n in tau]
    n_params = sum(base[n].numel() for n in trainable)
    lr = lr if lr is not None else default_lr(n_params)
    report = ConditionReport(
        task=name,
        mode=mode,
        kappa=float(kappa),
        t_teacher=float(tt),
        t_student=float(ts),
        beta=float(beta),
        steps=steps,
        lr=float(lr),
        batch_size=batch_size,
        warmup=warmup,
        seed=seed,
        max_grad_norm=max_grad_norm,
        world_size=world,
        norm_before=norm_before,
        norm_init=kappa * norm_before,
        target_norm=target,
    )
    if mode == "none":
        report.norm_after, report.agreement, report.note = norm_before, 1.0, "auto: no flag raised, fine-tune unchanged"
        return ConditionResult({k: v.clone() for k, v in ft.items()}, report)

    # ---- student and teacher ------------------------------------------------------------------
    init = {k: (tau.apply_to({k: base[k]}, kappa)[k] if k in tau else v.clone()) for k, v in ft.items()}
    teacher = copy.deepcopy(model).to(dev)
    teacher.load_state_dict(dict(ft), strict=True)
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(model).to(dev)
    student.load_state_dict(init, strict=True)
    student.train(train_mode)
    pdict = dict(student.named_parameters())
    for n, p in pdict.items():
        p.requires_grad_(n in tau)
    params = [pdict[n] for n in trainable]
    anchors = [p.detach().clone() for p in params]
    base_p = [base[n].to(dev, p.dtype) for n, p in zip(trainable, params, strict=True)]
    fixed_sq = sum(float((init[k].double() - base[k].double()).pow(2).sum()) for k in tau if k not in pdict)

    batches = _BatchStream(task_data, batch_size, seed, world, rank)
    eval_set = batches.eval_batches(eval_examples)
    teacher_logits = _logits(teacher, eval_set, dev)
    report.confidence_before = confidence_stats(teacher_logits).to_dict()
    report.agreement_init = _agreement(student, eval_set, teacher_logits, dev)

    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup=warmup, steps=steps))
    fingerprint = {
        k: getattr(report, k)
        for k in (
            "task",
            "kappa",
            "t_teacher",
            "t_student",
            "beta",
            "steps",
            "lr",
            "batch_size",
            "warmup",
            "seed",
            "max_grad_norm",
        )
    }
    start = 0
    ckpt = Path(state_dir) / CHECKPOINT if state_dir is not None else None
    if ckpt is not None and resume and ckpt.is_file():
        start = _load_checkpoint(ckpt, fingerprint, trainable, params, optimizer, scheduler, report)
        report.resumed_from = start
    wrapped = acc.prepare(student)
    torch.manual_seed(seed + rank)  # dropout masks, if train_mode

    from tqdm.auto import tqdm

    # shown on an interactive terminal only, like every distac progress bar (distac.progress)
    show = progress and acc.is_main_process and sys.stderr.isatty()
    bar = tqdm(total=steps, initial=start, desc=f"condition {name}", disable=not show, dynamic_ncols=True)

    def current_norm() -> float:
        with torch.no_grad():
            sq = sum(float((p.double() - b.double()).pow(2).sum()) for p, b in zip(params, base_p, strict=True))
        return math.sqrt(sq + fixed_sq)

    def result_state() -> StateDict:
        sd = student.state_dict()
        return {k: sd[k].detach().to("cpu", ft[k].dtype).clone() for k in ft}

    def diverged(step: int, what: str) -> ConditioningDiverged:
        report.steps_done = step
        report.note = f"stopped at step {step + 1}: {what}"
        report.seconds = time.perf_counter() - t0
        kept = f"kept in '{ckpt}'" if ckpt is not None and ckpt.is_file() else "returned in the exception's .result"
        if ckpt is not None and acc.is_main_process:
            _save_checkpoint(ckpt, fingerprint, step, trainable, params, optimizer, scheduler, report)
            kept = f"kept in '{ckpt}'"
        return ConditioningDiverged(
            f"conditioning task '{name}' stopped at step {step + 1}: {what}. The last good state (after step {step}) "
            f"is {kept}. Lower --lr (now {lr:g}), raise --beta or check the temperatures, then resume.",
            ConditionResult(result_state(), report),
        )

    for step in range(start, steps):
        t_step = time.perf_counter()
        batch = batch_to(batches.get(step), dev)
        with torch.no_grad():
            zt = forward_logits(teacher, batch)
        zs = forward_logits(wrapped, batch)
        kd = distill_loss(zs, zt, t_teacher=tt, t_student=ts)
        kd_all = float(acc.reduce(kd.detach().reshape(1), reduction="mean"))
        if not math.isfinite(kd_all):
            bar.close()
            raise diverged(step, f"the loss is {kd_all}")
        optimizer.zero_grad(set_to_none=True)
        acc.backward(kd)
        with torch.no_grad():
            live = [(p, a) for p, a in zip(params, anchors, strict=True) if p.grad is not None]
            # fused multi-tensor ops: the anchor must not cost more than Adam's own update
            diffs = torch._foreach_sub([p for p, _ in live], [a for _, a in live])
            anchor_sq = float(torch.stack(torch._foreach_norm(diffs)).double().pow(2).sum()) if diffs else 0.0
            if diffs and beta > 0:
                torch._foreach_add_([p.grad for p, _ in live], diffs, alpha=2 * beta)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if not math.isfinite(gnorm):
            bar.close()
            raise diverged(step, f"the gradient norm is {gnorm}")
        optimizer.step()
        scheduler.step()
        report.loss_curve.append(kd_all + beta * anchor_sq)
        report.step_seconds.append(time.perf_counter() - t_step)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            norm = current_norm()
            report.norm_curve.append((step + 1, norm))
            bar.set_postfix(loss=f"{report.loss_curve[-1]:.4g}", norm=f"{norm:.4g}")
        bar.update(1)
        if ckpt is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            if acc.is_main_process:
                _save_checkpoint(ckpt, fingerprint, step + 1, trainable, params, optimizer, scheduler, report)
            acc.wait_for_everyone()
    bar.close()

    report.steps_done = steps
    report.norm_after = current_norm()
    student.eval()
    report.agreement = _agreement(student, eval_set, teacher_logits, dev)
    report.confidence_after = confidence_stats(_logits(student, eval_set, dev)).to_dict()
    report.seconds = time.perf_counter() - t0
    return ConditionResult(result_state(), report)


# `condition` forwards to `condition_with_report`; give it that function's keyword-only signature, so
# help(distac.condition) and inspect.signature show every option instead of **options.
condition.__signature__ = inspect.signature(condition_with_report).replace(  # type: ignore[attr-defined]
    return_annotation="StateDict"
)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, Tensor) for v in x.values())


def _select_task(finetuned: Mapping[str, Any], task: str | None) -> tuple[str, Mapping[str, Tensor], dict]:
    if _is_state_dict(finetuned):
        return task or "task", finetuned, {}
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise DistacError("finetuned must be a state dict or a non-empty {task: state dict} mapping")
    ft_map = dict(finetuned)
    if task is None:
        if len(ft_map) != 1:
            raise DistacError(f"several fine-tuned models given ({list(ft_map)}): say which one with task=")
        task = next(iter(ft_map))
    if task not in ft_map:
        from ..errors import closest

        raise DistacError(f"no fine-tuned model named '{task}'{closest(task, ft_map)}; the tasks are {list(ft_map)}")
    if not _is_state_dict(ft_map[task]):
        raise DistacError(f"fine-tuned model '{task}' is not a state dict (name -> tensor)")
    return task, ft_map[task], ft_map


def _select_data(data: Any, name: str, ft_map: Mapping[str, Any]) -> Any:
    if isinstance(data, Mapping) and not _is_state_dict(data):
        if name not in data:
            raise DistacError(f"no data for task '{name}' (data given for {list(data)})")
        data = data[name]
    if isinstance(data, Tensor) or _is_state_dict(data):
        data = Inputs(data, source=f"data of task '{name}'")
    return data


def _auto_mode(
    model: nn.Module,
    base: Mapping[str, Tensor],
    ft_map: Mapping[str, Mapping[str, Tensor]],
    name: str,
    auto_data: dict[str, Any],
    patterns: list[str],
    target_norm: float | None,
    others_mean: float | None,
    norm: float,
    thresholds: Thresholds | None,
    device: torch.device | str | None,
) -> str:
    """``auto``: diagnose the task (confidence on the data given, relative to the other tasks' when their data is
    given too; norm against ``target_norm`` or the other tasks' mean), as :func:`diagnose` would flag it.
    """
    th = thresholds or Thresholds()
    rep = diagnose(model, base, ft_map, auto_data, heads=patterns, thresholds=th, max_batches=8, device=device)
    ref = target_norm if target_norm is not None else others_mean
    outlier = ref is not None and norm / ref >= th.norm_ratio
    low = "low_confidence" in rep[name].flags
    return recommend(norm=norm, others_mean=ref, norm_outlier=outlier, low_confidence=low)[0]


def _auto_data(data: Any, name: str, task_data: Any, ft_map: Mapping[str, Any]) -> dict[str, Any]:
    """Data for ``auto``'s diagnosis: every task's when ``data`` maps tasks to inputs, else this task's."""
    own = task_data if isinstance(task_data, Inputs) else list(task_data)
    if not (isinstance(data, Mapping) and not _is_state_dict(data)):
        return {name: own}
    out = {n: _select_data(data, n, ft_map) for n in data if n in ft_map and n != name}
    return {**{n: d if isinstance(d, Inputs) else list(d) for n, d in out.items()}, name: own}


def _make_accelerator(device: torch.device | str | None):
    from accelerate import Accelerator

    dev = default_device(device)
    return Accelerator(cpu=dev.type == "cpu")


class _BatchStream:
    """This process's slice of the global batch of each step (see :meth:`Inputs.step_indices`)."""

    def __init__(self, data: Any, batch_size: int, seed: int, world: int, rank: int):
        self.data, self.batch_size, self.seed, self.world, self.rank = data, batch_size, seed, world, rank
        if not isinstance(data, Inputs):
            self.fixed = list(data)
            if not self.fixed:
                raise DistacError("the task's data is empty: no batches")
            for i, b in enumerate(self.fixed):
                if _batch_len(b) % world:
                    raise DistacError(f"batch {i} has {_batch_len(b)} examples, not divisible by {world} processes")

    def get(self, step: int) -> Batch:
        if isinstance(self.data, Inputs):
            per = self.batch_size // self.world
            idx = self.data.step_indices(step, self.batch_size, seed=self.seed)
            return self.data.select(idx[self.rank * per : (self.rank + 1) * per])
        b = self.fixed[step % len(self.fixed)]
        per = _batch_len(b) // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        return {k: v[sl] for k, v in b.items()} if isinstance(b, Mapping) else b[sl]

    def eval_batches(self, n: int) -> list[Batch]:
        if isinstance(self.data, Inputs):
            sub = Inputs(self.data.select(slice(0, min(n, len(self.data)))), source=self.data.source)
            return sub.batches(self.batch_size)
        out, seen = [], 0
        for b in iter_batches(self.fixed, self.batch_size):
            if seen >= n:
                break
            out.append(b)
            seen += _batch_len(b)
        return out


@torch.no_grad()
def _logits(model: nn.Module, batches: list[Batch], dev: torch.device) -> Tensor:
    return torch.cat([forward_logits(model, batch_to(b, dev)).float().cpu() for b in batches])


def _agreement(model: nn.Module, batches: list[Batch], teacher_logits: Tensor, dev: torch.device) -> float:
    return float((_logits(model, batches, dev).argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def _save_checkpoint(
    path: Path,
    fingerprint: dict[str, Any],
    step: int,
    names: list[str],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    report: ConditionReport,
) -> None:
    """Write the resumable state (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(
        {
            "fingerprint": fingerprint,
            "step": step,
            "params": {n: p.detach().cpu().clone() for n, p in zip(names, params, strict=True)},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loss_curve": list(report.loss_curve),
            "norm_curve": [list(x) for x in report.norm_curve],
        },
        tmp,
    )
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path,
    fingerprint: dict[str, Any],
    names: list[str],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    report: ConditionReport,
) -> int:
    """Restore a saved state into the live parameters/optimizer/scheduler; return the step to continue from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistacError(f"cannot read the conditioning state '{path}': {e}") from e
    if state.get("fingerprint") != fingerprint:
        diff = {
            k: (state.get("fingerprint", {}).get(k), v)
            for k, v in fingerprint.items()
            if state.get("fingerprint", {}).get(k) != v
        }
        raise DistacError(
            f"'{path}' was saved with other settings {diff} (saved, now); use another state directory or do not resume"
        )
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            p.copy_(state["params"][n].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    report.loss_curve = list(state["loss_curve"])
    report.norm_curve = [tuple(x) for x in state["norm_curve"]]
    return int(state["step"])

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

A LoRA adapter as the fine-tune: the teacher is θ_0 + ΔW; the student is either the full model at
θ_0 + κΔW (``student="full"``) or, by default, a LoRA of the adapter's rank whose factors train
(``student="lora"``; θ above is then (A, B), see :mod:`distac.conditioning.lowrank`).

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
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DistacError
from ..nn.data import Inputs, iter_batches
from ..nn.evaluate import collect_logits, confidence_stats
from ..nn.models import Batch, batch_to, forward_logits
from ..nn.models import batch_size as _batch_len
from ..nn.optim import lr_factor
from ..progress import Counter
from ._setup import Task, default_lr, make_accelerator, prepare, resolve
from ._state import CHECKPOINT, load_checkpoint, save_checkpoint
from .config import MODES, ConditionConfig
from .diagnose import FlagRules
from .lowrank import FactoredVector, LoraStudent

__all__ = [
    "MODES",
    "ConditionReport",
    "ConditionResult",
    "ConditioningDiverged",
    "condition",
    "default_lr",
    "distill_loss",
]

StateDict = dict[str, Tensor]


@dataclass
class ConditionReport:
    """What happened during one conditioning run (written as JSON by the CLI).

    ``config`` holds the *resolved* settings: the mode ``auto`` chose (``none`` when nothing was
    flagged), κ, the temperatures, the learning rate, the warm-up and the target norm actually used.
    """

    task: str
    config: ConditionConfig
    world_size: int = 1
    norm_before: float = 0.0  # ‖τ‖ of the fine-tune
    norm_init: float = 0.0  # ‖κτ‖, the student's start
    norm_after: float = 0.0  # ‖τ'‖
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

    def to_dict(self) -> dict[str, Any]:
        """One flat mapping: the task, every resolved setting, then the measurements."""
        d = asdict(self)
        return {"task": d.pop("task"), **d.pop("config"), **d}

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; with ``path``, also written there (atomically)."""
        import json

        from ..io.atomic import write_text

        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text(path, text)
        return text


@dataclass
class ConditionResult:
    """The conditioned state dict (τ' = ``state`` − base) and the :class:`ConditionReport` of its making.

    ``adapter``: with a LoRA student, τ' in LoRA form (the trained factors; the head is the input adapter's),
    written as an adapter folder by :func:`~distac.conditioning.lowrank.write_adapter`.
    """

    state: StateDict
    report: ConditionReport
    adapter: FactoredVector | None = None


class ConditioningDiverged(DistacError):
    """The loss or gradient became NaN/Inf; ``.result`` holds the last good state and the report so far."""

    def __init__(self, message: str, result: ConditionResult):
        super().__init__(message)
        self.result = result


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, *, t_teacher: float, t_student: float) -> Tensor:
    """T_t·T_s·KL(softmax(z_T/T_t) ‖ softmax(z_S/T_s)), summed over classes and averaged over the batch.

    ``F.kl_div(input=log q, target=p)`` is KL(p ‖ q): p is the teacher, q the student.
    """
    logq = F.log_softmax(student_logits.float() / t_student, dim=-1)
    p = F.softmax(teacher_logits.float() / t_teacher, dim=-1)
    return F.kl_div(logq, p, reduction="batchmean") * (t_teacher * t_student)


def condition(
    model: nn.Module,
    base: Mapping[str, Tensor],
    finetuned: Any,
    data: Any,
    config: ConditionConfig | None = None,
    *,
    task: str | None = None,
    heads: Sequence[str] | None = None,
    state_dir: str | Path | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    rules: FlagRules | None = None,
    **settings: Any,
) -> ConditionResult:
    """Run DisTaC on one task: distil the fine-tune into a student that starts at θ_0 + κ·τ.

    Args:
        model: a module of the common architecture (forward returns logits); copied, never modified.
        base: θ_0.
        finetuned: either one fine-tuned state dict, or ``{task: state dict}`` for all tasks with ``task``
            naming the one to condition (the others only supply the default target norm and ``auto``'s diagnosis).
            A LoRA adapter (an :class:`~distac.io.lora.AdapterSource` on ``base``, or a
            :class:`~distac.conditioning.lowrank.FactoredVector`) may stand for any state dict;
            ``student`` then says whether its factors (``lora``, the default) or the full model train.
        data: the task's unlabeled inputs: an :class:`~distac.nn.data.Inputs` or a tensor (re-batched to
            ``batch_size``, shuffled with ``seed``), or a sequence of ready batches (cycled as given;
            ``batch_size`` is then their size). With ``{task: ...}`` finetuned, may also be ``{task: inputs}``.
        config: the settings (:class:`~distac.conditioning.config.ConditionConfig`; default: its defaults).
            ``mode``: ``norm`` (κ from ``kappa`` / ``target_norm`` / mean of the other tasks' norms;
            temperatures (10, 10)), ``confidence`` (κ = 1, (1, 10)), ``both`` (κ as ``norm``, (1, 10)), or
            ``auto`` (what :func:`~distac.conditioning.diagnose.diagnose` recommends; if nothing is flagged,
            the fine-tune is returned unchanged and the report says so). Explicit ``kappa`` / temperatures
            override any mode.
        task: which entry of ``finetuned`` to condition.
        heads: head patterns (frozen; default per model type).
        state_dir: where to save a resumable state every ``save_every`` steps; with ``resume`` a run
            continues from the state found there (same settings required).
        progress: show a progress bar (interactive terminals only).
        device / accelerator: an existing ``accelerate.Accelerator`` (multi-process runs), else one is made
            for ``device`` (default CUDA when available).
        rules: the flag rules ``auto`` diagnoses with (default :class:`~distac.conditioning.diagnose.FlagRules`).
        **settings: any :class:`ConditionConfig` field, replacing the value in ``config``.

    Returns:
        A :class:`ConditionResult`: ``.state`` (the conditioned state dict), ``.report``, and with a LoRA
        student ``.adapter`` (τ' as factors of the input's rank).

    Raises:
        ConditioningDiverged: the loss or gradient became NaN/Inf (``.result`` holds the last good state).

    Example:
        >>> res = condition(model, base, {"a": sd_a, "b": sd_b}, x_a, task="a", mode="norm")  # doctest: +SKIP
        >>> tau_a = TaskVector.from_models(base, res.state); res.report.config.kappa  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    cfg = ConditionConfig.of(config, **settings)
    job = prepare(model, base, finetuned, data, task, heads)
    resolved = resolve(cfg, job, model, base, data, rules, device)
    acc = accelerator if accelerator is not None else make_accelerator(device)
    if isinstance(job.data, Inputs) and resolved.batch_size % acc.num_processes:
        raise DistacError(
            f"batch_size {resolved.batch_size} must be divisible by the number of processes ({acc.num_processes})"
        )
    report = ConditionReport(
        job.name,
        resolved,
        world_size=acc.num_processes,
        norm_before=job.norm,
        norm_init=_value(resolved.kappa) * job.norm,
    )
    if resolved.mode == "none":
        report.norm_after, report.agreement, report.note = job.norm, 1.0, "auto: no flag raised, fine-tune unchanged"
        unchanged = job.adapter if resolved.student == "lora" else None
        return ConditionResult({k: v.clone() for k, v in job.ft.items()}, report, unchanged)
    run = (_LoraRun if resolved.student == "lora" else _Run)(model, base, job, report, acc)
    ckpt = Path(state_dir) / CHECKPOINT if state_dir is not None else None
    start = 0
    if ckpt is not None and resolved.resume and ckpt.is_file():
        start = load_checkpoint(ckpt, run)
        report.resumed_from = start
    run.train(start, ckpt, t0, progress=progress)
    return run.finish(t0)


def _value(x: float | None) -> float:
    """A setting that :func:`~distac.conditioning._setup.resolve` has filled in (never None in a run)."""
    if x is None:
        raise AssertionError("an unresolved setting reached the training loop")
    return float(x)


# ------------------------------------------------------------------------------------------------
# the run: student at θ_0 + κτ, frozen teacher, Adam with the anchor, checkpoints
# ------------------------------------------------------------------------------------------------


class _NonFinite(Exception):
    """A step produced a NaN/Inf loss or gradient (turned into :class:`ConditioningDiverged`)."""


class _Run:
    """Everything one conditioning run holds: the two models, the trainable parameters, the optimiser."""

    def __init__(self, model: nn.Module, base: Mapping[str, Tensor], job: Task, report: ConditionReport, acc: Any):
        cfg = report.config
        self.job, self.report, self.cfg, self.acc, self.dev = job, report, cfg, acc, acc.device
        self.teacher = copy.deepcopy(model).to(self.dev)
        self.teacher.load_state_dict(dict(job.ft), strict=True)
        self.teacher.eval().requires_grad_(False)
        self._make_student(model, base, job, _value(cfg.kappa))
        self.student.to(self.dev).train(cfg.train_mode)
        self.anchors = [p.detach().clone() for p in self.params]
        self.batches = _BatchStream(job.data, cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index)
        self.eval_set = self.batches.eval_batches(cfg.eval_examples)
        source = f"task '{job.name}', teacher on its data"
        self.teacher_logits = collect_logits(self.teacher, self.eval_set, device=self.dev, source=source)
        report.confidence_before = confidence_stats(self.teacher_logits).to_dict()
        report.agreement_init = self._agreement(collect_logits(self.student, self.eval_set, device=self.dev))
        self.optimizer = torch.optim.Adam(
            self.params, lr=_value(cfg.lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        steps, warmup = cfg.steps, int(_value(cfg.warmup))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: lr_factor(k, warmup=warmup, steps=steps)
        )
        self.fingerprint = {"task": job.name, **cfg.fingerprint()}

    def _make_student(self, model: nn.Module, base: Mapping[str, Tensor], job: Task, kappa: float) -> None:
        """The student at θ_0 + κτ, its trainable names and parameters, and what :meth:`norm` compares them with."""
        self.student, self.names, self.params, self.fixed_sq = _init_student(model, base, job, kappa)
        self.base_p = [base[n].to(self.dev, p.dtype) for n, p in zip(self.names, self.params, strict=True)]

    def _agreement(self, logits: Tensor) -> float:
        return float((logits.argmax(-1) == self.teacher_logits.argmax(-1)).float().mean())

    def norm(self) -> float:
        """‖θ − θ_0‖ over the shared entries (trainable parameters plus the fixed, κ-scaled buffers)."""
        with torch.no_grad():
            pairs = zip(self.params, self.base_p, strict=True)
            sq = sum(float((p.double() - b.double()).pow(2).sum()) for p, b in pairs)
        return math.sqrt(sq + self.fixed_sq)

    def state(self) -> StateDict:
        sd = self.student.state_dict()
        return {k: sd[k].detach().to("cpu", self.job.ft[k].dtype).clone() for k in self.job.ft}

    def train(self, start: int, ckpt: Path | None, t0: float, *, progress: bool) -> None:
        """Steps ``start .. K-1``; a NaN/Inf stops the run with the last good state saved and returned."""
        cfg, acc = self.cfg, self.acc
        wrapped = acc.prepare(self.student)
        torch.manual_seed(cfg.seed + acc.process_index)  # dropout masks, if train_mode
        quiet = not (progress and acc.is_main_process)
        bar = Counter(cfg.steps, desc=f"condition {self.job.name}", unit="step", initial=start, quiet=quiet, leave=True)
        with bar:
            for step in range(start, cfg.steps):
                self._train_step(wrapped, step, ckpt, t0)
                bar.update(1, loss=f"{self.report.loss_curve[-1]:.4g}")

    def _train_step(self, wrapped: nn.Module, step: int, ckpt: Path | None, t0: float) -> None:
        """One step and its bookkeeping: loss, time, the norm every ``log_every``, a checkpoint every ``save_every``."""
        cfg, acc = self.cfg, self.acc
        t_step = time.perf_counter()
        try:
            loss = self._step(wrapped, step)
        except _NonFinite as e:
            raise self._diverged(step, str(e), ckpt, t0) from None
        self.report.loss_curve.append(loss)
        self.report.step_seconds.append(time.perf_counter() - t_step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            self.report.norm_curve.append((step + 1, self.norm()))
        if ckpt is not None and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            if acc.is_main_process:
                save_checkpoint(ckpt, self, step + 1)
            acc.wait_for_everyone()

    def _step(self, wrapped: nn.Module, step: int) -> float:
        """One Adam step on KD + β‖θ − θ_init‖²; returns the total loss (all processes' mean)."""
        cfg, acc = self.cfg, self.acc
        batch = batch_to(self.batches.get(step), self.dev)
        with torch.no_grad():
            zt = forward_logits(self.teacher, batch)
        zs = forward_logits(wrapped, batch)
        kd = distill_loss(zs, zt, t_teacher=_value(cfg.t_teacher), t_student=_value(cfg.t_student))
        kd_all = float(acc.reduce(kd.detach().reshape(1), reduction="mean"))
        if not math.isfinite(kd_all):
            raise _NonFinite(f"the loss is {kd_all}")
        self.optimizer.zero_grad(set_to_none=True)
        acc.backward(kd)
        anchor_sq = self._add_anchor_gradient(cfg.beta)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if not math.isfinite(gnorm):
            raise _NonFinite(f"the gradient norm is {gnorm}")
        self.optimizer.step()
        self.scheduler.step()
        return kd_all + cfg.beta * anchor_sq

    @torch.no_grad()
    def _add_anchor_gradient(self, beta: float) -> float:
        """Add 2β(θ − θ_init) to the gradients (before clipping); return ‖θ − θ_init‖²."""
        live = [(p, a) for p, a in zip(self.params, self.anchors, strict=True) if p.grad is not None]
        # fused multi-tensor ops: the anchor must not cost more than Adam's own update
        diffs = torch._foreach_sub([p for p, _ in live], [a for _, a in live])
        anchor_sq = float(torch.stack(torch._foreach_norm(diffs)).double().pow(2).sum()) if diffs else 0.0
        if diffs and beta > 0:
            torch._foreach_add_([cast(Tensor, p.grad) for p, _ in live], diffs, alpha=2 * beta)
        return anchor_sq

    def _diverged(self, step: int, what: str, ckpt: Path | None, t0: float) -> ConditioningDiverged:
        report = self.report
        report.steps_done = step
        report.note = f"stopped at step {step + 1}: {what}"
        report.seconds = time.perf_counter() - t0
        kept = f"kept in '{ckpt}'" if ckpt is not None and ckpt.is_file() else "returned in the exception's .result"
        if ckpt is not None and self.acc.is_main_process:
            save_checkpoint(ckpt, self, step)
            kept = f"kept in '{ckpt}'"
        return ConditioningDiverged(
            f"conditioning task '{self.job.name}' stopped at step {step + 1}: {what}. The last good state (after "
            f"step {step}) is {kept}. Lower --lr (now {self.cfg.lr:g}), raise --beta or check the temperatures, "
            "then resume.",
            self.result(),
        )

    def finish(self, t0: float) -> ConditionResult:
        report = self.report
        report.steps_done = self.cfg.steps
        report.norm_after = self.norm()
        self.student.eval()
        logits = collect_logits(self.student, self.eval_set, device=self.dev)
        report.agreement = self._agreement(logits)
        report.confidence_after = confidence_stats(logits).to_dict()
        report.seconds = time.perf_counter() - t0
        return self.result()

    def result(self) -> ConditionResult:
        return ConditionResult(self.state(), self.report)


class _LoraRun(_Run):
    """The run with a student in LoRA form (:class:`~distac.conditioning.lowrank.LoraStudent`): the trainable
    parameters are the adapter's factors, so the anchor acts on them, and ‖τ'‖ is measured from them.
    """

    def _make_student(self, model: nn.Module, base: Mapping[str, Tensor], job: Task, kappa: float) -> None:
        if job.adapter is None:
            raise AssertionError("a LoRA student reached a run without an adapter")
        self.base = base
        self.student = LoraStudent(model, base, job.ft, job.adapter.without_heads(job.patterns), kappa)
        self.names, self.params = self.student.trainable()
        self.fixed_sq, self.base_p = 0.0, []

    def norm(self) -> float:
        """‖τ'‖ from the factors (and the adapter's whole tensors), never a dense ΔW."""
        return cast(LoraStudent, self.student).vector(self.base).norm()

    def state(self) -> StateDict:
        return cast(LoraStudent, self.student).state(self.job.ft)

    def result(self) -> ConditionResult:
        return ConditionResult(self.state(), self.report, cast(LoraStudent, self.student).vector(self.base))


def _init_student(
    model: nn.Module, base: Mapping[str, Tensor], job: Task, kappa: float
) -> tuple[nn.Module, list[str], list[nn.Parameter], float]:
    """A copy of ``model`` at θ_0 + κτ (head and integer buffers: the fine-tune's), only shared parameters trainable.

    Returns the student, the trainable names and parameters (in the model's order), and the squared
    norm of the shared entries that do not train (κ-scaled floating-point buffers).
    """
    tau = job.tau
    init = {k: (tau.apply_to({k: base[k]}, kappa)[k] if k in tau else v.clone()) for k, v in job.ft.items()}
    student = copy.deepcopy(model)
    student.load_state_dict(init, strict=True)
    pdict = dict(student.named_parameters())
    for n, p in pdict.items():
        p.requires_grad_(n in tau)
    names = [n for n, _ in model.named_parameters() if n in tau]
    fixed_sq = sum(float((init[k].double() - base[k].double()).pow(2).sum()) for k in tau if k not in pdict)
    return student, names, [pdict[n] for n in names], fixed_sq


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
            head = self.data.select(slice(0, min(n, len(self.data))))
            sub = Inputs(head if isinstance(head, Tensor) else dict(head), source=self.data.source)
            return sub.batches(self.batch_size)
        out, seen = [], 0
        for b in iter_batches(self.fixed, self.batch_size):
            if seen >= n:
                break
            out.append(b)
            seen += _batch_len(b)
        return out

"""The settings of one DisTaC conditioning run, declared once.

:class:`ConditionConfig` is the single place where a setting lives: its default (with the reason
for it), its allowed range and its help text. Everything else derives from it:

* the ``distac condition`` flags (:func:`click_options`: one loop over the fields),
* the validation (``__post_init__``: the same ranges the flags enforce),
* the fingerprint of a resumable state (:meth:`ConditionConfig.fingerprint`: the fields that change
  the conditioned weights),
* the report (:class:`~distac.conditioning.distill.ConditionReport` records the resolved config).

Adding a setting is adding one field here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DistacError, closest

__all__ = ["MODES", "STUDENTS", "ConditionConfig", "click_options"]

#: what the user may ask for; ``none`` is what ``auto`` resolves to when nothing is flagged
MODES = ("auto", "norm", "confidence", "both")
#: what trains: the whole shared model, or the factors of a LoRA adapter (``auto``: lora for adapter inputs)
STUDENTS = ("auto", "full", "lora")


def _setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] = (),
    resolved_choices: tuple[str, ...] = (),
    fingerprint: bool = False,
    before: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its CLI help, its range (``>= low``, or ``> low`` when ``low_open``), and
    whether it belongs to the fingerprint of a resumable state (it changes the conditioned weights).
    ``resolved_choices`` are values the run itself may set (never offered as a flag). ``before``: the value
    a resumable state saved before the field existed was made with, when that is not the default.
    """
    meta = {
        "help": help,
        "low": low,
        "low_open": low_open,
        "choices": choices,
        "resolved_choices": resolved_choices,
        "fingerprint": fingerprint,
        "before": default if before is dataclasses.MISSING else before,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ConditionConfig:
    """Every setting of :func:`~distac.conditioning.distill.condition` (frozen; see the module docstring).

    ``None`` means "derived at run time" (the comment says from what); the report records the
    resolved values.

    Example:
        >>> ConditionConfig(mode="norm", kappa=0.5).steps
        500
    """

    # auto: diagnose decides, so a healthy fine-tune is returned unchanged instead of being retrained
    mode: str = _setting(
        "auto",
        "What to fix: norm (shrink κ, T=(10,10)), confidence (κ=1, T=(1,10)), both, or auto (what diagnose flags).",
        choices=MODES,
        resolved_choices=("none",),
    )
    # auto: an adapter stays an adapter (its factors train, the output loads with peft); a full fine-tune
    # trains whole. States saved before this setting existed trained the full model.
    student: str = _setting(
        "auto",
        "What trains: lora (the adapter's factors, same rank; writes an adapter), full, or auto (lora for adapters).",
        choices=STUDENTS,
        fingerprint=True,
        before="full",
    )
    # None: target_norm / ‖τ‖ in the norm modes, 1 for confidence (the paper's recipe)
    kappa: float | None = _setting(None, "Norm scale κ (overrides the mode's).", low=0, low_open=True, fingerprint=True)
    # None: the mean norm of the other tasks' vectors, the scale a merge treats as normal
    target_norm: float | None = _setting(None, "Target ‖τ'‖ (default: mean of the other tasks').", low=0, low_open=True)
    # None: the mode's pair, (10, 10) for norm, (1, 10) for confidence (asymmetric pair sharpens the student)
    t_teacher: float | None = _setting(None, "Teacher temperature T_t.", low=0, low_open=True, fingerprint=True)
    t_student: float | None = _setting(None, "Student temperature T_s.", low=0, low_open=True, fingerprint=True)
    # 0.1 as the paper's README; the official argparse default is 1.0
    beta: float = _setting(0.1, "Anchor weight β (pull towards θ_0 + κτ).", low=0, fingerprint=True)
    # K = 500, the official max_steps: enough to move the norm, cheap next to fine-tuning
    steps: int = _setting(500, "Distillation steps K.", low=1, fingerprint=True)
    # None: 1e-5 from 20M trainable parameters (the paper's, CLIP ViT-B/32), 1e-4 below (small models barely move)
    lr: float | None = _setting(
        None, "Adam lr (default: 1e-5 from 20M params, else 1e-4).", low=0, low_open=True, fingerprint=True
    )
    # 128, the official batch; the global batch, split evenly over processes
    batch_size: int = _setting(128, "Global batch size (split over processes).", low=1, fingerprint=True)
    # None: K // 10. The official default equals K, so its whole run is warm-up; must end before K
    warmup: int | None = _setting(None, "Warm-up steps (default K/10, must be < K).", low=0, fingerprint=True)
    # 0: runs are reproducible by default; the data order of step k depends on (seed, k) only
    seed: int = _setting(0, "Seed of the data order (and dropout masks).", fingerprint=True)
    # 1.0, the official clip: keeps the first high-temperature steps from jumping away from θ_0 + κτ
    max_grad_norm: float = _setting(
        1.0, "Clip the global gradient norm to this.", low=0, low_open=True, fingerprint=True
    )
    # eval: BatchNorm statistics stay as scaled with κ and the teacher's targets are deterministic
    train_mode: bool = _setting(False, "Run the student in train mode (dropout on).", fingerprint=True)
    # 1024 examples measure agreement and confidence for the report in seconds, also on a CPU
    eval_examples: int = _setting(1024, "Examples used to measure agreement and confidence.", low=1)
    # 100: at most 100 steps lost to an interruption, while writing the state stays rare
    save_every: int = _setting(100, "Save the resumable state every this many steps.", low=1)
    # 10: a norm curve of 50 points over the default run
    log_every: int = _setting(10, "Record the norm every this many steps.", low=1)
    # True: a re-run after an interruption continues instead of starting over
    resume: bool = _setting(True, "Continue from a state found in --state-dir.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.warmup is not None and not self.warmup < self.steps:
            raise DistacError(
                f"warmup must be in [0, steps) so that the warm-up ends before the run does, got warmup={self.warmup}, "
                f"steps={self.steps} (the official code's default warm-up of 500 = K never ends)"
            )

    @classmethod
    def of(cls, config: ConditionConfig | None = None, **settings: Any) -> ConditionConfig:
        """``config`` (default: the defaults) with ``settings`` replaced; a misspelt name is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in settings:
            if k not in names:
                raise DistacError(f"unknown conditioning setting '{k}'{closest(k, names)}")
        return dataclasses.replace(config or cls(), **settings)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the conditioned weights; a saved state resumes only under equal ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["fingerprint"]}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: value}`` a state saved before a field existed was made with: its default, or the
        field's ``before`` value where the run then did something else (``student``: full).
        """
        return {f.name: f.metadata["before"] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    allowed = m["choices"] + m["resolved_choices"]
    if allowed and value not in allowed:
        raise DistacError(f"{f.name} must be one of {list(m['choices'])}, got '{value}'")
    low = m["low"]
    if value is None or low is None:
        return
    bad = not value > low if m["low_open"] else not value >= low
    if bad:
        raise DistacError(f"{f.name} must be {'>' if m['low_open'] else '>='} {low:g}, got {value}")


def _base_type(hint: Any) -> type:
    """``float | None`` -> ``float``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def click_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with one option per :class:`ConditionConfig` field (``--kappa``, ...).

    Types, ranges, choices, defaults and help all come from the field; the command receives each
    value under the field's name (:meth:`ConditionConfig.of` turns them into a config).
    """
    import click

    hints = typing.get_type_hints(ConditionConfig)
    for f in reversed(dataclasses.fields(ConditionConfig)):
        flag = "--" + f.name.replace("_", "-")
        m, kind = f.metadata, _base_type(hints[f.name])
        if kind is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True, help=m["help"])
        else:
            ptype: Any = kind
            if m["choices"]:
                ptype = click.Choice(list(m["choices"]))
            elif m["low"] is not None:
                rng = click.IntRange if kind is int else click.FloatRange
                ptype = rng(min=m["low"], min_open=m["low_open"])
            opt = click.option(
                flag, f.name, type=ptype, default=f.default, show_default=f.default is not None, help=m["help"]
            )
        fn = opt(fn)
    return fn

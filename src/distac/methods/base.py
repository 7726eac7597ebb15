"""The method registry: pure per-tensor functions with typed, validated parameters.

A merge method is a plain function::

    def ties(base, deltas, *, ctx, scale=1.0, density=0.2, ...) -> Tensor

* ``base``   -- the base tensor (or a row chunk of it), fp32, shape ``S``;
* ``deltas`` -- the task vectors of the N models for that tensor, fp32, shape ``(N, *S)``;
* ``ctx``    -- a :class:`TensorContext`: the tensor's name and full shape, the chunk offset,
  thresholds from the engine's global pre-pass, and per-tensor statistics (Fisher, Gram);
* keyword-only hyperparameters, each with a default and an ``Annotated`` constraint.

It returns the merged *task vector* (already scaled); the engine adds the base back, so
``θ = base + fn(...)``. Weight-space methods (averaging, SLERP, Model Stock) are written in the
same form, since ``mean(θ_t) = θ_0 + mean(τ_t)``.

The :class:`Method` record says what the engine must do for a function: whether it may be split by
rows (``chunkable``), which whole-model statistic it needs first (``prepass``), and which
per-model statistics it reads (``stats``). Parameters are read from the signature, so the
function is the single source of truth for names, defaults and ranges.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from torch import Tensor

from ..errors import DistacError, closest

__all__ = [
    "METHOD_PARAM_NAMES",
    "STATISTICS",
    "Method",
    "OneOf",
    "ParamSpec",
    "PerModel",
    "Prepass",
    "Range",
    "TensorContext",
    "missing_statistic",
]


# ----------------------------------------------------------------------------------------------
# parameter constraints, used inside typing.Annotated
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A numeric interval; ``Range(0, 1, lo_open=True)`` is (0, 1]."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, name: str, v: float) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise DistacError(f"parameter '{name}' must be a number, got {v!r}")
        bad = (self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo))) or (
            self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi))
        )
        if bad:
            raise DistacError(f"parameter '{name}' = {v} is out of range: must be in {self}")

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        left = "(" if self.lo_open or self.lo is None else "["
        right = ")" if self.hi_open or self.hi is None else "]"
        return f"{left}{lo}, {hi}{right}"


@dataclass(frozen=True)
class OneOf:
    """A string parameter with a fixed set of values."""

    options: tuple[str, ...]

    def check(self, name: str, v: Any) -> None:
        if v not in self.options:
            raise DistacError(
                f"parameter '{name}' = {v!r} is not one of {list(self.options)}{closest(str(v), self.options)}"
            )

    def __str__(self) -> str:
        return " | ".join(self.options)


@dataclass(frozen=True)
class PerModel:
    """The parameter may be a list with one value per model (or a scalar shared by all)."""


# ----------------------------------------------------------------------------------------------
# what the engine hands a method, and what a method asks of the engine
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorContext:
    """Everything a per-tensor function may know besides the tensors themselves."""

    name: str
    shape: tuple[int, ...]
    #: flat element offset of this chunk inside the full tensor (0 when the tensor is whole);
    #: counter-based randomness (DARE) hashes ``offset + i`` so chunking cannot change results.
    offset: int = 0
    #: per-model magnitude thresholds (the k-th smallest magnitudes) from the engine's pre-pass,
    #: shape (N,), or None (see :class:`Prepass`).
    thresholds: Tensor | None = None
    #: per-tensor statistics, e.g. ``{"fisher": (N, *S), "base_fisher": S, "gram": (N, d, d)}``.
    stats: Mapping[str, Tensor] = field(default_factory=dict)
    #: global per-model scalars from the pre-pass, e.g. ``{"fisher": (N,) L2 norms}``.
    norms: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepass:
    """What the engine must compute, exactly, before (or while) it merges tensor by tensor.

    * ``density``: per-model keep fractions. The engine selects each model's exact k-th smallest
      magnitude of ``transform(base, deltas, ctx)`` (default: the deltas themselves; see
      :mod:`distac.merging.kth`) and passes it to the method as ``ctx.thresholds``, shape (N,).
    * ``scope``: over what the magnitudes are ranked. ``"global"``: all mergeable tensors of the
      model, in a pass over the whole model before the merge. ``"tensor"``: each tensor alone; the
      engine selects them only for tensors it splits into row pieces, just before merging their
      pieces, and a tensor merged whole gets none (the method ranks it itself, same bits).
    * ``stat_norms``: names of statistics whose per-model global L2 norm is needed
      (Fisher merging's normalisation); passed as ``ctx.norms[name]``.

    Example:
        >>> Prepass(density=[0.2, 0.2], scope="tensor").scope
        'tensor'
    """

    density: Sequence[float] | None = None
    transform: Callable[[Tensor, Tensor, TensorContext], Tensor] | None = None
    stat_norms: tuple[str, ...] = ()
    scope: Literal["global", "tensor"] = "global"

    def __post_init__(self) -> None:
        if self.scope not in ("global", "tensor"):
            raise ValueError(f"Prepass scope must be 'global' or 'tensor', got {self.scope!r}")
        if self.scope == "tensor" and self.stat_norms:
            raise ValueError("Prepass: stat_norms are whole-model norms; they need scope='global'")


#: How to compute each statistic a method can declare in ``Method.stats``: (CLI command, Python argument).
STATISTICS: dict[str, tuple[str, str]] = {
    "fisher": ("distac stats fisher MODEL DATA --out MODEL.fisher.safetensors", "fishers=[...]"),
    "base_fisher": ("distac stats fisher BASE BASE_DATA --out BASE.fisher.safetensors", "base_fisher=..."),
    "gram": ("distac stats gram MODEL DATA --out MODEL.gram.safetensors", "grams=[...]"),
}


def missing_statistic(method: str, stat: str) -> DistacError:
    """The error for a statistic a method needs and was not given, with the command that computes it."""
    cmd, arg = STATISTICS[stat]
    return DistacError(
        f"method '{method}' needs '{stat}' statistics for every model, and none were given; compute them with "
        f"`{cmd}` and pass them ({arg} in Python, `{stat.removeprefix('base_')}: PATH` in the model's YAML parameters)"
    )


# ----------------------------------------------------------------------------------------------
# the method record
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    type: Any
    constraints: tuple[Any, ...]
    per_model: bool

    def describe(self) -> str:
        c = ", ".join(str(x) for x in self.constraints if not isinstance(x, PerModel))
        pm = " (per model)" if self.per_model else ""
        return f"{self.name}={self.default!r}{pm}" + (f" in {c}" if c else "")


#: Names with one meaning across all methods (issue #2). Methods reuse them; they never invent synonyms.
METHOD_PARAM_NAMES = (
    "scale",
    "weights",
    "density",
    "scope",
    "merge_fn",
    "k",
    "tall_lambda",
    "common_space_fraction",
    "t",
    "seed",
)


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(annotation) is Annotated:
        args = typing.get_args(annotation)
        return args[0], tuple(args[1:])
    return annotation, ()


@dataclass(frozen=True)
class Method:
    """A registered merge method."""

    name: str
    fn: Callable[..., Tensor]
    summary: str
    paper: str
    #: may the engine split the tensor by rows? A callable receives the resolved params.
    chunkable: bool | Callable[[Mapping[str, Any]], bool] = True
    #: whole-model statistic needed first, as a function of (resolved params, n_models).
    prepass: Callable[[Mapping[str, Any], int], Prepass | None] | None = None
    #: per-model statistics the method reads: "fisher", "gram". Optional ones end with "?".
    stats: tuple[str, ...] = ()
    min_models: int = 1
    max_models: int | None = None
    #: how distac's convention differs from mergekit / FusionBench / peft, for the docs.
    notes: str = ""

    @property
    def params(self) -> dict[str, ParamSpec]:
        sig = inspect.signature(self.fn)
        hints = typing.get_type_hints(self.fn, include_extras=True)
        out = {}
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "ctx":
                continue
            typ, cons = _unwrap(hints.get(p.name, Any))
            out[p.name] = ParamSpec(p.name, p.default, typ, cons, any(isinstance(c, PerModel) for c in cons))
        return out

    def is_chunkable(self, params: Mapping[str, Any]) -> bool:
        return self.chunkable(params) if callable(self.chunkable) else bool(self.chunkable)

    def plan_prepass(self, params: Mapping[str, Any], n_models: int) -> Prepass | None:
        return self.prepass(params, n_models) if self.prepass else None

    def resolve(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Validate user parameters and fill defaults. Raises :class:`DistacError` naming the culprit."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.min_models == self.max_models
                else f"at least {self.min_models}" + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise DistacError(f"method '{self.name}' needs {want} fine-tuned model(s), got {n_models}")
        specs = self.params
        for k in params:
            if k not in specs:
                raise DistacError(
                    f"method '{self.name}' has no parameter '{k}'{closest(k, specs)}; "
                    f"its parameters are: {', '.join(specs) or 'none'}"
                )
        out: dict[str, Any] = {}
        for name, spec in specs.items():
            v = params.get(name, spec.default)
            if v is inspect.Parameter.empty:
                raise DistacError(f"method '{self.name}' needs parameter '{name}'")
            if spec.per_model and isinstance(v, list | tuple):
                if len(v) != n_models:
                    raise DistacError(f"parameter '{name}' has {len(v)} values but there are {n_models} models")
                values = list(v)
            else:
                values = [v]
            for x in values:
                if x is None:
                    continue
                for c in spec.constraints:
                    if hasattr(c, "check"):
                        c.check(name, x)
            out[name] = list(v) if isinstance(v, tuple) else v
        return out

    def __call__(self, base: Tensor, deltas: Tensor, *, ctx: TensorContext, **params: Any) -> Tensor:
        return self.fn(base, deltas, ctx=ctx, **params)

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
rows (``chunkable``), which whole-model statistic it needs first (``prepass``), which per-model
statistics it reads (``stats``), and how much memory it needs (``memory``). Parameters are read
from the signature, so the function is the single source of truth for names, defaults and ranges;
the checks that relate a parameter to the others or to the number of models (``checks``) sit in
the record too, so :meth:`Method.resolve` is the one place where parameters are validated.

The record is written next to its function with the :func:`merge_method` decorator, which
returns the :class:`Method` and registers nothing: ``distac.methods`` lists the records explicitly.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from torch import Tensor

from ..errors import DistacError, closest

__all__ = [
    "METHOD_PARAM_NAMES",
    "STATISTICS",
    "Check",
    "Count",
    "Method",
    "Number",
    "OneOf",
    "ParamSpec",
    "Patterns",
    "PerModel",
    "Prepass",
    "Range",
    "TensorContext",
    "merge_method",
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
class Number:
    """Any finite number (for parameters without a range, such as ``weights``); not shown in listings."""

    def check(self, name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise DistacError(f"parameter '{name}' must be a finite number, got {v!r}")

    def __str__(self) -> str:
        return ""


@dataclass(frozen=True)
class Count:
    """An integer parameter ``>= lo`` (``Range`` alone would accept 2.5)."""

    lo: int = 0

    def check(self, name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo:
            raise DistacError(f"parameter '{name}' = {v!r} must be an integer >= {self.lo}")

    def __str__(self) -> str:
        return f"integer >= {self.lo}"


@dataclass(frozen=True)
class Patterns:
    """Name patterns: one string or a list of them; ``re:`` ones must compile."""

    def check(self, name: str, v: Any) -> None:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
            raise DistacError(f"parameter '{name}' = {v!r} must be a name pattern or a non-empty list of them")
        for p in items:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise DistacError(
                        f"parameter '{name}': pattern {p!r} is not a valid regular expression ({e})"
                    ) from None

    def __str__(self) -> str:
        return "glob or 're:' regex, or a list of them"


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
        c = ", ".join(str(x) for x in self.constraints if not isinstance(x, PerModel) and str(x))
        pm = " (per model)" if self.per_model else ""
        return f"{self.name}={self.default!r}{pm}" + (f" in {c}" if c else "")

    def resolve(self, method: str, params: Mapping[str, Any], n_models: int) -> Any:
        """The user's value (or the default), checked against the constraints; tuples become lists."""
        v = params.get(self.name, self.default)
        if v is inspect.Parameter.empty:
            raise DistacError(f"method '{method}' needs parameter '{self.name}'")
        values = [v]
        if self.per_model and isinstance(v, list | tuple):
            if len(v) != n_models:
                raise DistacError(f"parameter '{self.name}' has {len(v)} values but there are {n_models} models")
            values = list(v)
        _numbers(self.name, values)
        for x in values:
            if x is None:
                continue
            for c in self.constraints:
                if hasattr(c, "check"):
                    c.check(self.name, x)
        return list(v) if isinstance(v, tuple) else v


#: Names with one meaning across all methods. Methods reuse them; they never invent synonyms.
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


#: A check of the resolved parameters against each other or the number of models: it returns the
#: error message (naming the parameter and the fix) or None when the parameters make sense.
Check = Callable[[Mapping[str, Any], int], str | None]


def _count_phrase(lo: int, hi: int | None) -> str:
    if lo == hi:
        return f"exactly {lo}"
    return f"at least {lo}" + (f" and at most {hi}" if hi else "")


def _numbers(name: str, values: Sequence[Any]) -> None:
    """Every numeric value of a parameter must be finite: NaN or Inf would end up in every tensor."""
    for x in values:
        if isinstance(x, float) and not math.isfinite(x):
            raise DistacError(f"parameter '{name}' = {x} is not a finite number; give a finite value")


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function and what the engine and the docs must know about it."""

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
    #: the method's working set beyond the engine's inputs, shown by ``distac methods``
    #: (N models, "piece" = the engine's row chunk, "largest" = the largest tensor in fp32).
    memory: str = ""
    #: cross-parameter checks run by :meth:`resolve` after each parameter passed its own constraints.
    checks: tuple[Check, ...] = ()

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
        """Validate user parameters and fill defaults. Raises :class:`DistacError` naming the culprit.

        Each value must be finite and satisfy its own constraints (``Range``, ``OneOf``; per model
        when ``PerModel``); then the record's ``checks`` relate the parameters to each other and
        to ``n_models``.
        """
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            want = _count_phrase(self.min_models, self.max_models)
            raise DistacError(f"method '{self.name}' needs {want} fine-tuned model(s), got {n_models}")
        specs = self.params
        for k in params:
            if k not in specs:
                raise DistacError(
                    f"method '{self.name}' has no parameter '{k}'{closest(k, specs)}; "
                    f"its parameters are: {', '.join(specs) or 'none'}"
                )
        out = {name: spec.resolve(self.name, params, n_models) for name, spec in specs.items()}
        for check in self.checks:
            msg = check(out, n_models)
            if msg is not None:
                raise DistacError(f"method '{self.name}': {msg}")
        return out

    def __call__(self, base: Tensor, deltas: Tensor, *, ctx: TensorContext, **params: Any) -> Tensor:
        return self.fn(base, deltas, ctx=ctx, **params)


def merge_method(
    name: str,
    *,
    summary: str,
    paper: str,
    memory: str,
    chunkable: bool | Callable[[Mapping[str, Any]], bool] = True,
    prepass: Callable[[Mapping[str, Any], int], Prepass | None] | None = None,
    stats: tuple[str, ...] = (),
    min_models: int = 1,
    max_models: int | None = None,
    notes: str = "",
    checks: tuple[Check, ...] = (),
) -> Callable[[Callable[..., Tensor]], Method]:
    """Decorator: turn a per-tensor function into its :class:`Method` record, registering nothing.

    The module-level name becomes the record (still callable like the function); the registry in
    :mod:`distac.methods` lists the records explicitly, so importing a module has no side effect.

    Args:
        name: the method's name in configs and on the command line.
        summary, paper, notes: one-line description, reference, conventions versus other tools.
        memory: working set beyond the engine's inputs, e.g. ``"row-chunked: (N+1) x piece"``.
        chunkable, prepass, stats, min_models, max_models, checks: see :class:`Method`.

    Returns:
        A decorator mapping the function to its :class:`Method`.

    Example:
        >>> @merge_method("negate", summary="-Σ τ", paper="none", memory="row-chunked: 1 x piece")
        ... def negate(base, deltas, *, ctx):
        ...     return -deltas.sum(0)
        >>> negate.name, negate.is_chunkable({})
        ('negate', True)
    """

    def wrap(fn: Callable[..., Tensor]) -> Method:
        return Method(
            name,
            fn,
            summary=summary,
            paper=paper,
            chunkable=chunkable,
            prepass=prepass,
            stats=stats,
            min_models=min_models,
            max_models=max_models,
            notes=notes,
            memory=memory,
            checks=checks,
        )

    return wrap

"""All merge methods, in one explicit registry (no registration by import side effect).

Each method's record is built next to its function by :func:`~distac.methods.base.merge_method`;
this module lists the records, in the order ``distac methods`` shows them.
"""

from __future__ import annotations

from ..errors import DistacError, closest
from . import basic, curvature, interpolate, masked, sparse, spectral, wudi
from .base import Method, OneOf, ParamSpec, PerModel, Prepass, Range, TensorContext, merge_method

__all__ = [
    "METHODS",
    "Method",
    "OneOf",
    "ParamSpec",
    "PerModel",
    "Prepass",
    "Range",
    "TensorContext",
    "get_method",
    "merge_method",
]

_RECORDS: tuple[Method, ...] = (
    basic.average,
    basic.task_arithmetic,
    sparse.ties,
    sparse.dare_linear,
    sparse.dare_ties,
    sparse.della,
    sparse.della_linear,
    masked.breadcrumbs,
    masked.breadcrumbs_ties,
    masked.consensus_ta,
    masked.consensus_ties,
    spectral.tsv_m,
    spectral.iso_c,
    spectral.iso_cts,
    interpolate.slerp,
    interpolate.nuslerp,
    interpolate.multislerp,
    interpolate.karcher,
    interpolate.model_stock,
    curvature.gradient_matching,
    curvature.fisher,
    curvature.regmean,
    wudi.wudi,
    basic.passthrough,
)

#: every merge method by name
METHODS: dict[str, Method] = {m.name: m for m in _RECORDS}


def get_method(name: str) -> Method:
    """Look a merge method's record up by name.

    Args:
        name: a method name, as ``distac methods`` lists them.

    Returns:
        The :class:`Method` record: the pure per-tensor function, its parameters (defaults,
        ranges), paper, memory and what the engine must do for it. It is callable like the function.

    Raises:
        DistacError: for an unknown name, with the closest valid ones.

    Example:
        >>> get_method("ties").params["density"].default
        0.2
    """
    try:
        return METHODS[name]
    except KeyError:
        raise DistacError(
            f"unknown merge method '{name}'{closest(name, METHODS)}; run `distac methods` for the list"
        ) from None

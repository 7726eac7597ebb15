"""All merge methods, in one explicit registry (no registration by import side effect)."""

from __future__ import annotations

from ..errors import DistacError, closest
from .base import Method, OneOf, ParamSpec, PerModel, Prepass, Range, TensorContext
from .basic import METHODS as _BASIC
from .curvature import METHODS as _CURVATURE
from .interpolate import METHODS as _INTERPOLATE
from .sparse import METHODS as _SPARSE
from .spectral import METHODS as _SPECTRAL
from .wudi import METHODS as _WUDI

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
]

METHODS: dict[str, Method] = {m.name: m for m in (*_BASIC, *_SPARSE, *_SPECTRAL, *_INTERPOLATE, *_CURVATURE, *_WUDI)}


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name lists the closest valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise DistacError(
            f"unknown merge method '{name}'{closest(name, METHODS)}; run `distac methods` for the list"
        ) from None

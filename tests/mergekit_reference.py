"""distac's new mergekit methods against mergekit's own implementations, on fixed random fp32 tensors.

Imported by ``tests/test_methods_mergekit.py`` (which skips it where mergekit is not installed) and
run as a script in mergekit's environment, where it prints the max |distac − mergekit| per case::

    PYTHONPATH=src:tests /work/mk-venv/bin/python tests/mergekit_reference.py

DELLA draws at random; here mergekit's ``torch.bernoulli`` draws distac's counter-based uniforms
(model by model, tensor by tensor, as distac keys them), so the comparison is exact, not statistical.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

import distac
from distac.methods.rng import uniform
from distac.methods.sparse import model_keys

StateDict = dict[str, torch.Tensor]

#: shapes every comparison runs on: a matrix, a vector (one DELLA row), a 3-D tensor (DELLA ranks dim 1)
SHAPES = {"w": (16, 12), "b": (9,), "conv": (3, 4, 5)}


def states(n: int, *, seed: int = 0, zero_base: bool = False) -> tuple[StateDict, list[StateDict]]:
    """A base (or zeros) and ``n`` models 0.3·N(0, 1) away from it, over :data:`SHAPES`."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.zeros(s) if zero_base else torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


@contextlib.contextmanager
def replayed_bernoulli(name: str, seed: int, n: int) -> Iterator[None]:
    """Make ``torch.bernoulli`` inside mergekit draw distac's uniforms: model t of tensor ``name`` in turn."""
    keys = iter(model_keys(seed, name, n))
    original = torch.bernoulli

    def bernoulli(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        u = uniform(next(keys), 0, p.numel()).view(p.shape)
        return (u < p).to(p.dtype)

    torch.bernoulli = bernoulli  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.bernoulli = original  # type: ignore[assignment]


def _mk_group(tensors: list[torch.Tensor], base: torch.Tensor | None) -> Any:
    from mergekit.merge_methods.base import TensorGroup

    if base is None:
        return TensorGroup.from_tensors(tensors)
    return TensorGroup.from_tensors([base, *tensors], ids=["base", *range(len(tensors))], base_index=0)


def _mk(method: str, tensors: list[torch.Tensor], base: torch.Tensor | None, **params: Any) -> torch.Tensor:
    from mergekit.merge_methods.registry import get

    return get(method)([_mk_group(tensors, base)], parameters=params)[0]


def _per_model(values: list[Any]) -> dict[int, Any]:
    return dict(enumerate(values))


#: (label, distac method, distac params, mergekit method, mergekit params, base: real | zero | ignored, n)
CASES: list[tuple[str, str, dict, str, dict, str, int]] = [
    (
        "della",
        "della",
        {"density": [0.5, 0.7, 0.4], "epsilon": 0.15, "weights": [1.0, 0.5, 2.0], "scale": 0.8, "seed": 3},
        "della",
        {
            "density": _per_model([0.5, 0.7, 0.4]),
            "epsilon": _per_model([0.15] * 3),
            "weight": _per_model([1.0, 0.5, 2.0]),
            "lambda": 0.8,
        },
        "real",
        3,
    ),
    (
        "della normalize=false rescale=false",
        "della",
        {"density": 0.6, "epsilon": 0.3, "merge_fn": "sum", "rescale": False, "weights": [1.0, -0.5, 2.0]},
        "della",
        {
            "density": _per_model([0.6] * 3),
            "epsilon": _per_model([0.3] * 3),
            "weight": _per_model([1.0, -0.5, 2.0]),
            "normalize": False,
            "rescale": False,
        },
        "real",
        3,
    ),
    (
        "della_linear",
        "della_linear",
        {"density": 0.5, "epsilon": 0.2, "weights": [0.3, 0.7]},
        "della_linear",
        {"density": _per_model([0.5] * 2), "epsilon": _per_model([0.2] * 2), "weight": _per_model([0.3, 0.7])},
        "real",
        2,
    ),
    (
        "della_linear normalize=true",
        "della_linear",
        {"density": 0.3, "epsilon": 0.1, "weights": [0.3, 0.9], "merge_fn": "weighted_mean"},
        "della_linear",
        {
            "density": _per_model([0.3] * 2),
            "epsilon": _per_model([0.1] * 2),
            "weight": _per_model([0.3, 0.9]),
            "normalize": True,
        },
        "real",
        2,
    ),
    (
        "ties density=1 weighted_mean",
        "ties",
        {"density": 1.0, "scope": "tensor", "merge_fn": "weighted_mean", "weights": [1.0, 0.5, 2.0]},
        "ties",
        {"weight": _per_model([1.0, 0.5, 2.0])},
        "real",
        3,
    ),
    ("nuslerp", "nuslerp", {"weights": [0.3, 0.7]}, "nuslerp", {"weight": _per_model([0.3, 0.7])}, "real", 2),
    ("nuslerp no base", "nuslerp", {"weights": [0.3, 0.7]}, "nuslerp", {"weight": _per_model([0.3, 0.7])}, "zero", 2),
    (
        "nuslerp rows",
        "nuslerp",
        {"weights": [2.0, 1.0], "nuslerp_flatten": False},
        "nuslerp",
        {"weight": _per_model([2.0, 1.0]), "nuslerp_flatten": False},
        "real",
        2,
    ),
    (
        "nuslerp columns",
        "nuslerp",
        {"weights": [2.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        "nuslerp",
        {"weight": _per_model([2.0, 1.0]), "nuslerp_flatten": False, "nuslerp_row_wise": True},
        "real",
        2,
    ),
    (
        "multislerp",
        "multislerp",
        {"weights": [0.2, 0.3, 0.5]},
        "multislerp",
        {"weight": _per_model([0.2, 0.3, 0.5])},
        "real",
        3,
    ),
    (
        "multislerp no base",
        "multislerp",
        {"weights": [1.0, 2.0, 1.0]},
        "multislerp",
        {"weight": _per_model([1.0, 2.0, 1.0])},
        "zero",
        3,
    ),
    ("karcher", "karcher", {}, "karcher", {}, "zero", 3),
    (
        "karcher (base ignored)",
        "karcher",
        {"max_iter": 20, "tol": 1e-6},
        "karcher",
        {"max_iter": 20, "tol": 1e-6},
        "ignored",
        3,
    ),
    ("passthrough", "passthrough", {"scale": 0.5}, "passthrough", {"scale": {0: 0.5}}, "zero", 1),
]


def mergekit_differences() -> dict[str, float]:
    """Max |distac − mergekit| per case over :data:`SHAPES`, on fp32 inputs (needs mergekit)."""
    out: dict[str, float] = {}
    for label, method, params, mk_method, mk_params, base_kind, n in CASES:
        base, models = states(n, seed=21, zero_base=base_kind == "zero")
        ours = distac.merge(base, models, method, device="cpu", **params)
        worst = 0.0
        for k in SHAPES:
            mk_base = None if base_kind in ("zero", "ignored") else base[k]
            tensors = [m[k] for m in models]
            seed = params.get("seed", 0)
            with replayed_bernoulli(k, seed, n) if method.startswith("della") else contextlib.nullcontext():
                theirs = _mk(mk_method, tensors, mk_base, **mk_params)
            worst = max(worst, float((ours[k] - theirs).abs().max()))
        out[label] = worst
    out["nuslerp rows, some collinear"] = _collinear_rows_difference()
    return out


def _collinear_rows_difference() -> float:
    """NuSLERP per row where some rows are parallel, antiparallel or zero (the linear branch)."""
    g = torch.Generator().manual_seed(22)
    a, b = torch.randn(2, 6, 5, generator=g)
    b[0], b[1], b[2] = 2 * a[0], -3 * a[1], 0.0
    zero = {"w": torch.zeros(6, 5)}
    ours = distac.merge(zero, [{"w": a}, {"w": b}], "nuslerp", weights=[0.3, 0.7], nuslerp_flatten=False)["w"]
    theirs = _mk("nuslerp", [a, b], None, weight=_per_model([0.3, 0.7]), nuslerp_flatten=False)
    return float((ours - theirs).abs().max())


#: where the two differ only by fp32 rounding, not by convention: the bound on |distac − mergekit|
TOLERANCE = {"karcher (base ignored)": 1e-5}


def _main(out: Callable[[str], Any] = print) -> int:
    diffs = mergekit_differences()
    for label, diff in diffs.items():
        out(f"{label:40s} max |distac - mergekit| = {diff:.3g}")
    return int(any(d > TOLERANCE.get(k, 0.0) for k, d in diffs.items()))


if __name__ == "__main__":
    sys.exit(_main())

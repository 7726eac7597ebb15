"""Meaningless method parameters are refused when they are resolved, with one line naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import distac
from distac import DistacError, get_method
from distac.methods import Method, TensorContext, merge_method


def resolve(method: str, n: int = 2, **params: Any) -> dict[str, Any]:
    return get_method(method).resolve(params, n)


@pytest.mark.parametrize(
    ("method", "n", "params", "message"),
    [
        ("consensus_ta", 3, {"k": 4}, r"'k' = 4 is larger than the number of models \(3\)"),
        ("consensus_ties", 2, {"k": 3}, r"'k' = 3 is larger than the number of models \(2\)"),
        ("fisher", 2, {"weights": [0, 0]}, r"'weights' = \[0, 0\] must be >= 0 with at least one > 0"),
        ("fisher", 2, {"weights": 0}, r"'weights' = 0 must be >= 0"),
        ("fisher", 2, {"weights": [1, -1]}, r"'weights' = \[1, -1\] must be >= 0"),
        ("average", 2, {"weights": [2, -2]}, r"'weights' = \[2, -2\] sums to zero"),
        ("regmean", 2, {"weights": [1, -1]}, r"'weights' = \[1, -1\] sums to zero"),
        ("breadcrumbs", 2, {"gamma": 0.5, "density": 0.6}, r"'gamma' \(0.5\) \+ 'density' \(0.6\) exceed 1"),
        ("breadcrumbs_ties", 2, {"density": [0.2, 0.95]}, r"'gamma' \(0.1\) \+ 'density' \(0.95\) exceed 1"),
        ("task_arithmetic", 2, {"weights": [float("nan"), 1.0]}, r"'weights' = nan is not a finite number"),
        ("task_arithmetic", 2, {"scale": float("inf")}, r"'scale' = inf is not a finite number"),
        ("ties", 2, {"weights": float("-inf")}, r"'weights' = -inf is not a finite number"),
        ("gradient_matching", 2, {"clamp": float("inf")}, r"'clamp' = inf is not a finite number"),
        ("dare_linear", 2, {"weights": ["a", 1]}, r"'weights' must be a finite number, got 'a'"),
    ],
)
def test_meaningless_parameters_are_refused_at_resolve(method: str, n: int, params: dict, message: str) -> None:
    with pytest.raises(DistacError, match=message):
        resolve(method, n, **params)


def test_limits_that_still_make_sense_are_accepted() -> None:
    assert resolve("consensus_ta", 3, k=3)["k"] == 3  # every task must select the weight
    assert resolve("fisher", 2, weights=[0, 1])["weights"] == [0, 1]  # one model's Fisher alone
    assert resolve("breadcrumbs", 2, gamma=0.1, density=0.9)["density"] == 0.9  # the band ends at the row's end
    assert resolve("task_arithmetic", 2, weights=[1, -1])["weights"] == [1, -1]  # no division: a difference


def test_fisher_all_zero_weights_no_longer_return_the_first_model() -> None:
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.ones(4)}, {"w": 2 * torch.ones(4)}]
    fishers = [{"w": torch.ones(4)}, {"w": torch.ones(4)}]
    with pytest.raises(DistacError, match="weights"):
        distac.merge(base, models, "fisher", fishers=fishers, weights=[0, 0])


def test_model_stock_opposite_task_vectors_is_a_distac_error_naming_the_tensor() -> None:
    d = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    m = get_method("model_stock")
    with pytest.raises(DistacError, match=r"model_stock.*tensor 'layer\.weight'.*opposite"):
        m(torch.zeros(2), d, ctx=TensorContext("layer.weight", (2,)))


def test_merge_method_returns_the_record_and_registers_nothing() -> None:
    before = dict(distac.METHODS)

    @merge_method("negate_all", summary="-Σ τ", paper="none", memory="row-chunked")
    def negate_all(base: torch.Tensor, deltas: torch.Tensor, *, ctx: TensorContext) -> torch.Tensor:
        """Negated sum of the task vectors."""
        return -deltas.sum(0)

    assert isinstance(negate_all, Method) and negate_all.name == "negate_all" and negate_all.memory == "row-chunked"
    assert distac.METHODS == before and "negate_all" not in distac.METHODS
    out = negate_all(torch.zeros(2), torch.ones(3, 2), ctx=TensorContext("x", (2,)))
    assert torch.equal(out, torch.full((2,), -3.0))


def test_every_method_states_its_memory() -> None:
    for m in distac.METHODS.values():
        assert m.memory.startswith(("row-chunked", "whole tensor")), m.name
        assert "\n    Memory: " in (m.fn.__doc__ or ""), m.name

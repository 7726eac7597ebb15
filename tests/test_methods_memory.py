"""The memory-saving forms of the whole-tensor methods give the same bits as the plain formulas.

Peak memory itself is measured by ``benchmarks/bench_memory.py`` (one process per method); here the
block sizes are shrunk so that the blocked code paths run on small tensors and are compared, bit for
bit, with the whole-tensor expressions they replace.
"""

from __future__ import annotations

import math

import pytest
import torch

import distac.methods.interpolate as interpolate
import distac.methods.masked as masked
import distac.methods.sparse as sparse
from distac import get_method
from distac.methods import TensorContext

G = torch.Generator().manual_seed(5)


def call(name: str, deltas: torch.Tensor, base: torch.Tensor | None = None, **params) -> torch.Tensor:
    m = get_method(name)
    b = torch.zeros(deltas.shape[1:]) if base is None else base
    return m(b, deltas, ctx=TensorContext("w", tuple(b.shape)), **m.resolve(params, deltas.shape[0]))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", [(37, 11), (9, 4, 6)])
def test_breadcrumbs_in_row_blocks_equals_whole_tensor(method, shape, monkeypatch) -> None:
    d = torch.randn(3, *shape, generator=G)
    params = {"density": [0.3, 0.5, 0.2], "gamma": 0.2, "weights": [1.0, -0.5, 2.0], "scale": 0.7}
    whole = call(method, d, **params)
    row = math.prod(shape[1:])
    monkeypatch.setattr(sparse, "_BLOCK_ELEMS", 3 * row * 4)  # blocks of 4 rows, the last one partial
    blocked = call(method, d, **params)
    assert torch.equal(whole, blocked)
    # and both equal the unblocked composition of the steps
    mask = masked.breadcrumbs_mask(d, density=params["density"], gamma=0.2)
    ref = sparse._combine(mask, weights=params["weights"], elect=method.endswith("ties"), merge_fn="mean", scale=0.7)
    assert torch.equal(whole, ref)


def _slerp_reference(base: torch.Tensor, deltas: torch.Tensor, t: float) -> torch.Tensor:
    """The whole-tensor fp64 formula (three fp64 copies, out-of-place arithmetic)."""
    v0, v1 = base + deltas[0], base + deltas[1]
    n0 = float(torch.linalg.vector_norm(v0.double()))
    n1 = float(torch.linalg.vector_norm(v1.double()))
    dot = float((v0.double() * v1.double()).sum()) / (n0 * n1)
    if abs(dot) > interpolate.DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1 - base
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * v0 + (math.sin(t * omega) / s) * v1 - base


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_in_place_and_blocked_matches_the_whole_tensor_formula(t, monkeypatch) -> None:
    base = torch.randn(50, 30, generator=G)
    deltas = torch.randn(2, 50, 30, generator=G)
    ref = _slerp_reference(base, deltas, t)
    assert torch.equal(call("slerp", deltas, base, t=t), ref)  # one block: the same reductions
    monkeypatch.setattr(interpolate, "_FP64_BLOCK", 7 * 30 + 3)  # several blocks, not row-aligned
    assert torch.equal(call("slerp", deltas, base, t=t), ref)
    n0, n1, dot = interpolate._norms_and_dot(base + deltas[0], base + deltas[1])
    v0, v1 = (base + deltas[0]).double(), (base + deltas[1]).double()
    assert math.isclose(n0, float(v0.norm()), rel_tol=1e-14) and math.isclose(n1, float(v1.norm()), rel_tol=1e-14)
    assert math.isclose(dot, float((v0 * v1).sum()), rel_tol=1e-12)


def test_slerp_does_not_modify_its_inputs() -> None:
    base = torch.randn(8, 3, generator=G)
    deltas = torch.randn(2, 8, 3, generator=G)
    b0, d0 = base.clone(), deltas.clone()
    call("slerp", deltas, base, t=0.4)
    assert torch.equal(base, b0) and torch.equal(deltas, d0)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_spectral_methods_do_not_modify_their_inputs(method) -> None:
    d = torch.randn(3, 12, 7, generator=G)
    d0 = d.clone()
    out = call(method, d, scale=0.5)
    assert torch.equal(d, d0) and out.shape == (12, 7) and torch.isfinite(out).all()


def _regmean_reference(deltas: torch.Tensor, gram: torch.Tensor, din: int, alpha: float) -> torch.Tensor:
    """RegMean with whole fp64 copies and einsum (unit weights), for the bit-for-bit comparison."""
    n = deltas.shape[0]
    tau = deltas.double()
    if din == 1:
        tau = tau.transpose(1, 2)
    g = gram.double()
    gt = torch.ones(n, 1, 1, dtype=torch.float64) * (alpha * g + (1 - alpha) * torch.diag_embed(g.diagonal(0, 1, 2)))
    a, b = gt.sum(0), torch.einsum("nij,njk->ik", gt, tau)
    out = torch.cholesky_solve(b, torch.linalg.cholesky(a))
    return (out.T if din == 1 else out).float()


@pytest.mark.parametrize(("layout", "shape"), [("out_in", (9, 5)), ("in_out", (5, 9)), ("out_in", (6, 6))])
def test_regmean_without_whole_fp64_copies_matches_einsum(layout, shape) -> None:
    d = torch.randn(3, *shape, generator=G)
    din = 1 if layout == "out_in" else 0
    x = torch.randn(3, 20, shape[din], generator=G)
    gram = x.mT @ x
    m = get_method("regmean")
    ctx = TensorContext("w", shape, stats={"gram": gram})
    out = m(torch.zeros(shape), d, ctx=ctx, **m.resolve({"layout": layout, "reduce_nondiag": 0.5}, 3))
    assert torch.equal(out, _regmean_reference(d, gram, din, 0.5))

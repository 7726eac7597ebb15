"""Every data-free merge method on small hand-computed cases, and parameter validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import distac
from distac import DistacError, get_method
from distac.methods import TensorContext
from distac.methods.rng import stream_key, uniform
from distac.methods.sparse import dare


def run(name: str, deltas: Any, base: Any = None, *, ctx: dict | None = None, **params: Any) -> torch.Tensor:
    """Resolve ``params`` like the engine does and call the method on one tensor."""
    d = torch.as_tensor(deltas, dtype=torch.float32)
    b = torch.zeros(d.shape[1:]) if base is None else torch.as_tensor(base, dtype=torch.float32)
    m = get_method(name)
    p = m.resolve(params, d.shape[0])
    return m(b, d, ctx=TensorContext("layer.weight", tuple(b.shape), **(ctx or {})), **p)


def close(a: torch.Tensor, b: Any, tol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# averaging and task arithmetic
# ----------------------------------------------------------------------------------------------
def test_average_and_task_arithmetic() -> None:
    d = [[1.0, -2.0], [3.0, 4.0]]
    assert close(run("average", d), [2.0, 1.0])
    assert close(run("average", d, weights=[3, 1]), [1.5, -0.5])
    assert close(run("task_arithmetic", d, scale=0.5), [2.0, 1.0])
    assert close(run("task_arithmetic", d, weights=[1, -1]), [-2.0, -6.0])
    assert close(run("task_arithmetic", [[1.0, -2.0]], scale=-1.0), [-1.0, 2.0])  # negation
    with pytest.raises(DistacError, match=r"average.*'weights' = \[1, -1\] sums to zero"):
        run("average", d, weights=[1, -1])


# ----------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------
TIES_D = [[3.0, -1.0, 0.5, -2.0, 4.0], [-1.0, 2.0, 0.4, -3.0, -5.0]]
# density 0.6 of 5 -> k = 3, threshold = 2nd smallest |τ| (official rule: |τ| >= the (d-k)-th
# smallest, so k + 1 entries survive when distinct):  τ̂1 = [3, -1, 0, -2, 4],  τ̂2 = [-1, 2, 0, -3, -5]
# Σ τ̂ = [2, 1, 0, -5, -1] -> signs [+, +, +1 (zero-sign fallback), -, -]
# disjoint mean: [3, 2, 0, (-2-3)/2, -5];  disjoint sum: [3, 2, 0, -5, -5]


def test_ties_hand_case_tensor_scope() -> None:
    assert close(run("ties", TIES_D, density=0.6, scope="tensor"), [3.0, 2.0, 0.0, -2.5, -5.0])
    assert close(run("ties", TIES_D, density=0.6, scope="tensor", merge_fn="sum"), [3.0, 2.0, 0.0, -5.0, -5.0])
    assert close(run("ties", TIES_D, density=0.6, scope="tensor", scale=0.5), [1.5, 1.0, 0.0, -1.25, -2.5])
    # per-model density: model 2 keeps |τ| >= its 4th smallest (3): τ̂2 = [0, 0, 0, -3, -5];
    # Σ τ̂ = [3, -1, 0, -5, -1], signs [+, -, +1, -, -]
    assert close(run("ties", TIES_D, density=[0.6, 0.2], scope="tensor"), [3.0, -1.0, 0.0, -2.5, -5.0])


def test_ties_global_scope_reads_engine_thresholds() -> None:
    thr = torch.tensor([2.0, 2.0])
    assert close(run("ties", TIES_D, ctx={"thresholds": thr}), [3.0, 2.0, 0.0, -2.5, -5.0])
    with pytest.raises(DistacError, match="pre-pass"):
        run("ties", TIES_D)  # no thresholds outside the engine


def test_ties_zero_elected_sign_falls_back_to_plus() -> None:
    # coordinate 0 cancels exactly: the elected sign is +1 and the positive entry wins, even when the
    # other coordinates elect - (the official whole-model majority would pick - there; mergekit/peft
    # would give 0). A chunk-local rule would make the result depend on row chunking.
    assert close(run("ties", [[1.0, 2.0, 1.0], [-1.0, 3.0, 1.0]], density=1.0, scope="tensor"), [1.0, 2.5, 1.0])
    assert close(run("ties", [[1.0, -2.0, -1.0], [-1.0, -3.0, -1.0]], density=1.0, scope="tensor"), [1.0, -2.5, -1.0])


def test_ties_through_merge_with_global_threshold() -> None:
    # two tensors, d = 4 per model, density 0.25 -> k = 1, threshold = 3rd smallest |τ| of the model
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    m1 = {"a": torch.tensor([5.0, 4.0]), "b": torch.tensor([0.1, 0.2])}  # global: keeps 5, 4
    m2 = {"a": torch.tensor([0.1, -0.3]), "b": torch.tensor([3.0, -2.0])}  # global: keeps 3, -2
    out = distac.merge(base, [m1, m2], "ties", density=0.25)
    assert close(out["a"], [5.0, 4.0]) and close(out["b"], [3.0, -2.0])
    # per tensor (d = 2, k = 0): each model keeps its largest entry of every tensor
    out = distac.merge(base, [m1, m2], "ties", density=0.25, scope="tensor")
    assert close(out["a"], [5.0, -0.3]) and close(out["b"], [3.0, 0.2])


# ----------------------------------------------------------------------------------------------
# DARE
# ----------------------------------------------------------------------------------------------
def test_dare_mask_is_the_documented_hash() -> None:
    d = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(1))
    ctx = TensorContext("enc.w", (64, 3))
    out = dare(d, density=[0.5, 0.25], seed=7, ctx=ctx)
    for i, p in enumerate([0.5, 0.25]):
        u = uniform(stream_key(7, "enc.w", i), 0, d[i].numel()).reshape(64, 3)
        assert torch.equal(out[i], torch.where(u < p, d[i] / p, torch.zeros(())))
    # the rescale is exact 1/density on the kept entries
    kept = out[0] != 0
    assert torch.equal(out[0][kept], d[0][kept] / 0.5)


def test_dare_linear_and_dare_ties_hand_case() -> None:
    d = torch.tensor([[1.0, -2.0, 3.0, 4.0], [2.0, 2.0, -1.0, 4.0]])
    masked = dare(d, density=0.5, seed=3, ctx=TensorContext("layer.weight", (4,)))
    assert close(run("dare_linear", d, density=0.5, seed=3, scale=0.5), 0.5 * masked.sum(0))
    # dare_ties with no trim = TIES elect + disjoint mean over the DARE'd vectors
    got = run("dare_ties", d, density=0.5, seed=3, trim_density=1.0, scope="tensor")
    want = run("ties", masked, density=1.0, scope="tensor")
    assert close(got, want)


def test_dare_keep_fraction_and_stream_statistics() -> None:
    u = uniform(stream_key(0, "x"), 0, 200_000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.005
    # adjacent counters and adjacent seeds are uncorrelated
    v = uniform(stream_key(1, "x"), 0, 200_000)
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01


# ----------------------------------------------------------------------------------------------
# Breadcrumbs
# ----------------------------------------------------------------------------------------------
def test_breadcrumbs_per_row_middle_band() -> None:
    row0 = [5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.1, -0.2, 0.3, 0.05]
    row1 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, -1.0]
    d = torch.tensor([[row0, row1]])
    # L = 10: drop the top int(1.0) = 1, keep the next int(3.0) = 3, per row
    got = run("breadcrumbs", d, density=0.3, gamma=0.1)
    assert close(got[0], [0, -4.0, 3.0, -2.0, 0, 0, 0, 0, 0, 0])
    assert close(got[1], [0, 0, 0, 0, 0, 0, 0.7, 0.8, 0.9, 0])
    # 1-D: the whole vector is one row; 0-d: untouched
    assert close(run("breadcrumbs", [row0], density=0.3, gamma=0.1), [0, -4.0, 3.0, -2.0, 0, 0, 0, 0, 0, 0])
    assert close(run("breadcrumbs", torch.tensor([2.0, 3.0]), density=0.3, gamma=0.5), 5.0)


def test_breadcrumbs_ties_hand_case() -> None:
    d = [[4.0, 3.0, -2.0, 1.0], [-4.0, -3.0, 2.0, 1.0]]
    # L = 4, gamma 0.25 drops the top 1, density 0.5 keeps the next 2: [0,3,-2,0] and [0,-3,2,0]
    # Σ = [0, 0, 0, 0] -> all zero signs -> +1: picks the positive entries
    assert close(run("breadcrumbs_ties", d, density=0.5, gamma=0.25), [0.0, 3.0, 2.0, 0.0])
    assert close(run("breadcrumbs", d, density=0.5, gamma=0.25, weights=[2, 1]), [0.0, 3.0, -2.0, 0.0])


# ----------------------------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------------------------
CONS_D = [[1.0, 0.1, 0.0], [1.0, 0.0, 0.2], [-0.5, 0.0, 0.0]]
# τ_MTL = [1.5, 0.1, 0.2]; λ = 0.5: m1 = [1, 1, 0], m2 = [1, 0, 1], m3 = [0, 0, 0]; counts [2, 1, 1]


def test_consensus_ta_hand_case() -> None:
    assert close(run("consensus_ta", CONS_D, tall_lambda=0.5, k=2), [1.5, 0.0, 0.0])
    assert close(run("consensus_ta", CONS_D, tall_lambda=0.5, k=1), [1.5, 0.1, 0.2])
    assert close(run("consensus_ta", CONS_D, tall_lambda=0.5, k=1, scale=2.0), [3.0, 0.2, 0.4])
    # per-task λ: λ3 = 0.1 makes m3 = [1, 0, 0] (0.5 > 0.1·2.0): counts [3, 1, 1]
    assert close(run("consensus_ta", CONS_D, tall_lambda=[0.5, 0.5, 0.1], k=3), [1.5, 0.0, 0.0])


def test_consensus_ties_hand_case() -> None:
    # TIES with no trim and disjoint SUM: τ_MTL = [2.0, 0.1, 0.2] (the -0.5 disagrees)
    # masks against the untrimmed τ_t: m1 = [1, 1, 0], m2 = [1, 0, 1], m3 = [0, 0, 0]
    got = run("consensus_ties", CONS_D, tall_lambda=0.5, k=2, density=1.0, scope="tensor")
    assert close(got, [2.0, 0.0, 0.0])
    got = run("consensus_ties", CONS_D, tall_lambda=0.5, k=1, density=1.0, scope="tensor")
    assert close(got, [2.0, 0.1, 0.2])


# ----------------------------------------------------------------------------------------------
# spectral
# ----------------------------------------------------------------------------------------------
def test_tsv_m_hand_case() -> None:
    t1 = torch.diag(torch.tensor([3.0, 1.0]))
    t2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # r = 2, T = 2 -> k = 1: task 1 contributes (3, e1, e1), task 2 (2, e2, e2); U, V already orthogonal
    assert close(run("tsv_m", torch.stack([t1, t2])), torch.diag(torch.tensor([3.0, 2.0])), 1e-5)
    assert close(run("tsv_m", torch.stack([t1, t2]), scale=0.5), torch.diag(torch.tensor([1.5, 1.0])), 1e-5)
    # non-2-D tensors: mean, scaled
    assert close(run("tsv_m", [[1.0, 2.0], [3.0, 4.0]], scale=2.0), [4.0, 6.0])
    # r < T: k = 0 and the matrix vanishes, as in the official code
    assert close(run("tsv_m", torch.ones(3, 2, 2)), torch.zeros(2, 2))


def test_tsv_m_polar_of_non_orthogonal_blocks() -> None:
    # task 1 = 3·e1 e1ᵀ, task 2 = 2·u uᵀ with u at 45°: U = V = [e1, u] is orthogonalised by its polar factor
    u = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    e1 = torch.tensor([1.0, 0.0])
    d = torch.stack([3 * torch.outer(e1, e1), 2 * torch.outer(u, u)])
    a = torch.stack([e1, u], dim=1)
    p, _, qh = torch.linalg.svd(a)
    w = p @ qh  # polar factor, by definition
    want = w @ torch.diag(torch.tensor([3.0, 2.0])) @ w.T
    got = run("tsv_m", d)
    assert close(got, want, 1e-5)
    assert close(w.T @ w, torch.eye(2), 1e-6)
    # the polar factor's columns are e1 and u rotated apart symmetrically: at -22.5° and 67.5°
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    assert close(w, [[c, s], [-s, c]], 1e-5)


def test_tsv_m_lowrank_matches_exact_on_low_rank_tasks() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.stack([torch.randn(40, 10, generator=g) @ torch.randn(10, 30, generator=g) for _ in range(3)])
    # r = 30, T = 3 -> k = 10 = each task's rank: the randomized top-k SVD is exact up to round-off
    state = torch.get_rng_state()
    low = run("tsv_m", d, svd="lowrank")
    assert close(low, run("tsv_m", d), 1e-4)
    # reproducible, and the caller's RNG is untouched
    assert torch.equal(run("tsv_m", d, svd="lowrank"), low) and torch.equal(torch.get_rng_state(), state)


def test_iso_c_hand_case() -> None:
    d = torch.stack([torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2)])
    # Σ τ = diag(4, 2): σ̄ = 3, U Vᵀ = I
    assert close(run("iso_c", d), 3 * torch.eye(2), 1e-5)
    assert close(run("iso_c", d, scale=0.5), 1.5 * torch.eye(2), 1e-5)
    assert close(run("iso_c", [[1.0, 2.0], [3.0, 6.0]]), [2.0, 4.0])


def test_iso_cts_hand_case() -> None:
    t1 = torch.diag(torch.tensor([4.0, 0.0, 1.0, 0.0]))
    t2 = torch.diag(torch.tensor([4.0, 3.0, 0.0, 2.0]))
    # r = 4, f = 0.5: k_c = 2, one direction per task. Σ = diag(8, 3, 1, 2) -> common e1 (8), e2 (3);
    # task parts after removing span(e1, e2): e3 (σ 1) and e4 (σ 2). σ̄ = (1+2+8+3)/4 = 3.5
    got = run("iso_cts", torch.stack([t1, t2]), common_space_fraction=0.5)
    assert close(got, 3.5 * torch.eye(4), 1e-5)
    assert close(run("iso_cts", [[1.0], [3.0]], scale=3.0), [6.0])


def test_iso_cts_without_task_budget_is_iso_c() -> None:
    # r = 4, f = 0.8: k_c = 3, budget round(1/2)·2 = 0 (banker's rounding, as the official code) -> Iso-C
    d = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
    assert close(run("iso_cts", d), run("iso_c", d), 1e-5)


def test_iso_cts_rounding_past_rank_is_guarded() -> None:
    # r = 7, T = 2, f = 0: the official round(3.5)·2 = 8 > 7 would give k_c = -1; distac uses 6
    d = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(4))
    out = run("iso_cts", d, common_space_fraction=0.0)
    assert out.shape == (7, 7) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------
def test_slerp_hand_case() -> None:
    base = torch.tensor([1.0, 1.0])
    d = torch.tensor([[0.0, -1.0], [-1.0, 0.0]])  # θ1 = e1, θ2 = e2
    h = math.sqrt(0.5)
    assert close(base + run("slerp", d, base), [h, h])
    # t = 1/3 of the 90° arc: the result is at 30°
    assert close(base + run("slerp", d, base, t=1 / 3), [math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_model_stock_hand_case() -> None:
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert close(run("model_stock", d), t * d.mean(0))
    # N = 3: mean of the pairwise cosines (mergekit); here cos = (0 + 0 + 0.5·...) computed by hand
    d3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    cos = (0.0 + c + c) / 3
    t3 = 3 * cos / (1 + 2 * cos)
    assert close(run("model_stock", d3), t3 * d3.mean(0))
    with pytest.raises(DistacError, match=r"layer\.weight.*not finite"):
        run("model_stock", torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # cos = -1 = -1/(N-1)
    # single-element tensors have no angle: plain average
    assert close(run("model_stock", torch.tensor([2.0, -1.0])), 0.5)


# ----------------------------------------------------------------------------------------------
# parameter validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(bad: float) -> None:
    for name in ("ties", "dare_linear", "breadcrumbs", "consensus_ties"):
        with pytest.raises(DistacError, match="density"):
            get_method(name).resolve({"density": bad}, 2)


def test_parameter_errors_name_the_culprit_and_suggest() -> None:
    with pytest.raises(DistacError, match=r"scope.*did you mean: global"):
        get_method("ties").resolve({"scope": "globl"}, 2)
    with pytest.raises(DistacError, match=r"merge_fn.*did you mean: mean"):
        get_method("ties").resolve({"merge_fn": "meen"}, 2)
    with pytest.raises(DistacError, match=r"'desnity'.*did you mean: density"):
        get_method("dare_ties").resolve({"desnity": 0.5}, 2)
    with pytest.raises(DistacError, match="3 values but there are 2 models"):
        get_method("ties").resolve({"density": [0.1, 0.2, 0.3]}, 2)
    with pytest.raises(DistacError, match="exactly 2"):
        get_method("slerp").resolve({}, 3)
    with pytest.raises(DistacError, match="at least 2"):
        get_method("model_stock").resolve({}, 1)
    with pytest.raises(DistacError, match="svd"):
        get_method("tsv_m").resolve({"svd": "fast"}, 2)
    with pytest.raises(DistacError, match="gamma"):
        get_method("breadcrumbs").resolve({"gamma": 1.0}, 2)
    with pytest.raises(DistacError, match="tall_lambda"):
        get_method("consensus_ta").resolve({"tall_lambda": [0.2, -1.0]}, 2)
    with pytest.raises(DistacError, match="common_space_fraction"):
        get_method("iso_cts").resolve({"common_space_fraction": 1.2}, 2)
    with pytest.raises(DistacError, match="t"):
        get_method("slerp").resolve({"t": 1.5}, 2)


def test_every_method_is_documented() -> None:
    for m in distac.METHODS.values():
        assert m.summary and m.paper, m.name
        assert m.fn.__doc__ and len(m.fn.__doc__) > 80, m.name


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_per_tensor_ties_in_row_blocks_equals_whole_tensor(method, monkeypatch):
    """scope='tensor' computes thresholds on the whole tensor, then merges it in row blocks to bound memory."""
    import distac.methods.sparse as sparse

    g = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(37, 5, generator=g)}
    models = [{"w": base["w"] + torch.randn(37, 5, generator=g)} for _ in range(3)]
    params: dict[str, Any] = {"scope": "tensor", "weights": [1.0, -0.5, 2.0]}
    if method == "dare_ties":
        params["trim_density"] = 0.3
    whole = distac.merge(base, models, method, device="cpu", **params)
    monkeypatch.setattr(sparse, "_BLOCK_ELEMS", 3 * 5 * 4)  # blocks of 4 rows, the last one partial
    blocked = distac.merge(base, models, method, device="cpu", **params)
    assert torch.equal(whole["w"], blocked["w"])

"""Degenerate-case invariants of every method, exactness of global scope, and DARE's determinism."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import distac
import distac.methods.rng as R
from distac import DistacError, get_method
from distac.merging.kth import magnitude_threshold
from distac.methods import TensorContext
from distac.methods.rng import hash32, stream_key, uniform
from distac.methods.sparse import dare, disjoint_merge, elect_sign, trim_magnitude

G = torch.Generator().manual_seed(1234)
SHAPES = {"emb": (12, 8), "l1.weight": (8, 8), "l1.bias": (8,), "ln.weight": (8,), "head": (3, 8)}


def make_models(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base["steps"] = torch.tensor(7)  # an int buffer: copied, never merged
    models = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in base.items()
        }
        for _ in range(n)
    ]
    return base, models


def deltas_of(base: dict, models: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([m[k] - base[k] for m in models]) for k in SHAPES}


def call(name: str, d: torch.Tensor, *, name_: str = "w", **params: Any) -> torch.Tensor:
    m = get_method(name)
    p = m.resolve(params, d.shape[0])
    return m(torch.zeros(d.shape[1:]), d, ctx=TensorContext(name_, tuple(d.shape[1:])), **p)


def merged_delta(base: dict, out: dict) -> dict[str, torch.Tensor]:
    return {k: out[k] - base[k] for k in SHAPES}


def assert_close(a: dict | torch.Tensor, b: dict | torch.Tensor, tol: float = 1e-5) -> None:
    if isinstance(a, dict):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)
    else:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# brute-force references over the flattened model (what the official code does)
# ----------------------------------------------------------------------------------------------
def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(d[k].shape[0], -1) for k in sorted(d)], dim=1)


def unflat(x: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k][0].numel()
        out[k] = x[i : i + n].reshape(like[k].shape[1:])
        i += n
    return out


def ref_trim(x: torch.Tensor, densities: list[float]) -> torch.Tensor:
    """Official ``topk_values_mask`` per model row: keep |x| >= kthvalue(|x|, d - int(d·density))."""
    out = x.clone()
    d = x.shape[1]
    for i, dens in enumerate(densities):
        r = d - int(d * dens)
        if r > 0:
            out[i] *= x[i].abs() >= torch.kthvalue(x[i].abs(), r).values
    return out


def ref_ties_merge(x: torch.Tensor, merge_fn: str = "mean") -> torch.Tensor:
    sign = torch.sign(x.sum(0))
    sign[sign == 0] = 1  # distac's documented zero-sign fallback (official: whole-model majority)
    agree = torch.where(sign > 0, x > 0, x < 0)
    total = (x * agree).sum(0)
    return total if merge_fn == "sum" else total / agree.sum(0).clamp(min=1)


# ----------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.2, [0.1, 0.5, 0.3]])
@pytest.mark.parametrize("merge_fn", ["mean", "sum"])
def test_ties_global_scope_equals_brute_force(density: Any, merge_fn: str) -> None:
    base, models = make_models(3)
    dens = density if isinstance(density, list) else [density] * 3
    d = deltas_of(base, models)
    want = unflat(0.7 * ref_ties_merge(ref_trim(flat(d), dens), merge_fn), d)
    out = distac.merge(base, models, "ties", density=density, merge_fn=merge_fn, scale=0.7)
    assert_close(merged_delta(base, out), want)
    assert torch.equal(out["steps"], base["steps"])


def test_ties_tensor_scope_equals_per_tensor_brute_force() -> None:
    base, models = make_models(3)
    d = deltas_of(base, models)
    out = distac.merge(base, models, "ties", density=0.3, scope="tensor")
    want = {k: ref_ties_merge(ref_trim(v.reshape(3, -1), [0.3] * 3)).reshape(v.shape[1:]) for k, v in d.items()}
    assert_close(merged_delta(base, out), want)


def test_ties_density_one_single_task_returns_tau() -> None:
    base, models = make_models(1)
    for scope in ("global", "tensor"):
        out = distac.merge(base, models, "ties", density=1.0, scope=scope)
        assert_close(out, models[0], 1e-6)


def test_ties_global_scope_is_chunk_invariant() -> None:
    # integer-valued task vectors cancel exactly in many places, so this also checks that the
    # zero-sign fallback is local (a majority over the piece at hand fails on several of these draws)
    g = torch.Generator().manual_seed(1234)
    thr = torch.tensor([1.0, 0.5, 2.0])
    m = get_method("ties")
    # per-tensor scope is chunkable too: the engine hands split tensors their thresholds
    assert m.is_chunkable(m.resolve({}, 3)) and m.is_chunkable(m.resolve({"scope": "tensor"}, 3))
    p = m.resolve({"merge_fn": "mean"}, 3)
    for _ in range(10):
        d = torch.randint(-2, 3, (3, 10, 6), generator=g).float()
        whole = m(torch.zeros(10, 6), d, ctx=TensorContext("w", (10, 6), 0, thr), **p)
        parts = [
            m(torch.zeros(r.shape[1:]), r, ctx=TensorContext("w", (10, 6), 6 * a, thr), **p)
            for a, r in ((0, d[:, :4]), (4, d[:, 4:]))
        ]
        assert torch.equal(whole, torch.cat(parts))


def test_ties_tensor_scope_chunks_take_the_tensor_thresholds() -> None:
    """Row chunks of a per-tensor TIES merge, given the whole tensor's thresholds, equal the whole merge;
    a chunk without them is refused rather than trimmed by its own (wrong) quantile."""
    g = torch.Generator().manual_seed(99)
    m = get_method("ties")
    p = m.resolve({"scope": "tensor", "density": [0.3, 0.5, 0.2]}, 3)
    d = torch.randn(3, 10, 6, generator=g)
    thr = torch.tensor([magnitude_threshold(d[i], q) for i, q in enumerate([0.3, 0.5, 0.2])])
    whole = m(torch.zeros(10, 6), d, ctx=TensorContext("w", (10, 6)), **p)
    parts = [
        m(torch.zeros(r.shape[1:]), r, ctx=TensorContext("w", (10, 6), 6 * a, thr), **p)
        for a, r in ((0, d[:, :4]), (4, d[:, 4:]))
    ]
    assert torch.equal(whole, torch.cat(parts))
    with pytest.raises(DistacError, match="row chunk without the tensor's thresholds"):
        m(torch.zeros(4, 6), d[:, :4], ctx=TensorContext("w", (10, 6)), **p)


def _where_trim(d: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() >= thr.reshape(-1, *([1] * (d.dim() - 1))), d, torch.zeros(()))


def _where_disjoint(x: torch.Tensor, sign: torch.Tensor, merge_fn: str) -> torch.Tensor:
    agree = torch.where(sign > 0, x > 0, x < 0)
    total = torch.where(agree, x, torch.zeros(())).sum(0)
    return total if merge_fn == "sum" else total / agree.sum(0, dtype=x.dtype).clamp(min=1)


def test_ties_steps_equal_their_torch_where_forms_bit_for_bit() -> None:
    """trim / elect / disjoint merge avoid torch.where (slow on the CPU); same bits, signed zeros included."""
    g = torch.Generator().manual_seed(5)
    same = lambda a, b: torch.equal(a.view(torch.int32), b.view(torch.int32))  # noqa: E731
    for trial in range(60):
        n = 1 + trial % 4
        d = torch.randint(-2, 3, (n, 5, 7), generator=g).float() if trial % 2 else torch.randn(n, 5, 7, generator=g)
        d[torch.rand(d.shape, generator=g) < 0.15] = -0.0
        picks = [float("-inf"), 0.0, -0.0, 0.5, 1.0, 2.0, 1e-45]
        thr = torch.tensor([picks[int(i)] for i in torch.randint(0, len(picks), (n,), generator=g)])
        t = trim_magnitude(d, thr)
        assert same(t, _where_trim(d, thr)), trial
        x = (torch.rand(n, 1, 1, generator=g) * 2 - 0.5) * t
        s = torch.sign(x.sum(0))
        assert same(elect_sign(x), torch.where(s == 0, torch.ones(()), s)), trial
        for fn in ("sum", "mean"):
            for sign in (elect_sign(x), torch.randint(-1, 2, x.shape[1:], generator=g).float()):
                assert same(disjoint_merge(x, sign, fn), _where_disjoint(x, sign, fn)), (trial, fn)


def test_ties_weights_scale_and_negate() -> None:
    d = torch.randn(3, 40, generator=G)
    one = call("ties", d, density=0.5, scope="tensor", merge_fn="sum")
    assert_close(call("ties", d, density=0.5, scope="tensor", merge_fn="sum", weights=2.5), 2.5 * one)
    assert_close(
        call("ties", d, density=0.5, scope="tensor", weights=-1.0), -call("ties", d, density=0.5, scope="tensor")
    )
    # a zero weight removes a model entirely (it cannot vote in the sign election)
    assert_close(
        call("ties", d, density=0.5, scope="tensor", weights=[1, 1, 0]),
        call("ties", d[:2], density=0.5, scope="tensor"),
    )


# ----------------------------------------------------------------------------------------------
# task arithmetic family: weights are linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {}),
        ("dare_linear", {"density": 0.6, "seed": 4}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ],
)
def test_weights_are_linear(method: str, params: dict) -> None:
    d = torch.randn(3, 7, 9, generator=G)
    a, b = [1.0, -2.0, 0.5], [0.5, 1.0, -3.0]
    fa = call(method, d, weights=a, **params)
    fb = call(method, d, weights=b, **params)
    fab = call(method, d, weights=[x + y for x, y in zip(a, b, strict=True)], **params)
    assert_close(fa + fb, fab)
    assert_close(call(method, d, weights=[-x for x in a], **params), -fa)


def test_consensus_weights_scale_the_result() -> None:
    d = torch.randn(3, 50, generator=G)
    # multiplying every τ_t by c > 0 scales τ_MTL by c and leaves every TALL mask unchanged
    assert_close(call("consensus_ta", d, weights=3.0), 3 * call("consensus_ta", d))


# ----------------------------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------------------------
def test_consensus_k0_is_ta_and_k_above_T_is_refused() -> None:
    base, models = make_models(3)
    ta = distac.merge(base, models, "task_arithmetic", scale=0.4)
    assert_close(distac.merge(base, models, "consensus_ta", k=0, scale=0.4), ta)
    ties_sum = distac.merge(base, models, "ties", density=0.2, merge_fn="sum", scale=0.4)
    assert_close(distac.merge(base, models, "consensus_ties", k=0, scale=0.4), ties_sum)
    # k = T keeps the weights every task selects; k > T would silently return the base model
    assert not torch.equal(distac.merge(base, models, "consensus_ta", k=3)["emb"], base["emb"])
    for method in ("consensus_ta", "consensus_ties"):
        with pytest.raises(DistacError, match=r"'k' = 4 is larger than the number of models \(3\)"):
            distac.merge(base, models, method, k=4)


def test_consensus_ties_global_equals_brute_force() -> None:
    base, models = make_models(3, seed=5)
    d = deltas_of(base, models)
    x = flat(d)
    mtl = ref_ties_merge(ref_trim(x, [0.2] * 3), "sum")
    tall = x.abs() > 0.3 * (mtl - x).abs()
    want = unflat(torch.where(tall.sum(0) >= 2, mtl, 0.0), d)
    out = distac.merge(base, models, "consensus_ties", tall_lambda=0.3)
    assert_close(merged_delta(base, out), want)


# ----------------------------------------------------------------------------------------------
# DARE and its counter-based randomness
# ----------------------------------------------------------------------------------------------
def test_dare_density_one_is_identity() -> None:
    base, models = make_models(3)
    ta = distac.merge(base, models, "task_arithmetic", scale=0.5)
    for k, v in distac.merge(base, models, "dare_linear", density=1.0, scale=0.5).items():
        assert torch.equal(v, ta[k]), k
    ties = distac.merge(base, models, "ties", density=0.3)
    for k, v in distac.merge(base, models, "dare_ties", density=1.0, trim_density=0.3).items():
        assert torch.equal(v, ties[k]), k


def test_dare_mean_over_seeds_approaches_ta() -> None:
    d = torch.randn(2, 300, generator=G)
    ta = d.sum(0)
    n = 400
    mean = sum(call("dare_linear", d, density=0.5, seed=s) for s in range(n)) / n
    # each entry's estimate has std |τ1|+|τ2| scale / sqrt(n) ≈ 0.07; the average error is far smaller
    err = (mean - ta).abs().mean() / ta.abs().mean()
    single = (call("dare_linear", d, density=0.5, seed=0) - ta).abs().mean() / ta.abs().mean()
    assert err < 0.08 and err < single / 10


def test_dare_is_invariant_to_chunking() -> None:
    d = torch.randn(2, 9, 5, generator=G)
    whole = dare(d, density=0.5, seed=3, ctx=TensorContext("w", (9, 5)))
    bounds = [0, 2, 3, 7, 9]
    parts = [
        dare(d[:, a:b], density=0.5, seed=3, ctx=TensorContext("w", (9, 5), offset=a * 5))
        for a, b in itertools.pairwise(bounds)
    ]
    assert torch.equal(whole, torch.cat(parts, dim=1))
    for method in ("dare_linear", "dare_ties"):
        m = get_method(method)
        p = m.resolve({"density": 0.5, "scope": "global"} if method == "dare_ties" else {"density": 0.5}, 2)
        assert m.is_chunkable(p)


def test_dare_does_not_depend_on_order_or_other_models() -> None:
    base, models = make_models(3)
    # per-model seed lists follow the models when they are permuted
    perm = [2, 0, 1]
    a = distac.merge(base, models, "dare_linear", density=0.5, seed=[10, 11, 12])
    b = distac.merge(base, [models[i] for i in perm], "dare_linear", density=0.5, seed=[[10, 11, 12][i] for i in perm])
    assert_close(a, b, 1e-6)
    # tensor order does not matter (no shared RNG state)
    rev = {k: base[k] for k in reversed(list(base))}
    c = distac.merge(rev, [{k: m[k] for k in rev} for m in models], "dare_linear", density=0.5, seed=[10, 11, 12])
    for k in a:
        assert torch.equal(a[k], c[k]), k
    # a model's DARE'd vector is the same whatever other models are merged with it
    d = torch.randn(3, 20, generator=G)
    ctx = TensorContext("w", (20,))
    assert torch.equal(dare(d, density=0.3, seed=1, ctx=ctx)[:2], dare(d[:2], density=0.3, seed=1, ctx=ctx))
    # ... and different tensor names and seeds give different masks
    m1 = dare(torch.ones(1, 4000), density=0.5, seed=1, ctx=TensorContext("a", (4000,))) != 0
    m2 = dare(torch.ones(1, 4000), density=0.5, seed=1, ctx=TensorContext("b", (4000,))) != 0
    m3 = dare(torch.ones(1, 4000), density=0.5, seed=2, ctx=TensorContext("a", (4000,))) != 0
    assert 0.4 < float((m1 == m2).float().mean()) < 0.6 and 0.4 < float((m1 == m3).float().mean()) < 0.6


def test_dare_ties_global_threshold_is_computed_on_dared_deltas() -> None:
    base, models = make_models(3, seed=2)
    d = deltas_of(base, models)
    dared = {k: dare(v, density=0.6, seed=9, ctx=TensorContext(k, tuple(v.shape[1:]))) for k, v in d.items()}
    want = unflat(ref_ties_merge(ref_trim(flat(dared), [0.25] * 3)), d)
    out = distac.merge(base, models, "dare_ties", density=0.6, trim_density=0.25, seed=9)
    assert_close(merged_delta(base, out), want)


def _lowbias32_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_matches_python_reference_without_overflow() -> None:
    key = stream_key(0, "enc.layer.0.weight", 1)
    counters = [0, 1, 2, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 12345, 2**62 + 7]
    got = hash32(key, torch.tensor(counters, dtype=torch.int64)).tolist()
    want = [_lowbias32_ref(_lowbias32_ref((c & 0xFFFFFFFF) ^ key[0]) ^ (c >> 32) ^ key[1]) for c in counters]
    assert got == want
    # an offset window is the same numbers as the corresponding slice
    assert torch.equal(uniform(key, 10, 5), uniform(key, 0, 15)[10:])
    # the key is stable across processes (blake2b, not the salted hash())
    assert stream_key(0, "w") == stream_key(0, "w") and stream_key(0, "w") != stream_key(0, "w", 0)


@pytest.mark.parametrize("offset", [0, 2**32 - 70_000, 2**40 + 3])
def test_in_place_uniform_is_the_reference_hash(offset: int) -> None:
    """uniform() computes hash32 in groups of aligned rows: same bits, across groups and past 2**32."""
    key = stream_key(3, "emb.weight", 2)
    n = 140_000  # > one CPU group of 2**17 counters; the middle offset straddles 2**32
    want = (hash32(key, torch.arange(offset, offset + n, dtype=torch.int64)) >> 8).to(torch.float32) / 2**24
    assert torch.equal(uniform(key, offset, n), want)


@pytest.mark.parametrize("offset", [0, 5, 2**14 - 3, 2**32 - 70_000, 2**40 + 3])
def test_int32_path_is_the_reference_hash(offset: int) -> None:
    """The torch int32 path (used on CUDA) gives hash32's bits; run here on the CPU, small and large groups."""
    key = stream_key(3, "emb.weight", 2)
    n = 100_003
    want = hash32(key, torch.arange(offset, offset + n, dtype=torch.int64))
    for group in (1, 3, 1024):
        got = torch.cat([h.clone() for h, _ in R._hash_torch(key, offset, n, torch.device("cpu"), group)])
        assert torch.equal(got.long() & 0xFFFFFFFF, want), group
    assert R._int32_wraps(torch.device("cpu"))
    # the int64 fallback for a device whose int32 multiply would not wrap
    assert torch.equal(R._uniform_int64(key, offset, n, torch.device("cpu")), uniform(key, offset, n))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1e-3, 1 - 2**-25, 0.5 + 2**-30, 0.5 - 2**-30, 1.0, 1e-45])
def test_keep_mask_and_keep_where_equal_the_uniform_comparison(density: float) -> None:
    key = stream_key(0, "layers.0.mlp.weight", 1)
    offset, n = 2**32 - 40_000, 90_001
    u = uniform(key, offset, n)
    keep = u < density
    assert torch.equal(R.keep_mask(key, offset, n, density), keep)
    x = torch.randn(n, generator=G)
    x[:7] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0])
    want = torch.where(keep, x, torch.zeros(()))
    got = R.keep_where(key, offset, density, x)
    # bit for bit, signed zeros included
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # the non-fp32 fallback is the same
    assert torch.equal(R.keep_where(key, offset, density, x.double()), want.double())


def test_keep_threshold_is_the_fp32_comparison_at_the_boundary() -> None:
    """m / 2**24 < density (as torch compares: density rounded to fp32) ⇔ m < keep_threshold(density)."""
    for density in (0.2, 0.3, 0.5 + 2**-30, 0.5 - 2**-30, 2**-24, 3 * 2**-25, 0.999999):
        t = R.keep_threshold(density)
        m = torch.tensor([t - 2, t - 1, t, t + 1], dtype=torch.float32) / 2**24
        assert (m < density).tolist() == [True, True, False, False], density


def test_keep_mask_rate_and_independence() -> None:
    """Empirical keep rate within 4 sigma, and no correlation between neighbouring entries or models."""
    n = 1_000_000
    for density in (0.1, 0.2, 0.5, 0.9):
        a = R.keep_mask(stream_key(0, "w", 0), 12_345, n, density).float()
        b = R.keep_mask(stream_key(0, "w", 1), 12_345, n, density).float()
        sigma = (density * (1 - density) / n) ** 0.5
        assert abs(float(a.mean()) - density) < 4 * sigma
        for lag in (1, 2, 1536, 2**14):  # neighbours, a row of the benchmark matrices, a hash row
            assert abs(float(torch.corrcoef(torch.stack([a[:-lag], a[lag:]]))[0, 1])) < 0.005, lag
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dare_same_on_cuda_and_cpu() -> None:
    d = torch.randn(2, 1000, 3, generator=G)
    ctx = TensorContext("w", (1000, 3), offset=2**33)
    cpu = dare(d, density=0.3, seed=5, ctx=ctx)
    assert torch.equal(dare(d.cuda(), density=0.3, seed=5, ctx=ctx).cpu(), cpu)


# ----------------------------------------------------------------------------------------------
# spectral
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (7,)])
def test_tsv_m_single_task_returns_tau(shape: tuple[int, ...]) -> None:
    d = torch.randn(1, *shape, generator=G)
    assert_close(call("tsv_m", d), d[0])
    if len(shape) == 2:
        assert_close(call("tsv_m", d, svd="lowrank"), d[0], 1e-4)


def test_iso_c_on_equal_singular_values_returns_sum() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=G))
    d = torch.stack([2 * q[:, :4], q[:, :4]])  # Σ τ = 3·Q[:, :4]: all singular values equal 3
    assert_close(call("iso_c", d), d.sum(0))


def test_spectral_methods_are_not_chunkable_and_average_vectors() -> None:
    d = torch.randn(3, 5, generator=G)
    for name in ("tsv_m", "iso_c", "iso_cts"):
        assert not get_method(name).is_chunkable({})
        assert_close(call(name, d, scale=2.0), 2 * d.mean(0))


# ----------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------
def test_slerp_endpoints_and_collinear_fallback() -> None:
    base, models = make_models(2)
    assert_close(distac.merge(base, models, "slerp", t=0.0), models[0], 1e-6)
    assert_close(distac.merge(base, models, "slerp", t=1.0), models[1], 1e-6)
    # collinear (θ2 = 2·θ1) and antiparallel (θ2 = -θ1) inputs fall back to LERP
    b = {"w": torch.zeros(4)}
    v = torch.tensor([1.0, 2.0, -1.0, 0.5])
    for other in (2 * v, -v):
        out = distac.merge(b, [{"w": v}, {"w": other}], "slerp", t=0.3)
        assert_close(out["w"], 0.7 * v + 0.3 * other)
    # the SLERP result keeps the norm of equal-norm endpoints (LERP would shrink it)
    out = distac.merge(b, [{"w": torch.tensor([1.0, 0, 0, 0])}, {"w": torch.tensor([0, 1.0, 0, 0])}], "slerp", t=0.3)
    assert abs(float(out["w"].norm()) - 1.0) < 1e-6


def test_model_stock_identical_models_and_orthogonal_pair() -> None:
    d = torch.randn(1, 30, generator=G).expand(3, 30).contiguous()
    assert_close(call("model_stock", d), d[0])  # cos = 1 -> t = 1 -> the average = τ
    e = torch.eye(2)
    assert_close(call("model_stock", e), torch.zeros(2))  # cos = 0 -> t = 0 -> θ0


def test_every_data_free_method_handles_every_tensor_rank() -> None:
    g = torch.Generator().manual_seed(9)
    shapes = {"scale": (), "bias": (5,), "w": (6, 4), "conv": (3, 2, 2, 2)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    for name, m in distac.METHODS.items():
        if any(s.rstrip("?") in ("fisher", "gram") and not s.endswith("?") for s in m.stats):
            continue  # curvature methods need statistics; tested in test_curvature.py
        out = distac.merge(base, models[: m.max_models or 2], name)  # passthrough takes one model
        for k, v in out.items():
            assert v.shape == base[k].shape and torch.isfinite(v).all(), (name, k)

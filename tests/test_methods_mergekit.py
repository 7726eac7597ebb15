"""mergekit's methods that distac adds: della, della_linear, nuslerp, multislerp, karcher, passthrough.

Exact invariants that tie each one to a method distac already had (or to itself under a symmetry),
the streamed engine against the in-memory one, and, where ``mergekit`` is importable, a numerical
comparison with mergekit's own implementations (DELLA replays distac's Bernoulli draws inside
mergekit, so the comparison is exact, not statistical). The main environment has no mergekit;
run the comparison (``tests/mergekit_reference.py``) with mergekit's environment and print the
differences::

    PYTHONPATH=src:tests /work/mk-venv/bin/python tests/mergekit_reference.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit_reference import StateDict, states
from torch.testing import assert_close

import distac
from distac import DistacError, get_method
from distac.methods import TensorContext


def call(name: str, base: torch.Tensor, deltas: torch.Tensor, **params: Any) -> torch.Tensor:
    m = get_method(name)
    resolved = m.resolve(params, deltas.shape[0])
    return m(base, deltas, ctx=TensorContext("t", tuple(base.shape)), **resolved)


def deltas_of(base: StateDict, models: list[StateDict], k: str) -> torch.Tensor:
    return torch.stack([m[k] - base[k] for m in models])


# ----------------------------------------------------------------------------------------------
# DELLA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("merge_fn", ["mean", "sum", "weighted_mean"])
def test_della_without_pruning_is_ties_without_trim(merge_fn: str) -> None:
    base, models = states(3)
    params = {"merge_fn": merge_fn, "weights": [1.0, 0.5, 2.0], "scale": 0.7}
    della = distac.merge(base, models, "della", density=1.0, **params)
    ties = distac.merge(base, models, "ties", density=1.0, scope="tensor", **params)
    for k in base:
        assert torch.equal(della[k], ties[k]), k


def test_della_linear_without_pruning_is_task_arithmetic() -> None:
    base, models = states(3)
    params = {"weights": [1.0, -0.5, 2.0], "scale": 0.7}
    got = distac.merge(base, models, "della_linear", **params)
    want = distac.merge(base, models, "task_arithmetic", **params)
    for k in base:
        assert torch.equal(got[k], want[k]), k


def test_della_weighted_mean_equals_mean_for_unit_weights_and_divides_by_agreeing_weights() -> None:
    d = torch.tensor([[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]])
    z = torch.zeros(3)
    assert torch.equal(call("della", z, d, merge_fn="weighted_mean"), call("della", z, d, merge_fn="mean"))
    # weights 1 and 3: column 0 agrees (1 + 9) / 4; column 1: sum = 2 - 6 < 0, only model 2 agrees: -6 / 3;
    # column 2: both negative: (-1 - 3) / 4
    got = call("della", z, d, weights=[1.0, 3.0])
    assert_close(got, torch.tensor([10 / 4, -6 / 3, -4 / 4]))
    lin = call("della_linear", z, d, weights=[1.0, 3.0], merge_fn="weighted_mean")
    assert_close(lin, (d[0] + 3 * d[1]) / 4)


def test_della_linear_with_epsilon_zero_keeps_exactly_dares_entries() -> None:
    """ε = 0 makes every keep probability the density: the same draws as DARE, so the same entries."""
    base, models = states(1, seed=3)
    for density in (0.3, 0.8):
        della = distac.merge(base, models, "della_linear", density=density, epsilon=0.0, rescale=False, seed=5)
        dare = distac.merge(base, models, "dare_linear", density=density, seed=5)
        for k in base:
            d_della, d_dare = della[k] - base[k], dare[k] - base[k]
            assert torch.equal(d_della != 0, d_dare != 0), k
        tau = deltas_of(base, models, "w")
        got = call("della_linear", base["w"], tau, density=density, epsilon=0.0, rescale=False, seed=5)
        want = call("dare_linear", base["w"], tau, density=density, seed=5)
        assert torch.equal(got / density, want)


def test_magprune_keeps_the_density_and_favours_large_magnitudes() -> None:
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(1, 64, 2000, generator=g)
    kept = call("della_linear", torch.zeros(64, 2000), tau, density=0.5, epsilon=0.3, rescale=False) != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    order = tau[0].abs().argsort(dim=1)
    ranked = kept.gather(1, order).float()  # columns by ascending |τ| in each row
    # p runs linearly from 0.2 (smallest) to 0.8 (largest): the fifths keep ~0.26, 0.38, 0.5, 0.62, 0.74
    fifths = ranked.reshape(64, 5, 400).mean(dim=(0, 2))
    assert_close(fifths, torch.tensor([0.26, 0.38, 0.5, 0.62, 0.74]), atol=0.015, rtol=0)


def test_magprune_rescale_matches_each_models_l1_norm() -> None:
    base, models = states(3, seed=2)
    for k in base:
        tau = deltas_of(base, models, k)
        for i in range(3):
            one = tau[i : i + 1]
            out = call("della_linear", base[k], one, density=0.4, epsilon=0.1, seed=i)
            assert_close(out.abs().sum(), one.abs().sum(), rtol=1e-5, atol=0)
            assert (out != 0).sum() < one.numel()


def test_della_is_odd_and_follows_the_models_with_their_seeds() -> None:
    """Ranks use |τ|, so −τ draws the same mask: della(−τ) = −della(τ); per-model seeds travel with the models."""
    base, models = states(3, seed=4)
    p = {"density": 0.5, "epsilon": 0.2, "weights": [1.0, 2.0, 0.5]}
    for k in base:
        tau = deltas_of(base, models, k)
        assert torch.equal(call("della", base[k], -tau, **p), -call("della", base[k], tau, **p))
        perm = [2, 0, 1]
        a = call("della", base[k], tau, seed=[7, 8, 9], **p)
        b = call(
            "della",
            base[k],
            tau[perm],
            seed=[[7, 8, 9][i] for i in perm],
            **{**p, "weights": [p["weights"][i] for i in perm]},
        )
        assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_della_rows_in_blocks_equal_the_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import distac.methods.sparse as sparse

    base, models = states(3, seed=6)
    # on the CPU: a CUDA sum reduces a whole tensor and a block in different orders (seen on an H200)
    params = {"density": 0.6, "epsilon": 0.2, "weights": [1.0, 0.5, 2.0], "device": "cpu"}
    whole = {m: distac.merge(base, models, m, **params) for m in ("della", "della_linear")}
    monkeypatch.setattr(sparse, "_BLOCK_ELEMS", 7)  # a block of one row of each tensor
    for m, want in whole.items():
        got = distac.merge(base, models, m, **params)
        for k in base:
            assert torch.equal(got[k], want[k]), (m, k)


def test_della_band_and_single_entry_rows() -> None:
    with pytest.raises(DistacError, match="density ± epsilon"):
        get_method("della").resolve({"density": 0.9, "epsilon": 0.15}, 2)
    with pytest.raises(DistacError, match="epsilon"):
        get_method("della_linear").resolve({"density": [0.5, 0.1], "epsilon": 0.1}, 2)
    get_method("della").resolve({"density": [1.0, 0.5], "epsilon": 0.4}, 2)  # density 1 does not prune
    # a row of one entry (mergekit divides 0 by 0 there) keeps with p = density
    tau = torch.randn(1, 20000, 1, generator=torch.Generator().manual_seed(0))
    kept = call("della_linear", torch.zeros(20000, 1), tau, density=0.3, epsilon=0.2, rescale=False) != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.015


# ----------------------------------------------------------------------------------------------
# NuSLERP, Multi-SLERP, Karcher
# ----------------------------------------------------------------------------------------------
def test_nuslerp_endpoints_and_the_slerp_of_the_weights_without_a_base() -> None:
    base, models = states(2, seed=7)
    for k in base:
        tau = deltas_of(base, models, k)
        assert_close(call("nuslerp", base[k], tau, weights=[1.0, 0.0]), tau[0])
        assert_close(call("nuslerp", base[k], tau, weights=[0.0, 2.0]), tau[1])
    zero, weights = states(2, seed=7, zero_base=True)
    for t in (0.25, 0.5, 0.9):
        got = distac.merge(zero, weights, "nuslerp", weights=[1 - t, t])
        want = distac.merge(zero, weights, "slerp", t=t)  # distac's slerp: θ_1 → θ_2 on the flattened tensor
        for k in zero:
            assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_nuslerp_per_row_and_per_column_are_the_flattened_slerp_of_each() -> None:
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(2, 6, 5, generator=g)
    z = torch.zeros(6, 5)
    rows = call("nuslerp", z, tau, weights=[0.6, 0.4], nuslerp_flatten=False)
    for r in range(6):
        assert_close(rows[r], call("nuslerp", z[r], tau[:, r], weights=[0.6, 0.4]))
    cols = call("nuslerp", z, tau, weights=[0.6, 0.4], nuslerp_flatten=False, nuslerp_row_wise=True)
    for c in range(5):
        assert_close(cols[:, c], call("nuslerp", z[:, c], tau[:, :, c], weights=[0.6, 0.4]))


def test_nuslerp_collinear_pairs_interpolate_linearly_and_scale_with_the_inputs() -> None:
    v = torch.randn(10, generator=torch.Generator().manual_seed(9))
    z = torch.zeros(10)
    pair = torch.stack([v, -2 * v])
    assert_close(call("nuslerp", z, pair, weights=[0.7, 0.3]), 0.7 * v + 0.3 * (-2 * v))
    tau = torch.randn(2, 10, generator=torch.Generator().manual_seed(10))
    assert_close(call("nuslerp", z, 3 * tau, weights=[0.2, 0.8]), 3 * call("nuslerp", z, tau, weights=[0.2, 0.8]))


def test_multislerp_of_two_equal_norm_vectors_is_their_slerp_midpoint_and_one_model_is_itself() -> None:
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(2, 40, generator=g)
    b = b * a.norm() / b.norm()
    z = torch.zeros(40)
    assert_close(call("multislerp", z, torch.stack([a, b])), call("slerp", z, torch.stack([a, b]), t=0.5))
    assert torch.equal(call("multislerp", z, a[None]), a)
    tau = torch.randn(3, 8, 5, generator=g)
    w = [0.2, 0.3, 0.5]
    assert_close(
        call("multislerp", torch.zeros(8, 5), 2.5 * tau, weights=w),
        2.5 * call("multislerp", torch.zeros(8, 5), tau, weights=w),
    )


def test_multislerp_antipodal_inputs() -> None:
    v = torch.randn(6, generator=torch.Generator().manual_seed(12))
    z = torch.zeros(6)
    # equal weights on opposite directions: the unit vectors cancel, so two models fall back to the weighted sum
    assert_close(call("multislerp", z, torch.stack([v, -2 * v])), 0.5 * v - 0.5 * (2 * v))
    with pytest.raises(DistacError, match="multislerp: tensor 't'"):
        call("multislerp", z, torch.stack([v, -v, v, -v]))
    with pytest.raises(DistacError, match="sums to zero"):
        get_method("multislerp").resolve({"weights": [1.0, -1.0]}, 2)
    get_method("multislerp").resolve({"weights": [1.0, -1.0], "normalize_weights": False}, 2)


def test_karcher_identical_points_pairs_and_the_base() -> None:
    g = torch.Generator().manual_seed(13)
    x = torch.randn(7, 3, generator=g)
    z = torch.zeros(7, 3)
    assert_close(call("karcher", z, x.expand(4, 7, 3).contiguous()), x)
    a, b = torch.randn(2, 21, generator=g)
    b = b * a.norm() / b.norm()  # equal norms: the Karcher mean of two points is the geodesic midpoint
    assert_close(
        call("karcher", torch.zeros(21), torch.stack([a, b])),
        call("slerp", torch.zeros(21), torch.stack([a, b])),
        rtol=1e-4,
        atol=1e-5,
    )
    # mergekit's karcher ignores the base: the mean of the weights θ_t, whatever θ0 is
    base, models = states(3, seed=14)
    with_base = distac.merge(base, models, "karcher")
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    without = distac.merge(zero, models, "karcher")
    for k in base:
        assert_close(with_base[k], without[k], rtol=1e-5, atol=1e-5)
        assert_close(call("karcher", zero[k], 2 * deltas_of(zero, models, k)), 2 * without[k], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# passthrough
# ----------------------------------------------------------------------------------------------
def test_passthrough_is_the_one_model_scaled() -> None:
    zero, models = states(1, zero_base=True)
    out = distac.merge(zero, models, "passthrough")
    half = distac.merge(zero, models, "passthrough", scale=0.5)
    base, real = states(1, seed=1)
    over_base = distac.merge(base, real, "passthrough")
    for k in zero:
        assert torch.equal(out[k], models[0][k]) and torch.equal(half[k], 0.5 * models[0][k])
        assert_close(over_base[k], real[0][k], rtol=0, atol=1e-6)
    with pytest.raises(DistacError, match="exactly 1 fine-tuned model"):
        distac.merge(zero, models * 2, "passthrough")


# ----------------------------------------------------------------------------------------------
# the streamed engine, with a tiny piece budget, equals the in-memory merge
# ----------------------------------------------------------------------------------------------
NEW = {
    "della": {"density": 0.6, "epsilon": 0.2, "weights": [1.0, 0.5]},
    "della_linear": {"density": 0.5, "epsilon": 0.1, "merge_fn": "weighted_mean"},
    "nuslerp": {"weights": [0.3, 0.7], "nuslerp_flatten": False},
    "multislerp": {"weights": [0.3, 0.7]},
    "karcher": {"max_iter": 5},
    "passthrough": {"scale": 0.5},
}


@pytest.mark.parametrize("method", list(NEW))
def test_streamed_in_tiny_pieces_equals_in_memory(tmp_path: Path, method: str) -> None:
    from conftest import finetuned, tiny_state, write_checkpoint
    from safetensors.torch import load_file

    base = tiny_state(0)
    n = get_method(method).max_models or 2
    models = [finetuned(base, i) for i in range(n)]
    want = distac.merge(base, models, method, device="cpu", **NEW[method])
    cfg = {
        "merge_method": method,
        "base_model": {"model": str(write_checkpoint(base, tmp_path / "base", form="sharded"))},
        "models": [
            {"model": str(write_checkpoint(m, tmp_path / f"m{i}", form="sharded"))} for i, m in enumerate(models)
        ],
        "parameters": NEW[method],
    }
    out = distac.merge_checkpoints(cfg, tmp_path / "out", device="cpu", chunk_bytes=256, quiet=True)
    got: StateDict = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), (method, k)


def test_only_passthrough_is_split_into_row_pieces() -> None:
    """DELLA ranks whole rows and rescales by whole-tensor norms; the spherical methods use whole-tensor angles."""
    for name in NEW:
        assert get_method(name).is_chunkable(get_method(name).resolve({}, get_method(name).min_models)) == (
            name == "passthrough"
        )


# ----------------------------------------------------------------------------------------------
# mergekit's own implementations (where mergekit is importable)
# ----------------------------------------------------------------------------------------------
def test_mergekit_agrees() -> None:
    pytest.importorskip("mergekit")
    from mergekit_reference import TOLERANCE, mergekit_differences

    for label, diff in mergekit_differences().items():
        assert diff <= TOLERANCE.get(label, 0.0), f"{label}: max |distac - mergekit| = {diff:g}"

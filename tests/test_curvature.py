"""Curvature-weighted methods: gradient_matching, fisher, regmean (merge-methods.md §1–3, §12)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import distac
from distac.errors import DistacError
from distac.merging.engine import DictSource, run_merge

torch.set_num_threads(1)


def models_and_fishers(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    fishers = [{k: torch.rand(v.shape, generator=g) * 10 for k, v in base.items()} for _ in range(n)]
    return base, models, fishers


def close(a: dict, b: dict, **kw) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ---------------------------------------------------------------------------------------------
# gradient matching
# ---------------------------------------------------------------------------------------------
def test_gradient_matching_with_huge_prior_is_task_arithmetic():
    base, models, fishers = models_and_fishers()
    for scale in (0.3, [0.5, 1.0, 0.2]):
        gm = distac.merge(base, models, "gradient_matching", fishers=fishers, prior=1e9, scale=scale)
        ta = distac.merge(base, models, "task_arithmetic", scale=1.0, weights=scale)
        close(gm, ta, rtol=1e-5, atol=1e-6)
    # same through a huge base Fisher instead of the scalar prior
    big = {k: torch.full_like(v, 1e9) for k, v in base.items()}
    gm = distac.merge(base, models, "gradient_matching", fishers=fishers, base_fisher=big, prior=0.0, scale=0.7)
    close(gm, distac.merge(base, models, "task_arithmetic", scale=0.7), rtol=1e-5, atol=1e-6)


def test_gradient_matching_without_prior_does_not_depend_on_a_shared_scale():
    base, models, fishers = models_and_fishers(seed=1)
    a = distac.merge(base, models, "gradient_matching", fishers=fishers, prior=0.0, scale=0.2)
    b = distac.merge(base, models, "gradient_matching", fishers=fishers, prior=0.0, scale=5.0)
    close(a, b, rtol=1e-5, atol=1e-6)
    # and it is the Fisher-weighted task-vector average
    for k in base:
        h = torch.stack([f[k] for f in fishers])
        tau = torch.stack([m[k] - base[k] for m in models])
        torch.testing.assert_close(a[k], base[k] + (h * tau).sum(0) / h.sum(0), rtol=1e-5, atol=1e-6)


def test_gradient_matching_equal_fishers_is_weighted_averaging():
    base, models, _ = models_and_fishers(seed=2)
    same = [{k: torch.full_like(v, 3.0) for k, v in base.items()} for _ in models]
    alpha = [1.0, 2.0, 3.0]
    gm = distac.merge(base, models, "gradient_matching", fishers=same, prior=0.0, scale=alpha)
    avg = distac.merge(base, models, "average", weights=alpha)
    close(gm, avg, rtol=1e-5, atol=1e-6)


def test_gradient_matching_matches_the_formula_with_base_fisher_and_prior():
    base, models, fishers = models_and_fishers(seed=3)
    h0 = {k: torch.rand_like(v) for k, v in base.items()}
    alpha = [0.5, 1.5, 1.0]
    out = distac.merge(base, models, "gradient_matching", fishers=fishers, base_fisher=h0, prior=0.25, scale=alpha)
    for k in base:
        hh0 = h0[k] + 0.25
        hbar = hh0 + sum(a * f[k] for a, f in zip(alpha, fishers, strict=True))
        want = (
            base[k]
            + sum(a * (hh0 + f[k]) * (m[k] - base[k]) for a, f, m in zip(alpha, fishers, models, strict=True)) / hbar
        )
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def test_gradient_matching_zero_curvature_falls_back_to_task_arithmetic():
    base, models, _ = models_and_fishers(seed=4)
    zero = [{k: torch.zeros_like(v) for k, v in base.items()} for _ in models]
    for prior in (0.0, 1e-12):  # ratio 1 through δ0, and also when H̄ is exactly 0
        gm = distac.merge(base, models, "gradient_matching", fishers=zero, prior=prior, scale=0.4)
        close(gm, distac.merge(base, models, "task_arithmetic", scale=0.4), rtol=1e-5, atol=1e-6)


def test_negative_scale_guard_names_the_tensor_and_the_safe_scale():
    base, models, fishers = models_and_fishers(n=1, seed=5)
    with pytest.raises(DistacError, match=r"tensor '(w|b)'.*largest safe negative scale") as e:
        distac.merge(base, models, "gradient_matching", fishers=fishers, prior=1.0, scale=-1.0)
    # the reported bound works for that tensor: just inside it, the merge goes through
    name = str(e.value).split("tensor '")[1].split("'")[0]
    bound = float(str(e.value).split("exclusive: ")[1].split(" ")[0])
    one = {name: base[name]}
    out = distac.merge(
        one,
        [{name: models[0][name]}],
        "gradient_matching",
        fishers=[{name: fishers[0][name]}],
        prior=1.0,
        scale=bound * 0.99,
    )
    assert torch.isfinite(out[name]).all()
    with pytest.raises(DistacError):
        distac.merge(
            one,
            [{name: models[0][name]}],
            "gradient_matching",
            fishers=[{name: fishers[0][name]}],
            prior=1.0,
            scale=bound * 1.01,
        )
    # with no prior nothing negative is safe, and the message says what to do
    with pytest.raises(DistacError, match="pass a prior"):
        distac.merge(base, models, "gradient_matching", fishers=fishers, prior=0.0, scale=-0.1)
    # a documented clamp floors H̄ instead
    out = distac.merge(base, models, "gradient_matching", fishers=fishers, prior=1.0, scale=-1.0, clamp=1e-3)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_task_removal_within_the_safe_range_is_the_removal_formula():
    base, models, fishers = models_and_fishers(n=1, seed=6)
    out = distac.merge(base, models, "gradient_matching", fishers=fishers, prior=100.0, scale=-0.5)
    for k in base:
        h, tau = fishers[0][k], models[0][k] - base[k]
        torch.testing.assert_close(out[k], base[k] - 0.5 * (100 + h) / (100 - 0.5 * h) * tau, rtol=1e-5, atol=1e-6)


def test_missing_statistics_error_gives_the_command():
    base, models, fishers = models_and_fishers()
    with pytest.raises(DistacError, match="distac stats fisher MODEL DATA"):
        distac.merge(base, models, "gradient_matching")
    partial = [dict(f) for f in fishers]
    del partial[1]["b"]
    with pytest.raises(DistacError, match=r"tensor 'b'.*distac stats fisher"):
        distac.merge(base, models, "gradient_matching", fishers=partial)
    with pytest.raises(DistacError, match=r"'fisher' statistics.*`distac stats fisher MODEL DATA"):
        distac.merge(base, models, "fisher")
    with pytest.raises(DistacError, match=r"'gram' statistics.*`distac stats gram MODEL DATA"):
        distac.merge(base, models, "regmean")
    bad = [dict(f) for f in fishers]
    bad[0]["w"] = -bad[0]["w"]
    with pytest.raises(DistacError, match="tensor 'w' is negative"):
        distac.merge(base, models, "gradient_matching", fishers=bad)


# ---------------------------------------------------------------------------------------------
# Fisher merging
# ---------------------------------------------------------------------------------------------
def test_fisher_merging_with_equal_fishers_is_weighted_averaging():
    base, models, _ = models_and_fishers(seed=7)
    same = [{k: torch.full_like(v, 2.0) for k, v in base.items()} for _ in models]
    w = [0.2, 0.3, 0.5]
    out = distac.merge(base, models, "fisher", fishers=same, weights=w)
    close(out, distac.merge(base, models, "average", weights=w), rtol=1e-5, atol=1e-6)


def test_fisher_merging_normalisation_and_target_floor():
    base, models, fishers = models_and_fishers(seed=8)
    scaled = [fishers[0], {k: v * 1000 for k, v in fishers[1].items()}, fishers[2]]
    a = distac.merge(base, models, "fisher", fishers=fishers)
    b = distac.merge(base, models, "fisher", fishers=scaled)
    close(a, b, rtol=1e-5, atol=1e-6)  # c_i / ‖F_i‖ removes each Fisher's overall scale
    c = distac.merge(base, models, "fisher", fishers=scaled, normalize=False)
    assert not torch.allclose(a["w"], c["w"], atol=1e-4)
    # where every Fisher is 0, the floor on the target (model 0) alone decides: the target's value
    zero = [{k: torch.zeros_like(v) for k, v in base.items()} for _ in models]
    zero[1]["w"] = torch.ones_like(base["w"])
    out = distac.merge(base, models, "fisher", fishers=zero, normalize=False)
    torch.testing.assert_close(out["b"], models[0]["b"])
    # with the floor on every model, zero-curvature parameters are averaged instead
    out = distac.merge(base, models, "fisher", fishers=zero, normalize=False, favor_target_model=False)
    torch.testing.assert_close(out["b"], distac.merge(base, models, "average")["b"])


# ---------------------------------------------------------------------------------------------
# RegMean
# ---------------------------------------------------------------------------------------------
def test_regmean_identical_diagonal_grams_without_nondiag_is_the_simple_average():
    base, models, _ = models_and_fishers(seed=9)
    d = torch.diag(torch.rand(5) + 0.5)
    full = d + 0.3  # off-diagonal entries that α = 0 must remove
    out = distac.merge(base, models, "regmean", grams=[{"w": full} for _ in models], reduce_nondiag=0.0)
    close(out, distac.merge(base, models, "average"), rtol=1e-5, atol=1e-6)


def test_regmean_full_gram_is_least_squares_and_handles_orientation():
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(30, 5, generator=g) for _ in range(2)]
    base = {"lin": torch.randn(4, 5, generator=g), "sq": torch.randn(5, 5, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    grams = [{"lin": x.T @ x, "sq": x.T @ x} for x in xs]
    # α = 1: W* = argmin Σ_i ‖X_i W − X_i W_i‖² with W in (in, out) orientation
    out = distac.merge(base, models, "regmean", grams=grams, reduce_nondiag=1.0)
    for k in ("lin", "sq"):
        xx = torch.cat(xs)
        yy = torch.cat([x @ m[k].T for x, m in zip(xs, models, strict=True)])
        torch.testing.assert_close(out[k], torch.linalg.lstsq(xx, yy).solution.T, rtol=1e-4, atol=1e-4)
    # a Conv1D weight is stored (in, out): the same merge with layout="in_out" on transposed weights
    conv = distac.merge(
        {"sq": base["sq"].T.contiguous()},
        [{"sq": m["sq"].T.contiguous()} for m in models],
        "regmean",
        grams=[{"sq": gr["sq"]} for gr in grams],
        reduce_nondiag=1.0,
        layout="in_out",
    )
    torch.testing.assert_close(conv["sq"], out["sq"].T, rtol=1e-4, atol=1e-4)
    # a non-square (in, out) weight is oriented by the Gram's size, whatever the layout parameter says
    conv = distac.merge(
        {"lin": base["lin"].T.contiguous()},
        [{"lin": m["lin"].T.contiguous()} for m in models],
        "regmean",
        grams=[{"lin": gr["lin"]} for gr in grams],
        reduce_nondiag=1.0,
    )
    torch.testing.assert_close(conv["lin"], out["lin"].T, rtol=1e-4, atol=1e-4)


def test_regmean_singular_gram_gets_a_ridge_not_a_crash():
    base, models, _ = models_and_fishers(seed=11)
    x = torch.randn(3, 5)
    x[:, 2] = 0.0  # an input feature that never fires: singular Gram
    grams = [{"w": x.T @ x} for _ in models]
    out = distac.merge(base, models, "regmean", grams=grams, reduce_nondiag=1.0)
    assert torch.isfinite(out["w"]).all()
    # all-zero Grams: the ridge alone decides, which is the simple average
    zero = [{"w": torch.zeros(5, 5)} for _ in models]
    out = distac.merge(base, models, "regmean", grams=zero)
    torch.testing.assert_close(out["w"], distac.merge(base, models, "average")["w"], rtol=1e-5, atol=1e-6)
    with pytest.raises(DistacError, match="fits no dimension"):
        distac.merge(base, models, "regmean", grams=[{"w": torch.eye(3)} for _ in models])


# ---------------------------------------------------------------------------------------------
# streamed == in-memory
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("gradient_matching", {"prior": 0.5, "scale": [0.5, 1.0, 0.8]}),
        ("fisher", {"weights": [1.0, 2.0, 1.0]}),
        ("regmean", {"reduce_nondiag": 0.5}),
    ],
)
def test_streamed_from_disk_equals_in_memory(tmp_path, method, params):
    from distac.io.readers import open_checkpoint

    base, models, fishers = models_and_fishers(seed=12)
    base["big"] = torch.randn(64, 8)
    for m in models:
        m["big"] = base["big"] + 0.1 * torch.randn(64, 8)
    for f in fishers:
        f["big"] = torch.rand(64, 8)
    h0 = {k: torch.rand_like(v) for k, v in base.items()}
    grams = [
        {"w": (lambda x: x.T @ x)(torch.randn(7, 5)), "big": (lambda x: x.T @ x)(torch.randn(9, 8))} for _ in models
    ]
    stats_mem = {"fishers": fishers, "base_fisher": h0} if method != "regmean" else {"grams": grams}
    want = distac.merge(base, models, method, **stats_mem, **params)

    def save(name: str, d: dict) -> str:
        p = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in d.items()}, str(p))
        return str(p)

    src = open_checkpoint(save("base", base))
    msrc = [open_checkpoint(save(f"m{i}", m)) for i, m in enumerate(models)]
    if method == "regmean":
        stats = {"gram": [open_checkpoint(save(f"g{i}", g)) for i, g in enumerate(grams)]}
    else:
        stats = {
            "fisher": [open_checkpoint(save(f"f{i}", f)) for i, f in enumerate(fishers)],
            "base_fisher": open_checkpoint(save("h0", h0)),
        }
    got: dict[str, list[torch.Tensor]] = {}
    run_merge(
        src,
        msrc,
        method,
        params,
        lambda k, t: got.setdefault(k, []).append(t.clone()),
        stats=stats,
        chunk_bytes=4 * 4 * 8 * 16,
    )  # "big" arrives in row chunks when chunkable
    if method != "regmean":
        assert len(got["big"]) > 1
    for k in base:
        torch.testing.assert_close(torch.cat(got[k]), want[k], rtol=1e-6, atol=1e-6)
    # and the in-memory engine on DictSources agrees too
    mem: dict[str, torch.Tensor] = {}
    dstats = {
        key: ([DictSource(s) for s in v] if isinstance(v, list) else DictSource(v))
        for key, v in ({"fisher": fishers, "base_fisher": h0} if method != "regmean" else {"gram": grams}).items()
    }
    run_merge(DictSource(base), [DictSource(m) for m in models], method, params, mem.__setitem__, stats=dstats)
    close(mem, want, rtol=1e-6, atol=1e-6)

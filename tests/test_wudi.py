"""WUDI-Merging: the fast quadratic form against the official autograd loop, the closed form, the tensor rule."""

from __future__ import annotations

import pytest
import torch

import distac
from distac import DistacError
from distac.methods import TensorContext, get_method
from distac.methods.wudi import (
    BLOCK_LINEAR_WEIGHTS,
    is_target,
    wudi_adam,
    wudi_adam_plain,
    wudi_closed_form,
    wudi_loss,
    wudi_quadratic,
    wudi_weights,
)

#: (N, m, n): square, wide (m < n: B via (ττᵀ)τ), tall (m > n: B via τ(τᵀτ)), one task, many tasks
SHAPES = [(3, 8, 8), (4, 6, 10), (2, 12, 5), (1, 7, 4), (8, 5, 9)]


def _deltas(n: int, m: int, k: int, *, seed: int = 0, scale: float = 1e-2, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, m, k, generator=g, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------------------------
# the objective's pieces
# ----------------------------------------------------------------------------------------------
def test_weights_are_inverse_squared_frobenius_norms_and_zero_for_a_zero_task():
    d = _deltas(3, 4, 5)
    d[1] = 0.0
    w = wudi_weights(d)
    assert w[1] == 0.0
    for t in (0, 2):
        assert torch.allclose(w[t], 1.0 / (d[t].double() ** 2).sum().float(), rtol=1e-6)


def test_loss_is_the_literal_weighted_sum_of_squared_interferences():
    d = _deltas(3, 4, 6, seed=1, dtype=torch.float64)
    merged = d.sum(0) + 0.01
    want = sum(((merged - d[t]) @ d[t].T).pow(2).sum() / d[t].pow(2).sum() for t in range(3))
    assert torch.allclose(wudi_loss(merged, d), want, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quadratic_form_gradient_equals_autograd_of_the_literal_loss(shape):
    d = _deltas(*shape, seed=2, dtype=torch.float64)
    w = wudi_weights(d)
    a, b = wudi_quadratic(d, w, torch.float64)
    merged = (d.sum(0) + 0.003 * torch.randn(shape[1:], dtype=torch.float64)).requires_grad_(True)
    wudi_loss(merged, d, w).backward()
    assert torch.allclose(merged.grad, 2 * (merged.detach() @ a - b), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# fast Adam == the official loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("iters", "lr"), [(300, 1e-5), (60, 1e-3)])
def test_fast_adam_equals_the_plain_autograd_loop_in_fp32_and_fp64(shape, iters, lr):
    d32 = _deltas(*shape, seed=3)
    fast, plain = wudi_adam(d32, iters=iters, lr=lr), wudi_adam_plain(d32, iters=iters, lr=lr)
    # fp32 round-off of the two gradient forms differs by ~1e-7 relative; Adam keeps that relative
    assert (fast - plain).abs().max() <= 1e-6 * d32.abs().max()
    d64 = d32.double()
    fast, plain = wudi_adam(d64, iters=iters, lr=lr), wudi_adam_plain(d64, iters=iters, lr=lr)
    assert (fast - plain).abs().max() <= 1e-14


def test_one_nonzero_task_returns_it_exactly_like_the_official_loop():
    d = _deltas(3, 6, 4, seed=4)
    d[0] = 0.0
    d[2] = 0.0
    for x in (d[1:2], d):  # N = 1, and N = 3 with two zero task vectors
        assert torch.equal(wudi_adam(x), d[1])
        assert torch.equal(wudi_adam_plain(x), d[1])


@pytest.mark.parametrize("mismatch", [1.0, 30.0])
def test_adam_stays_within_its_step_budget_of_the_plain_sum(mismatch):
    """|τ_m − Σ τ_t| ≤ 3.7·lr·iters per entry, however large the task vectors (norm mismatch included)."""
    d = _deltas(4, 10, 7, seed=5)
    d[0] *= mismatch
    iters, lr = 300, 1e-5
    moved = (wudi_adam(d, iters=iters, lr=lr) - d.sum(0)).abs().max()
    assert moved <= 3.7 * lr * iters
    # and it does move about lr per step where the gradient keeps its sign
    assert moved >= 0.5 * lr * iters


def test_adam_lowers_the_loss_and_the_closed_form_minimises_it():
    d = _deltas(4, 9, 6, seed=6)
    start = wudi_loss(d.sum(0), d)
    adam = wudi_loss(wudi_adam(d, iters=300, lr=1e-4), d)
    exact = wudi_closed_form(d)
    assert float(wudi_loss(exact, d)) < float(adam) < float(start)


# ----------------------------------------------------------------------------------------------
# the closed form
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 8, 8), (4, 12, 5), (2, 3, 10), (1, 4, 6)], ids=str)
def test_closed_form_has_zero_gradient(shape):
    d = _deltas(*shape, seed=7, dtype=torch.float64)
    a, b = wudi_quadratic(d, wudi_weights(d), torch.float64)
    m = wudi_closed_form(d)
    assert (m @ a - b).abs().max() <= 1e-10 * b.abs().max()
    if shape[0] == 1:
        assert torch.allclose(m, d[0], atol=1e-14)


def test_closed_form_with_singular_a_is_the_minimiser_adam_heads_for():
    """n > N·m makes A singular: B A⁺ has no component in A's null space, like Σ τ_t (Adam's start)."""
    d = _deltas(2, 3, 10, seed=8, dtype=torch.float64)
    stacked = d.reshape(-1, 10)
    _, s, vh = torch.linalg.svd(stacked)
    null = vh[(s > 1e-12).sum() :].T  # (10, 4) basis of the common null space of the τ_t
    assert null.shape[1] == 4
    m = wudi_closed_form(d)
    assert (m @ null).abs().max() <= 1e-14
    assert (d.sum(0) @ null).abs().max() <= 1e-14
    a, b = wudi_quadratic(d, wudi_weights(d), torch.float64)
    assert (m @ a - b).abs().max() <= 1e-10 * b.abs().max()


def test_closed_form_of_all_zero_task_vectors_is_zero():
    assert torch.equal(wudi_closed_form(torch.zeros(3, 4, 5)), torch.zeros(4, 5))


# ----------------------------------------------------------------------------------------------
# the method: which tensors, parameters, the registry
# ----------------------------------------------------------------------------------------------
def _clip_like(seed: int) -> dict[str, torch.Tensor]:
    """open_clip ViT names: the four official linear weights of a block, and everything else."""
    g = torch.Generator().manual_seed(seed)
    d = 6
    shapes = {
        "visual.conv1.weight": (d, 3, 2, 2),
        "visual.class_embedding": (d,),
        "visual.positional_embedding": (5, d),
        "visual.ln_pre.weight": (d,),
        "visual.transformer.resblocks.0.ln_1.weight": (d,),
        "visual.transformer.resblocks.0.attn.in_proj_weight": (3 * d, d),
        "visual.transformer.resblocks.0.attn.in_proj_bias": (3 * d,),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (d, d),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (4 * d, d),
        "visual.transformer.resblocks.0.mlp.c_proj.weight": (d, 4 * d),
        "visual.transformer.resblocks.0.mlp.c_proj.bias": (d,),
        "visual.proj": (d, 4),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


OFFICIAL_KEYS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_default_targets_are_exactly_the_official_four_linear_weights_per_block():
    base = _clip_like(0)
    chosen = {k for k, v in base.items() if is_target(k, v.shape, BLOCK_LINEAR_WEIGHTS)}
    assert chosen == {k for k in base if any(s in k for s in OFFICIAL_KEYS)}
    # other layouts' block linears are found too; embeddings, norms, heads are not
    hf = {
        "vision_model.encoder.layers.3.self_attn.q_proj.weight": (8, 8),
        "vision_model.encoder.layers.3.mlp.fc1.weight": (32, 8),
        "encoder.layer.11.attention.output.dense.weight": (8, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 32),
        "vision_model.encoder.layers.3.layer_norm1.weight": (8,),
        "vision_model.embeddings.patch_embedding.weight": (8, 3, 4, 4),
        "model.embed_tokens.weight": (100, 8),
        "classifier.weight": (3, 8),
        "text_projection": (8, 8),
    }
    assert {k for k, s in hf.items() if is_target(k, s, BLOCK_LINEAR_WEIGHTS)} == set(list(hf)[:4])


def _merge_pair(**params):
    base = _clip_like(0)
    base["visual.ln_pre.weight"][0] = -0.0  # θ0's bits must survive, the sign of zero included
    models = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    out = distac.merge(base, models, "wudi", device="cpu", iters=40, lr=1e-4, **params)
    deltas = {k: torch.stack([m[k] - base[k] for m in models]) for k in base}
    return base, deltas, out


def test_official_rule_optimises_block_weights_and_keeps_every_other_tensor_at_theta0():
    base, deltas, out = _merge_pair()
    for k, v in base.items():
        if any(s in k for s in OFFICIAL_KEYS):
            assert torch.equal(out[k], base[k] + wudi_adam(deltas[k], iters=40, lr=1e-4)), k
        else:
            assert torch.equal(out[k].view(torch.int32), v.view(torch.int32)), k


def test_fusionbench_rule_optimises_every_2d_tensor_and_averages_the_rest():
    base, deltas, out = _merge_pair(targets="*", others="mean")
    for k, v in base.items():
        want = wudi_adam(deltas[k], iters=40, lr=1e-4) if v.dim() == 2 else deltas[k].mean(0)
        assert torch.equal(out[k], v + want), k


def test_closed_form_solver_in_the_method():
    base, deltas, out = _merge_pair(solver="closed_form", targets=["*.mlp.c_fc.weight"])
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(out[k], base[k] + wudi_closed_form(deltas[k]))
    other = "visual.transformer.resblocks.0.attn.out_proj.weight"
    assert torch.equal(out[other], base[other])


def test_parameters_are_validated_with_one_line_naming_the_parameter():
    m = get_method("wudi")
    assert m.resolve({}, 3) == {
        "iters": 300,
        "lr": 1e-5,
        "solver": "adam",
        "targets": BLOCK_LINEAR_WEIGHTS,
        "others": "base",
    }
    for bad, name in [
        ({"iters": 2.5}, "iters"),
        ({"iters": -1}, "iters"),
        ({"lr": 0.0}, "lr"),
        ({"solver": "sgd"}, "solver"),
        ({"others": "sum"}, "others"),
        ({"targets": "re:(unclosed"}, "targets"),
        ({"targets": []}, "targets"),
    ]:
        with pytest.raises(DistacError, match=name):
            m.resolve(bad, 3)


def test_registered_as_a_whole_tensor_method():
    m = distac.METHODS["wudi"]
    assert m.is_chunkable(m.resolve({}, 2)) is False
    assert "2503.08099" in m.paper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_tensors_device_and_matches_the_cpu():
    d = _deltas(4, 64, 48, seed=9)
    ctx = TensorContext("layers.0.w.weight", (64, 48))
    gpu = get_method("wudi")(torch.zeros(64, 48, device="cuda"), d.cuda(), ctx=ctx, iters=50, lr=1e-4)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - wudi_adam(d, iters=50, lr=1e-4)).abs().max() <= 1e-6 * d.abs().max()

"""EMR-Merging: the formulas, the official code's conventions, one streaming pass, the bundle and its export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import finetuned, tiny_state, write_checkpoint
from safetensors.torch import load_file

from distac import DistacError, open_checkpoint
from distac.merging.emr import (
    FORMAT,
    emr_merge,
    emr_piece,
    export_per_task,
    load_emr_bundle,
    pack_bits,
    unpack_bits,
)

HEADS = ["classifier.*"]


def _official(base: dict, models: list[dict]) -> tuple[dict, dict, torch.Tensor]:
    """The official ``emr_merge`` (merge_vit/src/main_emr_merging.py), re-stated on state dicts."""
    tvs = [{k: m[k] - base[k] for k in base if base[k].is_floating_point()} for m in models]
    unified, masks = {}, {}
    scales = torch.zeros(len(tvs))
    for n in tvs[0]:
        flag = (torch.stack([tv[n] for tv in tvs]).mean(0) > 0) * 2 - 1
        param_max = torch.zeros_like(tvs[0][n])
        masks[n] = []
        for m, tv in enumerate(tvs):
            mask = (tv[n] * flag) > 0
            masks[n].append(mask)
            param_abs = torch.abs(mask * tv[n])
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
            scales[m] += torch.mean(torch.abs(tv[n]))
        unified[n] = param_max * flag
    new_scales = torch.zeros(len(tvs))
    for m in range(len(tvs)):
        for n in unified:
            new_scales[m] += torch.mean(torch.abs(unified[n] * masks[n][m]))
    return unified, masks, scales / new_scales


def _models(base: dict, n: int = 3) -> list[dict]:
    return [finetuned(base, i) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# the formulas on hand-made numbers
# ----------------------------------------------------------------------------------------------
def test_hand_made_case_zero_mean_counts_as_negative_and_lambda_sums_per_tensor_means():
    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    t1 = {"a": torch.tensor([1.0, -2.0, 0.0, 3.0]), "b": torch.tensor([0.5, 0.5])}
    t2 = {"a": torch.tensor([-1.0, 1.0, -1.0, 2.0]), "b": torch.tensor([-0.5, 0.1])}
    bundle = emr_merge(base, [t1, t2], tasks=["one", "two"], device="cpu")
    # a: means 0, -0.5, -0.5, 2.5 -> γ = -1 (zero mean!), -1, -1, +1
    assert bundle.unified.get("a").tolist() == [-1.0, -2.0, -1.0, 3.0]
    # b: means 0, 0.3 -> γ = -1, +1; ε = 0.5 (task two), 0.5 (task one)
    assert bundle.unified.get("b").tolist() == [-0.5, 0.5]
    assert unpack_bits(bundle.masks.get("a")[0], 4).tolist() == [False, True, False, True]
    assert unpack_bits(bundle.masks.get("a")[1], 4).tolist() == [True, False, True, True]
    assert unpack_bits(bundle.masks.get("b")[0], 2).tolist() == [False, True]
    # λ_1 = (6/4 + 1/2) / (5/4 + 1/4), λ_2 = (5/4 + 0.3) / (5/4 + 1/2)
    assert bundle.rescalers.tolist() == pytest.approx([2.0 / 1.5, 1.55 / 1.75], rel=1e-7)  # 0.1 is fp32
    lam = float(bundle.rescalers[0])
    assert torch.equal(bundle.task("one")["a"], torch.tensor([0.0, -2.0, 0.0, 3.0]) * lam)
    assert torch.equal(bundle.task(0)["b"], torch.tensor([0.0, 0.5]) * lam)


def test_piece_formulas():
    d = torch.tensor([[1.0, -2.0, 0.0], [-3.0, 1.0, -1.0]])
    uni, masks, abs_sums, masked = emr_piece(d)
    assert uni.tolist() == [-3.0, -2.0, -1.0]
    assert masks.tolist() == [[False, True, False], [True, False, True]]
    assert abs_sums.tolist() == [3.0, 5.0] and masked.tolist() == [2.0, 4.0]
    assert abs_sums.dtype == torch.float64


def test_matches_the_official_code_on_random_models():
    base = tiny_state(0)
    models = _models(base, 4)
    models[2]["layers.0.attn.q.weight"] = base["layers.0.attn.q.weight"].clone()  # a zero task vector
    want_uni, want_masks, want_lam = _official(base, models)
    got = emr_merge(base, models, device="cpu")
    for k, u in want_uni.items():
        assert torch.equal(got.unified.get(k), u), k
        for t in range(4):
            assert torch.equal(unpack_bits(got.masks.get(k)[t], u.numel()).view(u.shape), want_masks[k][t]), (k, t)
    assert torch.allclose(got.rescalers.float(), want_lam, rtol=1e-6)
    for t in range(4):  # θ̂_t = θ0 + λ_t M_t ⊙ τ_uni, as the official evaluation builds it
        theta = got.task(t)
        for k, u in want_uni.items():
            assert torch.allclose(theta[k], base[k] + u * want_masks[k][t] * want_lam[t], rtol=1e-6, atol=1e-7)
        assert torch.equal(theta["position_ids"], base["position_ids"])


def test_task_whose_masked_vector_is_zero_gets_lambda_one_not_nan():
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.zeros(3)}]
    b = emr_merge(base, models, device="cpu")
    assert b.rescalers.tolist() == [1.0, 1.0]  # task 0: λ = 2/2; task 1: 0/0 -> 1 (θ̂_1 = θ0)
    assert torch.equal(b.task(1)["w"], base["w"])


def test_heads_are_kept_per_task_and_left_out_of_the_sums():
    base = tiny_state(0)
    models = _models(base)
    with_heads = emr_merge(base, models, heads=HEADS, device="cpu")
    trimmed = {k: v for k, v in base.items() if not k.startswith("classifier")}
    without = emr_merge(trimmed, [{k: m[k] for k in trimmed} for m in models], device="cpu")
    assert torch.equal(with_heads.rescalers, without.rescalers)
    for t in range(3):
        theta = with_heads.task(t)
        assert torch.equal(theta["classifier.weight"], models[t]["classifier.weight"])
        assert list(theta) == list(base)


def test_tasks_never_alias_the_inputs():
    base = tiny_state(0)
    b = emr_merge(base, _models(base), heads=HEADS, device="cpu")
    theta = b.task(0)
    theta["position_ids"] += 1
    theta["classifier.bias"] += 1
    assert torch.equal(base["position_ids"], torch.arange(6))
    assert torch.equal(b.task(0)["classifier.bias"], finetuned(base, 0)["classifier.bias"])


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 8, 9, 64, 101])
def test_pack_bits_is_numpys_packbits_and_unpack_inverts_it(k):
    g = torch.Generator().manual_seed(k)
    m = torch.rand(3, k, generator=g) > 0.5
    packed = pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-k // 8))
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy(), axis=1))
    for t in range(3):
        assert torch.equal(unpack_bits(packed[t], k), m[t])


# ----------------------------------------------------------------------------------------------
# streamed bundle == in memory, bit for bit
# ----------------------------------------------------------------------------------------------
def _files(tmp_path: Path, base: dict, models: list[dict], form: str = "sharded") -> tuple[Path, list[Path]]:
    ext = ".safetensors" if form == "file" else ""
    bp = write_checkpoint(base, tmp_path / f"base{ext}", form=form)
    return bp, [write_checkpoint(m, tmp_path / f"m{i}{ext}", form=form) for i, m in enumerate(models)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [None, 200, 1000])
def test_streamed_bundle_equals_the_in_memory_result_bit_for_bit(tmp_path, chunk_bytes, dtype):
    base = tiny_state(0, dtype=dtype)
    base["odd.weight"] = torch.randn(13, 3).to(dtype)  # 3 entries per row: chunks must still fill whole bytes
    models = _models(base)
    want = emr_merge(base, models, heads=HEADS, device="cpu", chunk_bytes=None)
    bp, mps = _files(tmp_path, base, models)
    got = emr_merge(
        bp, mps, heads=HEADS, out=tmp_path / "bundle", tasks=["a", "b", "c"], device="cpu", chunk_bytes=chunk_bytes
    )
    assert got.tasks == ["a", "b", "c"] and torch.equal(got.rescalers, want.rescalers)
    assert set(got.unified.keys()) == set(want.unified.keys())
    for k in want.unified.keys():
        assert torch.equal(got.unified.get(k), want.unified.get(k)), k
        assert torch.equal(got.masks.get(k), want.masks.get(k)), k
    for t in range(3):
        a, b = got.task(t), want.task(t)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), t  # order: the files'
    # a fresh load from disk is the same bundle
    again = load_emr_bundle(tmp_path / "bundle")
    assert again.tasks == got.tasks and torch.equal(again.rescalers, want.rescalers)
    assert all(torch.equal(again.task("b")[k], want.task(1)[k]) for k in base)
    again.close()  # closing releases the files; building a task later reopens them
    assert torch.equal(again.task("c")["embed.weight"], want.task(2)["embed.weight"])


def test_manifest_and_mask_rows_are_readable_without_distac(tmp_path):
    base = tiny_state(0)
    models = _models(base, 2)
    bp, mps = _files(tmp_path, base, models)
    b = emr_merge(bp, mps, heads=HEADS, out=tmp_path / "bundle", device="cpu")
    man = json.loads((tmp_path / "bundle" / "emr.json").read_text())
    assert man["format"] == FORMAT and man["tasks"] == ["m0", "m1"] and man["base"] == str(bp.resolve())
    assert torch.equal(torch.tensor(man["rescalers"], dtype=torch.float64), b.rescalers)
    masks = load_file(str(tmp_path / "bundle" / "masks" / "model.safetensors"))
    k = "layers.0.mlp.up.weight"
    tau = torch.stack([m[k] - base[k] for m in models])
    gamma = torch.where(tau.mean(0) > 0, 1.0, -1.0)
    for t in range(2):
        bits = np.unpackbits(masks[k][t].numpy())[: base[k].numel()]
        assert np.array_equal(bits.reshape(base[k].shape).astype(bool), (tau[t] * gamma > 0).numpy())


def test_bundle_size_is_one_unified_model_plus_one_bit_per_parameter_and_task(tmp_path):
    base = {f"layers.{i}.w": torch.randn(64, 48).to(torch.bfloat16) for i in range(3)}
    base["layers.0.b"] = torch.randn(64).to(torch.bfloat16)
    n = 4
    models = [finetuned(base, i) for i in range(n)]
    bp, mps = _files(tmp_path, base, models, form="file")
    emr_merge(bp, mps, out=tmp_path / "bundle", device="cpu")
    numel = sum(v.numel() for v in base.values())
    expected = numel * 2 + n * sum(-(-v.numel() // 8) for v in base.values())
    size = sum(f.stat().st_size for d in ("unified", "masks") for f in (tmp_path / "bundle" / d).iterdir())
    assert expected <= size <= expected + 2 * 1024  # + two safetensors headers
    assert load_file(str(tmp_path / "bundle" / "unified" / "model.safetensors"))["layers.1.w"].dtype == torch.bfloat16


def test_export_writes_normal_checkpoints_that_load_back(tmp_path):
    base = tiny_state(0)
    models = _models(base)
    bp, mps = _files(tmp_path, base, models, form="hf")
    bundle = emr_merge(bp, mps, heads=HEADS, out=tmp_path / "bundle", device="cpu")
    written = export_per_task(tmp_path / "bundle", tmp_path / "per-task", quiet=True)
    assert sorted(written) == ["m0", "m1", "m2"]
    for t, folder in written.items():
        ck = open_checkpoint(folder)
        want = bundle.task(t)
        assert ck.keys() == list(want) and all(torch.equal(ck.get(k), want[k]) for k in want)
        assert (folder / "config.json").is_file() and not (folder / "README.md").exists()
    # the same export inside the bundle, in the same pass
    inside = emr_merge(bp, mps, heads=HEADS, out=tmp_path / "b2", export_per_task=True, device="cpu")
    for t in inside.tasks:
        ck = open_checkpoint(tmp_path / "b2" / "tasks" / t)
        assert all(torch.equal(ck.get(k), v) for k, v in bundle.task(t).items())


# ----------------------------------------------------------------------------------------------
# errors: one line naming the culprit
# ----------------------------------------------------------------------------------------------
def test_a_different_base_is_refused_when_a_task_is_built(tmp_path):
    base = tiny_state(0)
    bp, mps = _files(tmp_path, base, _models(base))
    emr_merge(bp, mps, out=tmp_path / "bundle", device="cpu")
    other = dict(base)
    other["layers.0.attn.k.weight"] = base["layers.0.attn.k.weight"] + 1e-3
    with pytest.raises(DistacError, match=r"tensor 'layers\.0\.attn\.k\.weight' differs from the base"):
        load_emr_bundle(tmp_path / "bundle", base=other).task(0)


def test_in_memory_base_must_be_given_again_to_load(tmp_path):
    base = tiny_state(0)
    emr_merge(base, _models(base), out=tmp_path / "bundle", device="cpu")
    with pytest.raises(DistacError, match="pass base="):
        load_emr_bundle(tmp_path / "bundle")
    assert load_emr_bundle(tmp_path / "bundle", base=base).task("task1")


def test_bad_inputs_and_outputs(tmp_path):
    base = tiny_state(0)
    models = _models(base, 2)
    with pytest.raises(DistacError, match="used twice"):
        emr_merge(base, models, tasks=["x", "x"])
    with pytest.raises(DistacError, match="may only use"):
        emr_merge(base, models, tasks=["x", "../y"])
    with pytest.raises(DistacError, match="2 task names for 1 models"):
        emr_merge(base, models[:1], tasks=["x", "y"])
    with pytest.raises(DistacError, match="at least one"):
        emr_merge(base, [])
    with pytest.raises(DistacError, match="needs out="):
        emr_merge(base, models, export_per_task=True)
    with pytest.raises(DistacError, match="match no tensor"):
        emr_merge(base, models, heads=["nothing.*"])
    bad = dict(models[1])
    bad["layers.0.attn.q.weight"] = bad["layers.0.attn.q.weight"].clone()
    bad["layers.0.attn.q.weight"][0, 0] = float("nan")
    with pytest.raises(DistacError, match="NaN"):
        emr_merge(base, [models[0], bad])
    (tmp_path / "taken").mkdir()
    with pytest.raises(DistacError, match="already exists"):
        emr_merge(base, models, out=tmp_path / "taken")
    with pytest.raises(DistacError, match="not an EMR bundle"):
        load_emr_bundle(tmp_path / "taken")
    b = emr_merge(base, models, tasks=["x", "y"])
    with pytest.raises(DistacError, match="no task 'z'"):
        b.task("z")
    with pytest.raises(DistacError, match="out of range"):
        b.task(2)


def test_opened_checkpoints_are_accepted_and_the_base_is_recorded_absolute(tmp_path, monkeypatch):
    base = tiny_state(0)
    models = _models(base, 2)
    _files(tmp_path, base, models)
    monkeypatch.chdir(tmp_path)
    srcs = [open_checkpoint(Path(d)) for d in ("base", "m0", "m1")]
    emr_merge(srcs[0], srcs[1:], out="bundle", device="cpu")
    man = json.loads((tmp_path / "bundle" / "emr.json").read_text())
    assert man["base"] == str((tmp_path / "base").resolve()) and man["tasks"] == ["m0", "m1"]
    monkeypatch.chdir("/")
    want = emr_merge(base, models, device="cpu").task(1)
    got = load_emr_bundle(tmp_path / "bundle").task("m1")
    assert all(torch.equal(got[k], want[k]) for k in want)

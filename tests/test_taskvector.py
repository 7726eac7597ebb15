"""The TaskVector algebra and the shared/head split."""

from __future__ import annotations

import pytest
import torch

from distac import DistacError, TaskVector
from distac.taskvector import match_heads, split_heads


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.w": torch.randn(4, 3, generator=g),
        "enc.b": torch.randn(3, generator=g),
        "head.w": torch.randn(2, 3, generator=g),
        "pos_ids": torch.arange(5),
    }


def test_from_models_skips_integer_buffers_and_is_fp32():
    base, ft = _sd(0), _sd(1)
    ft["pos_ids"] = torch.arange(5) + 7  # must be ignored, not differenced
    tv = TaskVector.from_models(base, ft)
    assert set(tv) == {"enc.w", "enc.b", "head.w"}
    assert all(v.dtype == torch.float32 for v in tv.values())
    torch.testing.assert_close(tv["enc.w"], ft["enc.w"] - base["enc.w"])


def test_algebra_matches_elementwise_arithmetic():
    base = _sd(0)
    a, b = TaskVector.from_models(base, _sd(1)), TaskVector.from_models(base, _sd(2))
    s = sum([a, b])
    torch.testing.assert_close(s["enc.b"], a["enc.b"] + b["enc.b"])
    torch.testing.assert_close((a - b)["enc.w"], a["enc.w"] - b["enc.w"])
    torch.testing.assert_close((-a)["enc.w"], -a["enc.w"])
    torch.testing.assert_close((0.5 * a)["enc.w"], a["enc.w"] * 0.5)
    torch.testing.assert_close((a * 2)["enc.w"], (a / 0.5)["enc.w"])


def test_norms_and_cosine():
    base = _sd(0)
    a = TaskVector.from_models(base, _sd(1))
    flat = torch.cat([v.reshape(-1) for v in a.values()])
    assert a.norm() == pytest.approx(float(flat.norm()), rel=1e-6)
    per = a.norms()
    assert per["enc.b"] == pytest.approx(float(a["enc.b"].norm()), rel=1e-6)
    assert a.cosine(a) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)


def test_apply_to_roundtrip_keeps_dtype_and_copies_buffers():
    base = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _sd(0).items()}
    ft = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _sd(1).items()}
    tv = TaskVector.from_models(base, ft)
    out = tv.apply_to(base, scale=1.0)
    assert out["enc.w"].dtype == torch.bfloat16
    torch.testing.assert_close(out["enc.w"], ft["enc.w"])
    assert torch.equal(out["pos_ids"], base["pos_ids"])
    assert out["pos_ids"] is not base["pos_ids"]  # a copy, so the caller's base stays untouched


def test_mismatched_models_name_the_tensor():
    base, ft = _sd(0), _sd(1)
    ft["enc.w"] = torch.randn(5, 3)
    with pytest.raises(DistacError, match=r"enc\.w"):
        TaskVector.from_models(base, ft)
    del ft["enc.b"]
    with pytest.raises(DistacError, match="missing"):
        TaskVector.from_models(base, ft)


def test_adding_task_vectors_with_different_keys_fails_clearly():
    base = _sd(0)
    a = TaskVector.from_models(base, _sd(1))
    with pytest.raises(DistacError, match="different keys"):
        a + a.without(["enc.b"])


def test_head_patterns_globs_and_regexes():
    names = ["enc.w", "head.w", "heads.3.bias", "classifier.weight"]
    assert match_heads(names, None) == set()
    assert match_heads(names, ["head.*"]) == {"head.w"}
    assert match_heads(names, ["re:^heads?\\."]) == {"head.w", "heads.3.bias"}
    shared, heads = split_heads(_sd(0), ["head.*"])
    assert set(heads) == {"head.w"} and "head.w" not in shared


def test_in_memory_merge_keeps_heads_from_base_and_never_mutates_inputs():
    import distac

    base = _sd(0)
    models = [_sd(1), _sd(2)]
    before = [{k: v.clone() for k, v in m.items()} for m in [base, *models]]
    out = distac.merge(base, models, "task_arithmetic", heads=["head.*"], scale=0.3)
    assert torch.equal(out["head.w"], base["head.w"])
    expected = (0.3 * sum(TaskVector.from_models(base, m) for m in models)).apply_to(base)
    torch.testing.assert_close(out["enc.w"], expected["enc.w"])
    for orig, now in zip(before, [base, *models], strict=True):
        assert all(torch.equal(orig[k], now[k]) for k in orig)

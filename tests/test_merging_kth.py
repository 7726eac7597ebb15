"""The streaming radix k-th magnitude equals torch.kthvalue bit for bit."""

from __future__ import annotations

import pytest
import torch

from distac.merging.kth import KthMagnitude, kth_smallest_rank, magnitude_threshold

DENSITIES = [0.001, 0.1, 0.2, 0.5, 0.9, 0.999, 1.0]


def _streams() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(5000, generator=g)
    ties = torch.randint(-3, 4, (3001,), generator=g).float()  # many exact ties, and zeros
    zeros = torch.cat([torch.zeros(2000), torch.randn(500, generator=g)])
    tiny = torch.finfo(torch.float32).tiny
    # denormals share the coarse bin 0 with +-0: the fine pass must separate them
    denormal = torch.cat(
        [
            torch.rand(1500, generator=g) * tiny,
            -torch.rand(500, generator=g) * tiny,
            torch.tensor([0.0, -0.0, tiny, 1e-45, -1e-45]),
        ]
    )
    wide = torch.randn(3000, generator=g) * torch.logspace(-30, 30, 3000)
    return {"normal": normal, "ties": ties, "zeros": zeros, "denormal": denormal, "wide": wide}


def _streamed(x: torch.Tensor, density: float, chunks: int) -> float:
    sel = KthMagnitude([kth_smallest_rank(x.numel(), density)])
    parts = torch.tensor_split(x, chunks)
    for pass_ in (1, 2):
        # pass 2 visits the chunks in reverse: the selection may not depend on chunk order
        for p in parts if pass_ == 1 else reversed(parts):
            sel.add(0, p)
        if pass_ == 1:
            sel.next_pass()
    return float(sel.result()[0])


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "denormal", "wide"])
@pytest.mark.parametrize("density", DENSITIES)
def test_streamed_threshold_equals_kthvalue(kind: str, density: float) -> None:
    x = _streams()[kind]
    r = kth_smallest_rank(x.numel(), density)
    got = _streamed(x, density, chunks=7)
    if r == 0:
        assert got == float("-inf")
        return
    want = torch.kthvalue(x.abs(), r).values
    # bit equality (also distinguishes +0 from denormals)
    assert torch.tensor(got).view(torch.int32) == want.view(torch.int32), (kind, density, got, float(want))
    assert float(magnitude_threshold(x, density)) == float(want)


def test_threshold_keeps_at_least_k_and_ties_are_kept() -> None:
    x = torch.tensor([1.0, -1.0, 1.0, 2.0, 0.0, -3.0, 1.0, 0.5])  # sorted |x|: 0 .5 1 1 1 1 2 3
    # d = 8, density 0.125 -> k = 1, threshold = kthvalue(|x|, 8 - 1) = 2: the official rule keeps
    # |x| >= the (d-k)-th smallest, i.e. k + 1 entries when they are distinct
    assert magnitude_threshold(x, 0.125) == 2.0
    # density 0.25 -> k = 2: 6th smallest |x| = 1; all four entries tied at 1 are kept
    thr = magnitude_threshold(x, 0.25)
    assert thr == 1.0 and int((x.abs() >= thr).sum()) == 6


def test_several_streams_at_once_with_different_ranks() -> None:
    s = _streams()
    xs = [s["normal"], s["ties"], s["denormal"]]
    dens = [0.2, 0.5, 1.0]
    sel = KthMagnitude([kth_smallest_rank(x.numel(), d) for x, d in zip(xs, dens, strict=True)])
    for pass_ in (1, 2):
        for i, x in enumerate(xs):
            for p in torch.tensor_split(x, 3):
                sel.add(i, p)
        if pass_ == 1:
            sel.next_pass()
    out = sel.result()
    for i, (x, d) in enumerate(zip(xs, dens, strict=True)):
        r = kth_smallest_rank(x.numel(), d)
        want = float("-inf") if r == 0 else float(torch.kthvalue(x.abs(), r).values)
        assert float(out[i]) == want


def test_rank_convention_matches_official_topk_values_mask() -> None:
    # official TIES: k = int(d * density) kept, threshold = kthvalue(|x|, d - k)
    assert kth_smallest_rank(10, 0.2) == 8
    assert kth_smallest_rank(10, 0.25) == 8  # int(2.5) = 2 kept
    assert kth_smallest_rank(10, 1.0) == 0
    assert kth_smallest_rank(7, 0.001) == 7  # k = 0: the threshold is the maximum

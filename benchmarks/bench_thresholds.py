"""TIES threshold selection in O(n) against the full sort mergekit uses, on one large matrix.

The matrix is a 4096×14336 fp32 task vector (58.7M entries, a Llama/Mistral MLP weight), the case
of anchors.md §5.3. Timed, each on the same tensor, with the density-0.2 TIES convention
(keep ``|x| >= threshold``, threshold = the ``(n - int(n·density))``-th smallest magnitude):

* ``argsort``: mergekit ``sparsify.magnitude`` (``torch.argsort(|x|, descending=True)[:k]``);
* ``kthvalue``: ``torch.kthvalue`` (distac ``magnitude_threshold``, the ``scope="tensor"`` path);
* ``radix 2-pass``: distac ``KthMagnitude`` fed in 16 MiB chunks, the streaming global-scope
  pre-pass (two histogram passes; memory 2×65 536 bins whatever the model size).

All three thresholds must agree bit for bit (checked).

Usage: ``python benchmarks/bench_thresholds.py [--rows 4096 --cols 14336 --repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from distac.merging.kth import KthMagnitude, kth_smallest_rank, magnitude_threshold


def _time(fn, repeat: int) -> tuple[float, float]:
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def argsort_threshold(x: torch.Tensor, density: float) -> float:
    """mergekit's way: sort all magnitudes descending and cut after k = int(n·density).

    mergekit keeps exactly the first k sorted entries (cut = the k-th largest); the official TIES
    ``topk_values_mask`` (and distac) keep ``|x| >= kthvalue(n - k)``, i.e. the (k+1)-th largest is
    the cut. Both come from the same sort; we return the TIES-convention value so the three
    thresholds can be compared exactly (the sort is what is being timed).
    """
    w = x.abs().reshape(-1)
    k = int(density * w.numel())
    idx = torch.argsort(w, descending=True)[: k + 1]
    return float(w[idx[k]])


def radix_threshold(x: torch.Tensor, density: float, chunk_elems: int) -> float:
    """distac's streaming exact selection, as the global pre-pass runs it (chunked, two passes)."""
    flat = x.reshape(-1)
    sel = KthMagnitude([kth_smallest_rank(flat.numel(), density)])
    for pass_ in (1, 2):
        for i in range(0, flat.numel(), chunk_elems):
            sel.add(0, flat[i : i + chunk_elems])
        if pass_ == 1:
            sel.next_pass()
    return float(sel.result()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x = 0.002 * torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0))
    chunk = (16 << 20) // 4
    res = {}
    for name, fn in [
        ("argsort (mergekit)", lambda: argsort_threshold(x, a.density)),
        ("kthvalue (distac scope=tensor)", lambda: magnitude_threshold(x, a.density)),
        ("radix 2-pass (distac scope=global)", lambda: radix_threshold(x, a.density, chunk)),
    ]:
        t, thr = _time(fn, a.repeat)
        res[name] = {"seconds": round(t, 3), "threshold": thr}
        print(f"{name:36s} {t:8.3f} s  threshold {thr!r}", flush=True)
    thresholds = {v["threshold"] for v in res.values()}
    if len(thresholds) != 1:
        raise SystemExit(f"thresholds differ: {res}")
    ref = res["argsort (mergekit)"]["seconds"]
    for v in res.values():
        v["speedup_vs_argsort"] = round(ref / v["seconds"], 1)
    print(json.dumps({"shape": [a.rows, a.cols], "density": a.density, "threads": a.threads, "results": res}))


if __name__ == "__main__":
    main()

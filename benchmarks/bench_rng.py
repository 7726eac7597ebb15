"""DARE's counter-based RNG: ns per number, against torch.rand, on one model's share of a 16 MiB piece.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rng.py [--threads 1] [--repeat 9]

Rows: the int64 reference form (``hash32`` block by block, what ``uniform`` computed before
``d5dcdcf``), the fast ``uniform``, ``keep_mask`` (the bool mask DARE needs), ``keep_where`` (the
masked copy DARE makes), and ``torch.rand`` / ``torch.rand(...) < d`` / ``torch.where`` for scale. Also
prints the empirical keep rate and the lag-1 correlation of the mask (statistical sanity checks).
"""

from __future__ import annotations

import argparse
import time

import torch

from distac.methods import rng as R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--numel", type=int, default=1_398_101, help="one model's share of a 16 MiB piece at N=2")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    key, off, n, d = R.stream_key(0, "model.embed_tokens.weight", 1), 12_345 + 1536 * 10, a.numel, 0.2
    x = torch.randn(n)
    out = torch.empty_like(x)
    mask = torch.rand(n) < d
    assert torch.equal(R.uniform(key, off, n), R._uniform_int64(key, off, n, torch.device("cpu")))
    assert torch.equal(R.keep_mask(key, off, n, d), R.uniform(key, off, n) < d)

    def ns(f) -> float:
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] / n * 1e9

    rows = [
        ("int64 reference form (hash32, 2**16 blocks)", lambda: R._uniform_int64(key, off, n, torch.device("cpu"))),
        ("uniform (fast path)", lambda: R.uniform(key, off, n)),
        ("keep_mask", lambda: R.keep_mask(key, off, n, d)),
        ("keep_where (masked copy)", lambda: R.keep_where(key, off, d, x, out=out)),
        ("torch.rand", lambda: torch.rand(n)),
        ("torch.rand < d", lambda: torch.rand(n) < d),
        ("torch.where(mask, x, 0)", lambda: torch.where(mask, x, torch.zeros(()))),
    ]
    print(f"threads={a.threads} numel={n} (median of {a.repeat})")
    for name, f in rows:
        print(f"{name:44s} {ns(f):6.2f} ns/number")
    m = R.keep_mask(key, 0, 4_000_000, d).float()
    sigma = (d * (1 - d) / m.numel()) ** 0.5
    corr = float(torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1])
    print(f"keep rate {float(m.mean()):.5f} (density {d}, ±{sigma:.5f} = 1 sigma); lag-1 correlation {corr:+.5f}")


if __name__ == "__main__":
    main()

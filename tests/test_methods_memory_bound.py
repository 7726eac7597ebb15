"""Peak memory of the whole-tensor methods stays under (N+1) × largest tensor × c (one process per method).

The same measurement as benchmarks/bench_memory.py (peak RSS from wait4 above an import-only
process), on a 32 MiB largest tensor. Before the row-blocked rewrites these methods needed
4.7 (SLERP), 4.8 (Iso-CTS) and 6.0 (Breadcrumbs) × (N+1) × largest; they now need 2.6–3.6.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_memory

#: c in "peak ≈ (N+1) × largest × c" must stay under these. Measured here at 32 MiB: before the rewrite
#: 5.1 / 3.5 / 4.8, after 1.7 / 2.2 / 3.1 (benchmarks/bench_memory.py with --src on the old tree).
BOUND = {"breadcrumbs": 4.0, "slerp": 3.0, "iso_cts": 4.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    bench_memory.generate(root / "set", 32.0, 3)
    return root


@pytest.mark.parametrize("method", ["breadcrumbs", "slerp", "iso_cts"])
def test_whole_tensor_methods_stay_under_the_bound(workdir: Path, method: str) -> None:
    root = workdir / "set"
    base_rss, _, rc0 = bench_memory.run_one({"merge_method": "none"}, workdir / "out", None, 2)
    n = 2 if method == "slerp" else 3
    peak, _, rc = bench_memory.run_one(bench_memory.config(root, method, n), workdir / "out", None, 2)
    assert rc0 == 0 and rc == 0
    largest_mib = 32.0
    bound = (peak - base_rss) / largest_mib / (n + 1)
    assert bound < BOUND[method], f"{method}: peak {peak:.0f} MiB = (N+1) x largest x {bound:.2f} above the baseline"

"""The benchmark harness itself: generated checkpoints, the measurement wrapper, the report.

Sizes are tiny (a ~0.1M-parameter decoder); the real runs are ``benchmarks/run_all.sh``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_merge
import gen_checkpoints
import report

PARAMS = 1e5


def _load(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "set"
    gen_checkpoints.generate(root, params=PARAMS, n=2, dtype="bfloat16", shard_bytes=40_000, fisher=2)
    return root


def test_layout_matches_llama_names_and_index(data: Path) -> None:
    man = json.loads((data / "manifest.json").read_text())
    arch = gen_checkpoints.Arch(**man["arch"])
    names = [n for n, _ in arch.tensors()]
    assert man["shards"] > 1
    for d in ("base", "ft1", "ft2"):
        index = json.loads((data / d / "model.safetensors.index.json").read_text())
        assert list(index["weight_map"]) == names
        assert json.loads((data / d / "config.json").read_text())["num_hidden_layers"] == arch.layers
        sd = _load(data / d)
        assert set(sd) == set(names) and all(t.dtype == torch.bfloat16 for t in sd.values())
        assert {k: tuple(v.shape) for k, v in sd.items()} == dict(arch.tensors())
    fisher = _load(data / "fisher1")
    assert set(fisher) == set(names)
    assert all(t.dtype == torch.float32 and bool((t > 0).all()) for t in fisher.values())


def test_deltas_are_small_and_low_rank(data: Path) -> None:
    base, ft = _load(data / "base"), _load(data / "ft1")
    name = "model.layers.0.mlp.gate_proj.weight"
    delta = ft[name].float() - base[name].float()
    rel = float(delta.norm() / base[name].float().norm())
    assert 0.02 < rel < 0.5
    s = torch.linalg.svdvals(delta)
    # the top 32 directions (the planted low-rank part) hold most of the energy
    assert float((s[:32] ** 2).sum() / (s**2).sum()) > 0.5
    assert not torch.equal(ft[name], _load(data / "ft2")[name])


def test_files_do_not_depend_on_shard_size(tmp_path: Path, data: Path) -> None:
    other = tmp_path / "one-shard"
    gen_checkpoints.generate(other, params=PARAMS, n=1, dtype="bfloat16", shard_bytes=1 << 30)
    a, b = _load(data / "ft1"), _load(other / "ft1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_refuses_existing_output(data: Path) -> None:
    with pytest.raises(SystemExit, match="exists"):
        gen_checkpoints.generate(data, params=PARAMS, n=1, dtype="bfloat16")


def test_measure_counts_writes_and_enforces_rss_cap(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = dict(__import__("os").environ)
    writer = f"open({str(out / 'x')!r}, 'wb').write(b'1' * 3_000_000)"
    m = bench_merge.measure(
        [sys.executable, "-c", writer], log=tmp_path / "w.log", env=env, rss_cap_mb=4000, out=out, timeout_s=60
    )
    assert m.rc == 0 and not m.killed and m.wall_s > 0 and m.peak_rss_mb > 0
    assert m.wchar_mb >= 2.8
    hog = "import time; x = b'1' * (600 * 2**20); time.sleep(30)"
    m = bench_merge.measure(
        [sys.executable, "-c", hog],
        log=tmp_path / "h.log",
        env=env,
        rss_cap_mb=300,
        out=tmp_path / "none",
        timeout_s=60,
    )
    assert m.killed.startswith("RSS cap") and m.rc != 0 and m.wall_s < 25


def test_distac_run_reproduces_task_arithmetic(tmp_path: Path, data: Path) -> None:
    d = bench_merge.Data(data, 2)
    out = tmp_path / "merged"
    argv = bench_merge.RUNS["ta_distac"][2](d, out, tmp_path)
    m = bench_merge.measure(
        argv, log=tmp_path / "ta.log", env=dict(__import__("os").environ), rss_cap_mb=4000, out=out, timeout_s=300
    )
    assert m.rc == 0, (tmp_path / "ta.log").read_text()
    base, fts, merged = _load(data / "base"), [_load(p) for p in d.models], _load(out)
    for k, b in base.items():
        want = (b.float() + sum(f[k].float() - b.float() for f in fts)).to(torch.bfloat16)
        assert torch.equal(merged[k], want), k


def test_report_ratios_and_failures() -> None:
    common = {
        "data": "/x/set",
        "n": 2,
        "family": "task_arithmetic",
        "flush_s": 0.0,
        "read_mb": 1.0,
        "rchar_mb": 1.0,
        "cpu_s": 1.0,
        "params": 10,
        "write_mb": 1.0,
        "rss_target_mb": 100.0,
        "disk_read_mb_s": 100.0,
        "disk_write_mb_s": 50.0,
        "peak_rss_mb": 10.0,
    }
    rows = [
        {**common, "tool": "distac", "wall_s": 10.0, "bound_s": 8.0, "rc": 0, "killed": ""},
        {**common, "tool": "distac", "wall_s": 12.0, "bound_s": 8.0, "rc": 0, "killed": ""},
        {**common, "tool": "mergekit", "wall_s": 33.0, "bound_s": 8.0, "rc": 0, "killed": ""},
        {**common, "tool": "fusionbench", "wall_s": 5.0, "bound_s": 8.0, "rc": -9, "killed": "RSS cap 10 MB"},
    ]
    s = {x["tool"]: x for x in report.summarise(rows)}
    assert s["distac"]["wall_s"] == 11.0 and s["distac"]["x_bound"] == pytest.approx(11 / 8)
    assert s["mergekit"]["vs_distac"] == pytest.approx(3.0)
    assert "wall_s" not in s["fusionbench"] and s["fusionbench"]["failure"] == "RSS cap 10 MB"
    assert "failed: RSS cap 10 MB" in report.markdown(report.summarise(rows))

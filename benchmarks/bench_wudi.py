"""WUDI time per matrix (fast quadratic form vs the official autograd loop) and EMR bundle size.

WUDI, for each matrix shape (ViT-B/32's four block linears by default: attention out 768×768,
attention in 2304×768, MLP in 3072×768, MLP out 768×3072) with N task vectors (low rank plus noise,
entries ~1e-3 like real fine-tunes):

* ``fast``: :func:`distac.methods.wudi.wudi_adam`, ``--iters`` steps (setup A, B included);
* ``plain``: :func:`distac.methods.wudi.wudi_adam_plain` (the official loop's form), timed over
  ``--plain-steps`` steps and extrapolated linearly to ``--iters`` (its cost per step is constant);
  both run side by side in the same process, one after the other;
* ``agree``: |fast − plain| after ``--plain-steps`` steps of each, in units of one Adam step (lr):
  the largest, and the fraction of entries further apart than 0.01·lr. Adam normalises the gradient,
  so an entry whose gradient is within round-off of zero steps ±lr depending on the last bit: a few
  entries of a large matrix differ by up to 2·lr per step, the rest agree to fp32 round-off;
* ``closed``: :func:`distac.methods.wudi.wudi_closed_form` (float64 eigendecomposition).

EMR, on a synthetic decoder (``gen_checkpoints.py``, ``--emr-params`` parameters, N fine-tunes):
bundle size (unified, masks, total) against one checkpoint and against the N fine-tuned
checkpoints it replaces, and the wall time of the streamed pass.

Usage: ``python benchmarks/bench_wudi.py [--device cpu] [--n 8] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from distac.merging.emr import emr_merge
from distac.methods.wudi import wudi_adam, wudi_adam_plain, wudi_closed_form

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_checkpoints

SHAPES = ("768x768", "2304x768", "3072x768", "768x3072")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def task_vectors(n: int, m: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """N task vectors shaped like fine-tunes: rank-16 signal with a decaying spectrum plus noise, RMS ~1e-3."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, m, k)
    for t in range(n):
        u, v = torch.randn(m, 16, generator=g), torch.randn(16, k, generator=g)
        s = 1.0 / (1.0 + torch.arange(16.0))
        out[t] = (u * s) @ v / 16**0.5 + 0.1 * torch.randn(m, k, generator=g)
    return (1e-3 * out / out.pow(2).mean().sqrt()).to(device)


def wudi_row(shape: str, n: int, iters: int, plain_steps: int, lr: float, device: torch.device) -> dict:
    m, k = (int(x) for x in shape.split("x"))
    d = task_vectors(n, m, k, device)
    wudi_adam(d, iters=1, lr=lr), wudi_adam_plain(d[:, :8], iters=1, lr=lr)  # warm-up: first-call costs
    t_fast, _ = timed(lambda: wudi_adam(d, iters=iters, lr=lr), device)
    t_plain, plain = timed(lambda: wudi_adam_plain(d, iters=plain_steps, lr=lr), device)
    short = wudi_adam(d, iters=plain_steps, lr=lr)
    t_closed, _ = timed(lambda: wudi_closed_form(d), device)
    plain_full = t_plain / plain_steps * iters
    return {
        "shape": shape,
        "n": n,
        "iters": iters,
        "fast_s": round(t_fast, 2),
        "plain_s_per_step": round(t_plain / plain_steps, 3),
        "plain_s_extrapolated": round(plain_full, 1),
        "speedup": round(plain_full / t_fast, 1),
        "agree_max_in_lr": round(float((short - plain).abs().max()) / lr, 3),
        "agree_frac_over_0.01lr": float(f"{float(((short - plain).abs() > 0.01 * lr).float().mean()):.2e}"),
        "closed_form_s": round(t_closed, 2),
    }


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def emr_row(params: float, n: int, dtype: str, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp) / "set"
        man = gen_checkpoints.generate(root, params=params, n=n, dtype=dtype, shard_bytes=256 << 20)
        out = Path(tmp) / "bundle"
        models = [root / f"ft{i}" for i in range(1, n + 1)]
        t0 = time.perf_counter()
        emr_merge(root / "base", models, out=out, device=device, quiet=True)
        wall = time.perf_counter() - t0
        one = _size(root / "base")
        unified, masks, total = _size(out / "unified"), _size(out / "masks"), _size(out)
        return {
            "params": man["params"],
            "dtype": dtype,
            "n": n,
            "checkpoint_MB": round(one / 1e6, 1),
            "unified_MB": round(unified / 1e6, 1),
            "masks_MB": round(masks / 1e6, 1),
            "masks_expected_MB": round(n * man["params"] / 8 / 1e6, 1),
            "bundle_MB": round(total / 1e6, 1),
            "bundle_vs_one_model": round(total / one, 3),
            "bundle_vs_n_models": round(total / (n * one), 3),
            "emr_pass_s": round(wall, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--plain-steps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--emr-params", type=float, default=2e7)
    ap.add_argument("--emr-dtype", default="float32", choices=sorted(gen_checkpoints.DTYPES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(env))
    emr = emr_row(args.emr_params, args.n, args.emr_dtype, dev)
    print(json.dumps(emr), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        rows.append(wudi_row(shape, args.n, args.iters, args.plain_steps, args.lr, dev))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "wudi": rows, "emr": emr}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""SVD methods on the benchmark matrices: exact vs randomized low-rank, time per matrix vs size.

For a few task-vector matrices of a ``gen_checkpoints.py`` directory (attention k/q, MLP gate,
embedding: 0.8M to 49M entries), with N task vectors each:

* ``svd``: ``torch.linalg.svd`` (exact, full_matrices=False) against ``torch.svd_lowrank`` with
  the settings distac's ``tsv_m(svd="lowrank")`` uses (q = k + 10, niter = 4, k = ⌊r/N⌋);
  error of the randomized rank-k reconstruction relative to the exact one,
  ``(‖A − A_k^rand‖_F − ‖A − A_k^exact‖_F) / ‖A − A_k^exact‖_F`` (0 = as good as the exact
  truncation; the Eckart–Young optimum), and the largest relative error on the top-k singular values;
* ``tsv_m``: distac's method on the N deltas with ``svd="exact"`` and ``svd="lowrank"``, time and
  ``‖Δ_lowrank − Δ_exact‖_F / ‖Δ_exact‖_F``; ``iso_c``: time (one exact SVD of Σ τ_t).

``--device cuda`` runs the same on a GPU (same table, another column).

Usage: ``python benchmarks/bench_svd.py --data /tmp/distac-bench/bf16-1g --n 2 [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from distac.methods import TensorContext, get_method

TENSORS = (
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.embed_tokens.weight",
)


def load(ckpt: Path, name: str) -> torch.Tensor:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    with safe_open(str(ckpt / index["weight_map"][name]), framework="pt") as f:
        return f.get_tensor(name).float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def svd_row(a: torch.Tensor, k: int, device: torch.device) -> dict:
    t_ex, (u, s, vh) = timed(lambda: torch.linalg.svd(a, full_matrices=False), device)
    torch.manual_seed(0)
    t_lr, (ul, sl, vl) = timed(lambda: torch.svd_lowrank(a, q=min(k + 10, min(a.shape)), niter=4), device)
    ex_err = float(torch.linalg.norm(a - (u[:, :k] * s[:k]) @ vh[:k]))
    lr_err = float(torch.linalg.norm(a - (ul[:, :k] * sl[:k]) @ vl[:, :k].mT))
    return {
        "svd_exact_s": round(t_ex, 3),
        "svd_lowrank_s": round(t_lr, 3),
        "lowrank_excess_error": round((lr_err - ex_err) / ex_err, 6),
        "topk_sigma_max_rel_error": round(float(((sl[:k] - s[:k]).abs() / s[:k]).max()), 6),
        "exact_rank_k_rel_error": round(ex_err / float(torch.linalg.norm(a)), 4),
    }


def methods_row(base: torch.Tensor, deltas: torch.Tensor, name: str, dev: torch.device) -> dict:
    """distac's tsv_m (exact and low-rank) and iso_c on one matrix: times and the low-rank deviation."""
    tsv, iso = get_method("tsv_m"), get_method("iso_c")
    ctx = TensorContext(name, tuple(base.shape))
    t_ex, d_ex = timed(lambda: tsv(base, deltas, ctx=ctx, svd="exact"), dev)
    t_lr, d_lr = timed(lambda: tsv(base, deltas, ctx=ctx, svd="lowrank"), dev)
    t_iso, _ = timed(lambda: iso(base, deltas, ctx=ctx), dev)
    diff = float(torch.linalg.norm(d_lr - d_ex) / torch.linalg.norm(d_ex))
    return {
        "tsvm_exact_s": round(t_ex, 3),
        "tsvm_lowrank_s": round(t_lr, 3),
        "tsvm_lowrank_rel_diff": round(diff, 6),
        "isoc_s": round(t_iso, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tensors", default=",".join(TENSORS))
    ap.add_argument("--max-tsvm-numel", type=float, default=2e7, help="skip tsv_m/iso_c above this size")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    for name in a.tensors.split(","):
        base = load(a.data / "base", name)
        deltas = torch.stack([load(a.data / f"ft{i}", name) - base for i in range(1, a.n + 1)]).to(dev)
        base = base.to(dev)
        m, n = base.shape
        k = min(m, n) // a.n
        row = {
            "tensor": name,
            "shape": [m, n],
            "numel": m * n,
            "n_models": a.n,
            "k": k,
            "device": str(dev),
            "threads": a.threads,
            **svd_row(deltas[0], k, dev),
        }
        if m * n <= a.max_tsvm_numel:
            row.update(methods_row(base, deltas, name, dev))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

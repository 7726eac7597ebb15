"""Run one FusionBench merge end to end (load from disk, merge, save), for the benchmark harness.

Run with the anchors venv (``benchmarks/setup_anchors.sh``), never distac's::

    /tmp/anchors-venv/bin/python benchmarks/anchors/run_fusionbench.py ties \
        --base B --models F1 F2 --out OUT --dtype bfloat16 --scale 1.0 --density 0.2

This is how a FusionBench user merges causal LMs: a ``CausalLMPool`` that loads each checkpoint
with ``AutoModelForCausalLM.from_pretrained`` (in the file dtype), the library's algorithm class,
then ``save_pretrained`` (safetensors). Conventions, as FusionBench implements them:

* ``task_arithmetic``: ``TaskArithmeticAlgorithm(scaling_factor=λ)``: θ0 + λ Σ τ_t, computed in
  the model dtype (bf16 stays bf16; distac computes in fp32).
* ``ties``: ``TiesMergingAlgorithm(threshold=100·density, merge_func="mean")``: the trim is
  **global** per task (the paper's ``topk_values_mask`` over the flattened model, with
  ``kthvalue`` on an N×P matrix), sign by mass, disjoint mean. This matches distac
  ``scope: global, merge_fn: mean``.
* ``dare``: ``DareTaskArithmetic(sparsity_ratio=1-density, rescale=True,
  only_on_linear_weights=False)``: Bernoulli drop with the 1/(1-p) rescale on every parameter,
  then task arithmetic; FusionBench draws from torch's global generator.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build(method: str, scale: float, density: float):
    """The FusionBench algorithm object for ``method`` (a table, not string dispatch in the loop)."""
    from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    factories = {
        "task_arithmetic": lambda: TaskArithmeticAlgorithm(scaling_factor=scale),
        "ties": lambda: TiesMergingAlgorithm(
            scaling_factor=scale, threshold=100 * density, remove_keys=[], merge_func="mean"
        ),
        "dare": lambda: DareTaskArithmetic(
            scaling_factor=scale, sparsity_ratio=1 - density, only_on_linear_weights=False, rescale=True
        ),
    }
    return factories[method]()


def main() -> None:
    ap = argparse.ArgumentParser(description="One FusionBench merge, disk to disk.")
    ap.add_argument("method", choices=["task_arithmetic", "ties", "dare"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from fusion_bench.modelpool import CausalLMPool

    torch.manual_seed(a.seed)
    models = {"_pretrained_": a.base, **{f"ft{i}": p for i, p in enumerate(a.models, 1)}}
    pool = CausalLMPool(models, tokenizer=None, model_kwargs={"torch_dtype": a.dtype})
    t0 = time.perf_counter()
    merged = build(a.method, a.scale, a.density).run(pool)
    t1 = time.perf_counter()
    merged.save_pretrained(a.out, safe_serialization=True)
    print(f"fusionbench {a.method}: merge {t1 - t0:.1f}s, save {time.perf_counter() - t1:.1f}s")


if __name__ == "__main__":
    main()

"""Merging LoRA adapters of a ~1 GB model: distac on the adapters, distac on materialised models, peft.

One run, side by side, each case in its own process (peak RSS exactly from ``wait4``'s
``ru_maxrss``; wall time around the process, imports and model loading included):

* ``distac-adapters``: ``distac.merge_checkpoints`` with the adapter folders as models (θ0 + ΔW
  computed tensor by tensor) → a full merged checkpoint; task arithmetic and TIES;
* ``distac-adapters-lora``: the same TIES merge written as a rank-``--out-rank`` LoRA adapter (truncated
  SVD of each merged ΔW);
* ``distac-dense``: the same merges of the models peft's ``merge_and_unload`` materialised (written
  once in setup; the materialisation time is reported separately);
* ``peft-svd``/``peft-ties``/``peft-dare_linear``: ``PeftModel.add_weighted_adapter`` with that
  combination type on the base with the three adapters loaded, saved with ``save_pretrained``.

Setup (not timed; reused across runs): a Llama-architecture base of ``--hidden``/``--layers``
(defaults: ≈ 271M parameters, 1.08 GB fp32) with random weights and ``--n`` random rank-``--rank``
adapters on every projection, all under ``--workdir`` (default ``/tmp/distac-bench-lora``; nothing
is committed). Before the timed cases, an exactness check on the first layer: the relative
Frobenius error of each method's ΔW against the exact Σ w_i ΔW_i (weights 1).

    nice -n 10 python benchmarks/bench_lora.py --json docs/experiments/bench_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(int(sys.argv[2]))
case = json.loads(sys.argv[1])
if case["kind"] == "distac":
    import distac
    distac.merge_checkpoints(case["config"], case["out"], quiet=True, device="cpu", **case.get("kw", {}))
else:
    import peft, transformers as tf
    model = tf.LlamaForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    names = [f"a{i}" for i in range(len(case["adapters"]))]
    pm = peft.PeftModel.from_pretrained(model, case["adapters"][0], adapter_name=names[0])
    for n, a in zip(names[1:], case["adapters"][1:]):
        pm.load_adapter(a, adapter_name=n)
    pm.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=case["combination"],
                            **case.get("kw", {}))
    pm.save_pretrained(case["out"], selected_adapters=["merged"])
"""


def _llama_config(hidden: int, layers: int, vocab: int):
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        tie_word_embeddings=False,
    )


def setup(work: Path, hidden: int, layers: int, vocab: int, n: int, rank: int) -> dict:
    """Base, adapters and materialised models under ``work`` (kept across runs)."""
    import peft
    import torch
    import transformers as tf

    stamp = work / "setup.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(_llama_config(hidden, layers, vocab))
    base.save_pretrained(str(work / "base"))
    params = sum(p.numel() for p in base.parameters())
    del base
    times = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = tf.LlamaForCausalLM.from_pretrained(str(work / "base"))
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg)
        with torch.no_grad():  # fine-tune-sized updates: B small
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        pm.save_pretrained(str(work / f"adapter{i}"))
        t0 = time.perf_counter()
        merged = peft.PeftModel.from_pretrained(
            tf.LlamaForCausalLM.from_pretrained(str(work / "base")), str(work / f"adapter{i}")
        ).merge_and_unload()
        merged.save_pretrained(str(work / f"dense{i}"))
        times.append(time.perf_counter() - t0)
        del merged, pm, model
    info = {"params": params, "materialise_s": times, "n": n, "rank": rank}
    stamp.write_text(json.dumps(info))
    return info


def exactness(work: Path, n: int) -> dict[str, float]:
    """Relative error of each method's merged ΔW against the exact Σ ΔW_i (weights 1), on layer 0."""
    import warnings

    import peft
    import torch
    import transformers as tf

    import distac
    from distac.io import open_checkpoint
    from distac.io.lora import AdapterSource, delta, read_adapter

    warnings.filterwarnings("ignore")
    names = [f"a{i}" for i in range(n)]
    keys = [f"model.layers.0.self_attn.{t}.weight" for t in ("q_proj", "v_proj")]
    base = open_checkpoint(work / "base")
    exact = {k: torch.zeros(base.shape(k)) for k in keys}
    for i in range(n):
        src = AdapterSource(base, read_adapter(work / f"adapter{i}"))
        for k in keys:
            exact[k] += delta(src.adapter, src.modules[k].name)
        src.close()

    def err(got: dict) -> float:
        num = sum(float((got[k] - exact[k]).norm() ** 2) for k in keys) ** 0.5
        return num / sum(float(exact[k].norm() ** 2) for k in keys) ** 0.5

    out = {}
    cfg = {"merge_method": "task_arithmetic", "base_model": str(work / "base")}
    cfg["models"] = [str(work / f"adapter{i}") for i in range(n)]
    merged = distac.merge_checkpoints(cfg, work / "exact-distac", quiet=True, overwrite=True)
    m = open_checkpoint(merged)
    out["distac task_arithmetic"] = err({k: m.get(k).float() - base.get(k).float() for k in keys})
    pm = peft.PeftModel.from_pretrained(
        tf.LlamaForCausalLM.from_pretrained(str(work / "base")), str(work / "adapter0"), adapter_name="a0"
    )
    for i in range(1, n):
        pm.load_adapter(str(work / f"adapter{i}"), adapter_name=f"a{i}")
    mods = dict(pm.named_modules())
    for ct, kw in (
        ("linear", {}),
        ("cat", {}),
        ("svd", {}),
        ("ties", {"density": 1.0}),
        ("dare_linear", {"density": 1.0}),
    ):
        pm.add_weighted_adapter(names, [1.0] * n, ct, combination_type=ct, **kw)
        got = {k: mods["base_model.model." + k.removesuffix(".weight")].get_delta_weight(ct) for k in keys}
        out[f"peft {ct}" + (" (density 1)" if kw else "")] = err(got)
    return out


def run_case(case: dict, threads: int) -> dict:
    shutil.rmtree(case["out"], ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(case), str(threads)])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"case {case['name']} failed with status {status}")
    size = sum(f.stat().st_size for f in Path(case["out"]).rglob("*") if f.is_file())
    shutil.rmtree(case["out"], ignore_errors=True)
    return {
        "case": case["name"],
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        "output_gb": round(size / 1e9, 3),
    }


def cases(work: Path, n: int, out_rank: int) -> list[dict]:
    base = str(work / "base")
    adapters = [str(work / f"adapter{i}") for i in range(n)]
    dense = [str(work / f"dense{i}") for i in range(n)]
    ties = {"density": 0.2}
    out = []
    for method, params in (("task_arithmetic", {}), ("ties", ties)):
        for what, models in (("adapters", adapters), ("dense", dense)):
            cfg = {"merge_method": method, "base_model": base, "models": models, "parameters": params}
            out.append({"name": f"distac-{what} {method}", "kind": "distac", "config": cfg, "out": str(work / "out")})
    cfg = {"merge_method": "ties", "base_model": base, "models": adapters, "parameters": ties}
    out.append(
        {
            "name": f"distac-adapters ties -> LoRA r={out_rank}",
            "kind": "distac",
            "config": cfg,
            "out": str(work / "out"),
            "kw": {"lora_rank": out_rank},
        }
    )
    for ct, kw in (("svd", {}), ("ties", {"density": 0.2}), ("dare_linear", {"density": 0.2})):
        out.append(
            {
                "name": f"peft add_weighted_adapter {ct}",
                "kind": "peft",
                "combination": ct,
                "kw": kw,
                "base": base,
                "adapters": adapters,
                "out": str(work / "out"),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/distac-bench-lora"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out-rank", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info = setup(args.workdir, args.hidden, args.layers, args.vocab, args.n, args.rank)
    print(
        f"model: {info['params'] / 1e6:.0f}M params fp32, {args.n} adapters rank {args.rank}; "
        f"materialising one with peft merge_and_unload + save: {sum(info['materialise_s']) / args.n:.1f} s"
    )
    errs = exactness(args.workdir, args.n)
    for k, v in errs.items():
        print(f"exactness  {k:<32} relative error of Σ ΔW on layer 0: {v:.3g}")
    rows = []
    for case in cases(args.workdir, args.n, args.out_rank):
        rows.append(run_case(case, args.threads))
        r = rows[-1]
        print(
            f"{r['case']:<44} {r['wall_s']:>7.1f} s  peak RSS {r['peak_rss_gb']:>5.2f} GB  "
            f"output {r['output_gb']:.3f} GB",
            flush=True,
        )
    if args.json:
        machine = {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        }
        args.json.write_text(
            json.dumps(
                {"setup": info, "exactness": errs, "rows": rows, "machine": machine, "command": " ".join(sys.argv)},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

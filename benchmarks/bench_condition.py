"""Cost of DisTaC conditioning against fine-tuning (issue 4 benchmark; not a timed test).

1. Wall time of one conditioning step (distac's real loop: teacher forward, student forward/backward,
   anchor, clip, Adam, Accelerate reduce) against one fine-tuning step (student forward/backward on
   labels, clip, AdamW) of the same model at the same batch size. Per-step times come from the
   difference of two runs (``--steps`` and ``2×--steps``), so set-up and evaluation cancel out.
   Target: ≤ 1.5×.
2. Total conditioning cost at the default K = 500 as a fraction of the original fine-tuning run, for the
   DisTaC repo's source recipe (10 epochs at batch 128; §2.1 of the spec) on datasets of the sizes of
   DTD, EuroSAT and SVHN. Conditioning is capped at 10 epochs as in the official loop. Target: ≤ 10%.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_condition.py --model vit-tiny --batch 32 --steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from distac.conditioning.distill import condition
from distac.nn.data import Inputs

# training-set sizes (task_vectors splits, minus the 10% validation split) for the cost table
DATASETS = {"DTD": 3_384, "EuroSAT": 21_600, "SVHN": 65_931}
RECIPE_EPOCHS, RECIPE_BATCH, K_DEFAULT = 10, 128, 500


class _Logits(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """(model, input shape without batch, classes)."""
    if name == "mlp":
        return (
            nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)),
            (784,),
            10,
        )
    import transformers

    sizes = {"vit-tiny": (192, 6, 3, 64, 16), "vit-b32": (768, 12, 12, 224, 32)}
    hidden, layers, heads, image, patch = sizes[name]
    cfg = transformers.ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image,
        patch_size=patch,
        num_labels=10,
    )
    return _Logits(transformers.ViTForImageClassification(cfg)), (3, image, image), 10


def finetune_step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> list[float]:
    """Wall time of each of ``steps`` plain fine-tuning steps (CE on labels, clip 1.0, AdamW wd 0.1)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def condition_step_seconds(
    model: nn.Module, base: dict, ft: dict, x: torch.Tensor, steps: int, batch: int
) -> list[float]:
    """Wall time of each step of distac's real conditioning loop (``ConditionReport.step_seconds``)."""
    res = condition(
        model,
        base,
        ft,
        Inputs(x),
        mode="norm",
        kappa=0.5,
        steps=steps,
        batch_size=batch,
        warmup=0,
        device="cpu",
        progress=False,
        eval_examples=batch,
    )
    return res.report.step_seconds


def _cpu_per_step(run, n: int) -> float:
    t0 = time.process_time()
    run(n)
    t1 = time.process_time()
    run(2 * n)
    return ((time.process_time() - t1) - (t1 - t0)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mlp", "vit-tiny", "vit-b32"], default="vit-tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, shape, classes = build(a.model)
    n = max(4 * a.batch, 256)
    x, y = torch.randn(n, *shape), torch.randint(0, classes, (n,))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone() for k, v in base.items()}

    # interleaved blocks; the median over all steps (after each block's first) resists a shared, noisy machine
    ft_times, cd_times, ft_cpu, cd_cpu = [], [], [], []
    for _ in range(a.repeats):
        ft_times += finetune_step_seconds(model, x, y, a.steps + 1, a.batch)[1:]
        cd_times += condition_step_seconds(model, base, ft, x, a.steps + 1, a.batch)[1:]
        # CPU time (one thread) does not count waiting for a busy core: a second, steadier view.
        # Per step = (CPU of 2n steps − CPU of n steps) / n, so set-up and evaluation cancel.
        ft_cpu.append(_cpu_per_step(lambda k: finetune_step_seconds(model, x, y, k, a.batch), a.steps))
        cd_cpu.append(_cpu_per_step(lambda k: condition_step_seconds(model, base, ft, x, k, a.batch), a.steps))
    ft_step, cd_step = statistics.median(ft_times), statistics.median(cd_times)
    cpu_ratio = statistics.median(cd_cpu) / statistics.median(ft_cpu)
    ratio = cd_step / ft_step
    rows = {}
    for name, size in DATASETS.items():
        steps_per_epoch = math.ceil(size / RECIPE_BATCH)
        run_steps = RECIPE_EPOCHS * steps_per_epoch
        k = min(K_DEFAULT, RECIPE_EPOCHS * steps_per_epoch)
        rows[name] = {"finetune_steps": run_steps, "condition_steps": k, "fraction": k * ratio / run_steps}
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": a.model,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": a.batch,
        "finetune_step_s": ft_step,
        "condition_step_s": cd_step,
        "step_ratio": ratio,
        "cpu_time_per_step_s": {"finetune": statistics.median(ft_cpu), "condition": statistics.median(cd_cpu)},
        "cpu_step_ratio": cpu_ratio,
        "steps_timed": len(ft_times),
        "quartiles_s": {
            "finetune": statistics.quantiles(ft_times, n=4),
            "condition": statistics.quantiles(cd_times, n=4),
        },
        "cost_fraction": rows,
    }
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

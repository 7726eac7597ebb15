"""Fisher collection cost against one training epoch over the same examples (issue 3's benchmark).

For each model: time one epoch of plain training (forward + backward + AdamW step, batch B) over
N examples, then ``fisher_diagonal`` over the same N examples with the same B, for the
``sampled`` and ``exact`` estimators. Prints examples/s and the ratio
"Fisher over N examples / one training epoch over N examples" (target: ≤ 2×).

Usage::

    python benchmarks/bench_fisher.py [--n 512] [--batch-size 32] [--threads 2] [--repeats 3] [--json out.json]

Models are built here (no download): an MLP on flattened 28×28 inputs (10 classes) and a small
BERT (4 layers, hidden 128, vocabulary 2000, sequence 64, 2 classes) on random token ids, half of
each batch padded to 75% of the length.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn

from distac.models import forward_logits
from distac.stats import fisher_diagonal


def mlp() -> tuple[nn.Module, Callable[[int], Any], int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10))
    return model, lambda b: torch.randn(b, 784), 10


def tiny_bert(seq: int = 64) -> tuple[nn.Module, Callable[[int], Any], int]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # embeddings ≈ 25% of the parameters, close to BERT-base (21%): per-example gradients of an
    # embedding matrix are dense (B×V×d), so a toy-sized encoder under a large vocabulary would
    # measure mostly that
    cfg = BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=128, num_labels=2)
    model = BertForSequenceClassification(cfg)

    def batch(b: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(100, 2000, (b, seq))
        mask = torch.ones(b, seq, dtype=torch.long)
        mask[: b // 2, 3 * seq // 4 :] = 0  # half of the batch padded to 75% length
        return {"input_ids": ids, "attention_mask": mask}

    return model, batch, 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_epoch(model: nn.Module, batches: list, labels: list, device: torch.device) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    _sync(device)
    t = time.perf_counter()
    for x, y in zip(batches, labels, strict=True):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward_logits(model, x), y)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t


def fisher_time(model: nn.Module, batches: list, estimator: str, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fisher_diagonal(model, batches, estimator=estimator, device=device, progress=False)  # type: ignore[arg-type]
    _sync(device)
    return time.perf_counter() - t


def bench(name: str, build: Callable[[], tuple[nn.Module, Callable[[int], Any], int]], n: int, b: int,
          device: torch.device, repeats: int) -> dict[str, Any]:
    model, make, c = build()
    model.to(device)
    gen_batches = [make(b) for _ in range(n // b)]
    to = (lambda x: {k: v.to(device) for k, v in x.items()}) if isinstance(gen_batches[0], dict) else (
        lambda x: x.to(device))
    batches = [to(x) for x in gen_batches]
    labels = [torch.randint(0, c, (b,), device=device) for _ in batches]
    # warm-up (allocator, kernels, vmap tracing) on one batch each
    train_epoch(model, batches[:1], labels[:1], device)
    fisher_time(model, batches[:1], "sampled", device)
    fisher_time(model, batches[:1], "exact", device)
    # interleaved repeats, best of each: on a shared machine the minimum is the least-disturbed run
    t_train = t_sampled = t_exact = float("inf")
    for _ in range(repeats):
        t_train = min(t_train, train_epoch(model, batches, labels, device))
        t_sampled = min(t_sampled, fisher_time(model, batches, "sampled", device))
        t_exact = min(t_exact, fisher_time(model, batches, "exact", device))
    ex = len(batches) * b
    n_params = sum(p.numel() for p in model.parameters())
    row = {
        "model": name, "params": n_params, "repeats": repeats, "classes": c, "examples": ex, "batch_size": b,
        "train_epoch_s": round(t_train, 3), "train_ex_per_s": round(ex / t_train, 1),
        "sampled_s": round(t_sampled, 3), "sampled_ex_per_s": round(ex / t_sampled, 1),
        "exact_s": round(t_exact, 3), "exact_ex_per_s": round(ex / t_exact, 1),
        "ratio_sampled": round(t_sampled / t_train, 2), "ratio_exact": round(t_exact / t_train, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="examples (rounded down to whole batches)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,bert")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time of each is kept")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    builds = {"mlp": mlp, "bert": tiny_bert}
    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "python": platform.python_version(),
    }
    print(json.dumps(env), flush=True)
    rows = [bench(m, builds[m], args.n, args.batch_size, device, args.repeats) for m in args.models.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""What one text-suite grid cell costs, per method, without training a zoo.

The zoo is the pre-trained MiniLM with the zero-shot description heads plus, for every model the
three settings use, a copy perturbed by N(0, 1e-3²) noise: merges and evaluations cost the same as on
a trained zoo (the numbers are meaningless). Prints the time of one validation and one test pass of
the 8 tasks, the Fishers of 8 models, and per method the α-independent merge (``merge_fn``), one
``θ_0 + α·Δ`` and one validation pass. Usage (docs/results.md, "CPU time")::

    python docs/experiments/text_grid_costs.py [cpu|cuda] [method,method,...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from distac.reproduce import grid as G
from distac.reproduce import text as T
from distac.reproduce.per_task import per_task_cell
from distac.reproduce.sources import add_fishers
from distac.reproduce.zoo import Zoo, model_keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    prof = T.TEXT_PROFILE
    enc, tok = T._backbone()

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tok(texts, padding="max_length", truncation=True, max_length=T.MAX_LEN, return_tensors="pt")["input_ids"]

    tasks = T.load_text_tasks(tokenize, n_train=prof.n_train, n_val=prof.n_val, n_test=prof.n_test)
    sizes = {td.spec.name: td.spec.classes for td in tasks}
    model = T.TextClassifier(enc, tok.pad_token_id, sizes)
    T.zero_shot_text_heads(model, tokenize, T.TEXT_TASKS)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    models = {
        key: {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        for key in model_keys(prof, [td.spec.name for td in tasks])
    }

    def factory() -> torch.nn.Module:
        return T.TextClassifier(T._backbone()[0], tok.pad_token_id, sizes)

    zoo = Zoo(prof, 0, tasks, base, models, {}, Path("."), factory).to(dev)

    def timed(fn, *args, **kwargs):  # fn's result and seconds, device work included
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    ev = G.Evaluator.__new__(G.Evaluator)  # an evaluator without the ideal models' reference accuracies
    ev.zoo, ev.device, ev.tasks = zoo, torch.device(dev), tasks
    ev.model = zoo.model().to(dev)
    ev.ideal_val = ev.ideal_test = [1.0] * len(tasks)
    sd = zoo.setting("ideal")
    for split in ("val", "test"):
        print(f"eval {split}: {timed(ev.logits, base, sd, split)[1]:.2f}s", flush=True)
    s = G.SourceSet("ideal", "raw", sd, [], [1.0] * len(sd))
    specs = G.available_specs(only)
    if any(sp.fisher for sp in specs):
        print(f"fishers x8: {timed(add_fishers, s, zoo, ev, cache={}, progress=False)[1]:.1f}s", flush=True)
    for spec in specs:
        if spec.per_task:
            print(f"{spec.method}: cell {timed(per_task_cell, ev, spec, s, base=base)[1]:.1f}s", flush=True)
            continue
        fn, tm = timed(G.merge_fn, spec, base, s, None, ev.device)
        st, ta = timed(fn, 0.3)
        te = timed(ev.logits, st, sd, "val")[1]
        print(f"{spec.method}: merge_fn {tm:.1f}s, at(a) {ta:.2f}s, val eval {te:.2f}s", flush=True)


if __name__ == "__main__":
    main()

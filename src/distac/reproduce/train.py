"""Training loops of the suites: pre-training, task heads, fine-tuning, evaluation.

All loops are deterministic given their seed (a private ``torch.Generator`` on the CPU, which draws
every batch index and augmentation) and train in fp32 on the device the model is on: the CPU by
default (bit-reproducible), or CUDA (``distac reproduce --device``; same seeds, not the CPU's bits).
Heads are frozen during fine-tuning, as the CLIP zero-shot heads are in the DisTaC and task-vector
papers, so every task vector lives in the shared body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.optim import lr_factor
from .tasks import Split, TaskData
from .vit import TinyViT, ViTConfig, set_head

__all__ = [
    "Augment",
    "Recipe",
    "body_state",
    "evaluate",
    "finetune",
    "predict_logits",
    "pretrain",
    "probe_heads",
    "zero_shot_heads",
]

StateDict = dict[str, Tensor]
Progress = Callable[[Iterable[int], str], Iterable[int]]


def _no_progress(it: Iterable[int], _desc: str) -> Iterable[int]:
    return it


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning recipe: AdamW with linear warmup then cosine decay, clip 1.0, frozen heads."""

    lr: float = 5e-4
    steps: int = 150
    batch: int = 64
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    warmup: int = 10

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Augment:
    """Random per-image affine augmentation of pre-training: rotation ±``degrees``, zoom ×(1 ± ``scale``),
    x-shear ±``shear`` (uniform; all 0 = none, the upright-digit pre-training)."""

    degrees: float = 0.0
    scale: float = 0.0
    shear: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _random_affine(x: Tensor, g: torch.Generator, aug: Augment) -> Tensor:
    """Apply an independent random affine map (see :class:`Augment`) to every image of ``x`` (B, H, W)."""
    if aug.degrees == 0 and aug.scale == 0 and aug.shear == 0:
        return x
    b = len(x)
    u = torch.rand(3, b, generator=g) * 2 - 1  # uniform in [-1, 1]
    a = torch.deg2rad(u[0] * aug.degrees)
    s = 1 + u[1] * aug.scale
    sh = u[2] * aug.shear
    zero = torch.zeros(b)
    # grid_sample maps output to input coordinates, hence the inverse zoom (as tasks._affine)
    theta = (
        torch.stack([torch.stack([a.cos(), -a.sin() + sh, zero], -1), torch.stack([a.sin(), a.cos(), zero], -1)], 1)
        / s[:, None, None]
    )
    grid = F.affine_grid(theta, [b, 1, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x[:, None], grid, align_corners=False)[:, 0]


def _shift(x: Tensor, g: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (one shift per batch; cheap augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(x, (dy, dx), (1, 2))


def pretrain(
    cfg: ViTConfig,
    data: Split,
    *,
    steps: int,
    lr: float = 1e-3,
    batch: int = 128,
    seed: int = 0,
    augment: Augment | None = None,
    progress: Progress = _no_progress,
    device: torch.device | str = "cpu",
) -> StateDict:
    """Pre-train the body on digits (CE, shifts, optional random affine maps); returns the body and digit head.

    The model is initialised on the CPU (the same weights for every device) and trained on ``device``;
    the returned tensors stay there.

    The digit head is returned as ``heads.pretrain_digit.*``: it is the semantic space the task heads
    are built from (:func:`zero_shot_heads`) and the head gradient matching needs for H_0.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyViT(cfg, {"digit": 10}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    n = len(data.x)
    model.train()
    for step in progress(range(steps), "pre-train"):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps=steps, warmup=max(1, steps // 20))
        i = torch.randint(0, n, (batch,), generator=g)
        x = _shift(data.x[i], g)
        if augment is not None:
            x = _random_affine(x, g, augment)
        loss = F.cross_entropy(model(x.to(device)), data.y[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    state = body_state(model)
    state.update(
        {
            k.replace("heads.digit.", "heads.pretrain_digit."): v.detach().clone()
            for k, v in model.state_dict().items()
            if k.startswith("heads.digit.")
        }
    )
    return state


@torch.no_grad()
def zero_shot_heads(model: TinyViT, tasks: list[TaskData], digit_head: Tensor) -> None:
    """Build each task's head from the pre-training digit head, without looking at task data (in place).

    The row of class c is the mean of the digit-head rows of the digits that the task's label map
    sends to c (a digit task copies the digit head; parity averages the even and the odd rows). This
    is the role of CLIP's zero-shot head, the setting of the DisTaC paper: a head in the pre-trained
    semantic space, not fitted to the task, that fine-tuning (heads frozen) aligns the features to.
    A fitted linear probe would instead absorb most of what fine-tuning learns: with probe heads
    the pre-trained model scored as well as every merge (docs/results.md).

    With a cosine head (``model.cfg.cosine_head``) the digit rows are normalised, averaged, and each
    average normalised again, as CLIP does with a class's prompt embeddings: the head then scores
    cos(f, mean direction), and a mean of unit vectors (shorter than 1) does not shrink the logits.
    """
    digits = torch.arange(digit_head.shape[0])
    cosine = bool(getattr(model.cfg, "cosine_head", False))
    if cosine:
        digit_head = F.normalize(digit_head, dim=-1)
    for td in tasks:
        cls = td.spec.label(digits)
        rows = torch.stack([digit_head[(cls == c).to(digit_head.device)].mean(0) for c in range(td.spec.classes)])
        if cosine:
            rows = F.normalize(rows, dim=-1)
        cast(nn.Linear, model.heads[td.spec.name]).weight.copy_(rows)


def body_state(model: TinyViT) -> StateDict:
    """The model's state dict without any head (a cloned, detached copy)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("heads.")}


@torch.no_grad()
def _features(model: TinyViT, x: Tensor, chunk: int = 1024) -> Tensor:
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model.features(x[i : i + chunk].to(dev)) for i in range(0, len(x), chunk)])


def probe_heads(model: TinyViT, tasks: list[TaskData], *, steps: int = 300, lr: float = 0.05, seed: int = 0) -> None:
    """Fit each task's head as a linear probe on the frozen body's features (in place).

    This plays the role of CLIP's zero-shot head: a head that works on the pre-trained features and
    stays frozen afterwards. Full-batch Adam on CE(s·W f); features are computed once. The text
    suite uses it (MiniLM has no pre-training classification head to build zero-shot heads from).
    """
    torch.manual_seed(seed)
    for td in tasks:
        x, y = td.train.x, td.train.y
        feats = _features(model, x)
        y = y.to(feats.device)
        head = model.heads[td.spec.name]
        with torch.enable_grad():
            opt = torch.optim.Adam(head.parameters(), lr=lr)
            for _ in range(steps):
                loss = F.cross_entropy(model.logits(feats, td.spec.name), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()


def finetune(
    model: TinyViT,
    td: TaskData,
    recipe: Recipe,
    *,
    seed: int,
    progress: Progress = _no_progress,
) -> StateDict:
    """Fine-tune the body on one task with its frozen head; returns the full state dict θ_t (on the model's device)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    set_head(model, td.spec.name)
    body = [p for k, p in model.named_parameters() if not k.startswith("heads.")]
    for k, p in model.named_parameters():
        p.requires_grad_(not k.startswith("heads."))
    opt = torch.optim.AdamW(body, lr=recipe.lr, weight_decay=recipe.weight_decay)
    n = len(td.train.x)
    dev = next(model.parameters()).device
    model.train()
    for step in progress(range(recipe.steps), f"fine-tune {td.spec.name}"):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(step, steps=recipe.steps, warmup=recipe.warmup)
        i = torch.randint(0, n, (recipe.batch,), generator=g)
        x, y = td.train.x[i].to(dev), td.train.y[i].to(dev)
        loss = F.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(body, 1.0)
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict_logits(model: TinyViT, task: str, x: Tensor, *, chunk: int = 1024) -> Tensor:
    """Logits of ``task``'s head on inputs ``x`` (eval mode, chunked on the model's device), on the CPU."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat(
        [model.logits(model.features(x[i : i + chunk].to(dev)), task) for i in range(0, len(x), chunk)]
    ).cpu()


def evaluate(model: TinyViT, task: str, split: Split) -> float:
    """Top-1 accuracy of ``task``'s head on a split."""
    return float((predict_logits(model, task, split.x).argmax(-1) == split.y).float().mean())

"""A tiny Vision Transformer in plain torch (no torchvision), sized for CPU experiments.

The layout follows ViT (Dosovitskiy et al., ICLR 2021) with pre-norm blocks. The classification
head mimics CLIP's zero-shot head, the setting of the DisTaC paper: the class token is
L2-normalised and multiplied by a fixed logit scale before a per-task linear head. Because the
feature norm is fixed, a fine-tuned body can only change its confidence by changing the feature
geometry (cosine margins), not by inflating one gain, which is what makes label smoothing leave a
trace in the task vector (distac.md §1.2 "bounded logits").

With ``cosine_head`` the class rows are unit-norm too, as CLIP's text embeddings are, so every
logit is ``logit_scale · cos(f, w_c)`` and lies in [−s, s]: the head's scale is exactly the logit
scale, whatever the rows' norms (averaged zero-shot rows are shorter than their parts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HEAD_PATTERN", "TinyViT", "ViTConfig", "head_name", "set_head"]

# every task's head lives under "heads.<task>."; distac.merge gets this pattern via heads=[...]
HEAD_PATTERN = "heads.*"


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of :class:`TinyViT` (defaults: about 1M parameters on 28×28 digits)."""

    image: int = 28
    patch: int = 7
    dim: int = 128
    depth: int = 5
    heads: int = 4
    mlp: int = 4
    logit_scale: float = 20.0
    # unit-norm class rows (a cosine classifier, CLIP's head): logits = scale · cos(f, w_c)
    cosine_head: bool = False

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp * dim)
        self.fc2 = nn.Linear(mlp * dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def head_name(task: str) -> str:
    """State-dict prefix of one task's head (matches :data:`HEAD_PATTERN`)."""
    return f"heads.{task}"


class TinyViT(nn.Module):
    """ViT body shared by all tasks plus one cosine head per task.

    ``forward(x)`` uses the head selected with :func:`set_head` (``model.active``), so the model is
    a plain ``x -> logits`` classifier for distac's data-driven functions.
    """

    def __init__(self, cfg: ViTConfig, tasks: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        n = (cfg.image // cfg.patch) ** 2
        self.patch = nn.Linear(cfg.patch * cfg.patch, cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.dim, c, bias=False) for t, c in tasks.items()})
        self.active = next(iter(tasks))

    def features(self, x: Tensor) -> Tensor:
        """Unit-norm class-token features, shape (B, dim), for images (B, H, W) in [0, 1]."""
        p = self.cfg.patch
        b = x.shape[0]
        tokens = x.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch(tokens)], 1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return F.normalize(self.ln(h[:, 0]), dim=-1)

    def logits(self, feats: Tensor, task: str) -> Tensor:
        """Logits of one task's head: s·W f, with the fixed CLIP-like scale s and unit-norm f.

        With ``cfg.cosine_head`` the rows of W are normalised first (s·cos(f, w_c)).
        """
        w = cast(nn.Linear, self.heads[task]).weight
        if self.cfg.cosine_head:
            w = F.normalize(w, dim=-1)
        return self.cfg.logit_scale * F.linear(feats, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x), self.active)


def set_head(model: TinyViT, task: str, *, choices: Sequence[str] | None = None) -> TinyViT:
    """Select the head ``forward`` uses; returns the model for chaining."""
    if task not in model.heads:
        raise KeyError(f"no head for task '{task}' (have {sorted(model.heads)})")
    model.active = task
    return model

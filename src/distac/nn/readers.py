"""File readers behind :func:`distac.nn.data.load_inputs`: one per format, each returning the raw values
(texts, images or an array) and the raw labels, plus the label parser.

Every expected failure of a file (not UTF-8, malformed CSV/JSONL, a corrupt, empty, 0-d or pickled
``.npy``, a fractional label) is one :class:`~distac.errors.DistacError` naming the file and, when
known, the line or row. Nothing is ever unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DistacError

__all__ = ["Raw", "labels_tensor", "load_npy", "read_utf8", "reader_for"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_TEXT_COLUMNS = ("text", "sentence", "content", "review")
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_NPZ_INPUTS = ("x", "inputs", "input", "data", "X")
_LABEL_COLUMNS = ("label", "labels", "y", "target")


@dataclass
class Raw:
    """What a reader found before tokenisation: texts, images (PIL), or an array."""

    values: list[Any] | np.ndarray
    labels: Sequence[Any] | np.ndarray | None
    kind: str  # "text", "image" or "array"
    files: list[Path] | None = None  # image files, to name the culprit on a size mismatch
    lines: list[int] | None = None  # 1-based line of each example in a text file, to name a bad row

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


def read_utf8(p: Path, what: str = "data") -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DistacError(f"{what} '{p}': line {line} is not UTF-8 text ({e.reason}); save the file as UTF-8") from e
    except OSError as e:
        raise DistacError(f"{what} '{p}': cannot read it ({e.strerror or e})") from e


def load_npy(p: Path, what: str = "data") -> np.ndarray:
    """``np.load`` of a ``.npy`` without pickles; a corrupt, empty or pickled file is one error naming it."""
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickled" in str(e) or "allow_pickle" in str(e):
            raise DistacError(
                f"{what} '{p}' holds Python objects (a pickled object array); distac never unpickles data: "
                "save a numeric array instead"
            ) from e
        raise DistacError(f"{what} '{p}' is not a valid .npy file ({e})") from e
    except (OSError, EOFError) as e:
        detail = "the file is empty" if p.stat().st_size == 0 else str(e)
        raise DistacError(f"{what} '{p}' is not a valid .npy file ({detail})") from e
    if not isinstance(arr, np.ndarray):
        raise DistacError(f"{what} '{p}' is not a .npy array (it looks like an .npz archive)")
    if arr.ndim == 0:
        raise DistacError(f"{what} '{p}' holds a single value (a 0-d array); expected one example per row")
    return arr


def reader_for(p: Path) -> Callable[..., Raw]:
    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _read_hf_dataset
        return _read_image_folder
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise DistacError(
            f"data '{p}': unknown format '{p.suffix}' (expected one of {sorted(_READERS)}, an image folder "
            "or a dataset saved with datasets.save_to_disk)"
        )
    return reader


def _read_lines(p: Path, **_: Any) -> Raw:
    rows = [(n, line) for n, line in enumerate(read_utf8(p).splitlines(), 1) if line.strip()]
    return Raw([v for _, v in rows], None, "text", lines=[n for n, _ in rows])


def _pick(name: str | None, available: Sequence[str], defaults: Sequence[str], what: str, p: Path) -> str | None:
    if name is not None:
        if name not in available:
            raise DistacError(f"data '{p}': no {what} '{name}' (available: {list(available)})")
        return name
    return next((d for d in defaults if d in available), None)


def _read_table(p: Path, *, column: str | None, label_column: str | None, **_: Any) -> Raw:
    text = read_utf8(p)
    rows, lines = _jsonl_rows(text, p) if p.suffix.lower() == ".jsonl" else _csv_rows(text, p)
    if not rows:
        raise DistacError(f"data '{p}' is empty: no rows")
    cols = list(rows[0].keys())
    # a label/labels/y/target column is read as labels by default, as in .npz and saved datasets: without
    # it, `tune` silently scored a labelled CSV by entropy and `diagnose` left out accuracy and ECE
    lab = _pick(label_column, cols, _LABEL_COLUMNS, "label column", p)
    others = [c for c in cols if c != lab]
    col = _pick(column, cols, _TEXT_COLUMNS, "column", p) or (others[0] if len(others) == 1 else None)
    if col is None:
        raise DistacError(
            f"data '{p}': say which column holds the inputs with --column (`column:` in a tune config; columns: {cols})"
        )
    for i, r in enumerate(rows):
        if col not in r or (lab and lab not in r):
            raise DistacError(f"data '{p}': line {lines[i]} has no '{col if col not in r else lab}' field")
    return Raw([r[col] for r in rows], [r[lab] for r in rows] if lab else None, "text", lines=lines)


def _jsonl_rows(text: str, p: Path) -> tuple[list[dict[str, Any]], list[int]]:
    rows, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistacError(f"data '{p}': line {n} is not valid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(row, dict):
            raise DistacError(f"data '{p}': line {n} is a JSON {type(row).__name__}, expected an object {{...}}")
        rows.append(row)
        lines.append(n)
    return rows, lines


def _csv_rows(text: str, p: Path) -> tuple[list[dict[str, Any]], list[int]]:
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    rows, lines = [], []
    try:
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DistacError(f"data '{p}': line {reader.line_num + 1} cannot be read as CSV ({e})") from e
    return rows, lines


def _read_npy(p: Path, **_: Any) -> Raw:
    return Raw(load_npy(p), None, "array")


def _read_npz(p: Path, *, column: str | None, label_column: str | None, **_: Any) -> Raw:
    import zipfile

    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.keys())
            lab = _pick(label_column, keys, _LABEL_COLUMNS, "label array", p)
            rest = [k for k in keys if k != lab]
            col = _pick(column, keys, _NPZ_INPUTS, "array", p) or (rest[0] if len(rest) == 1 else None)
            if col is None:
                raise DistacError(
                    f"data '{p}': say which array holds the inputs with --column "
                    f"(`column:` in a tune config; arrays: {keys})"
                )
            x, y = z[col], (z[lab] if lab else None)
    except ValueError as e:
        raise DistacError(f"data '{p}': an array cannot be read without unpickling ({e}); save numeric arrays") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DistacError(f"data '{p}' is not a valid .npz archive ({e})") from e
    if x.ndim == 0:
        raise DistacError(f"data '{p}': array '{col}' holds a single value (0-d); expected one example per row")
    return Raw(x, y, "array")


def _read_image_folder(p: Path, **_: Any) -> Raw:
    from PIL import Image

    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DistacError(f"data '{p}' is empty: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) below it")
    classes = sorted({f.parent.relative_to(p).parts[0] for f in files if f.parent != p})
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise DistacError(f"cannot read image '{f}': {e}") from e
    labels = None
    if classes and all(f.parent != p for f in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[f.parent.relative_to(p).parts[0]] for f in files]
    return Raw(images, labels, "image", files)


def _read_hf_dataset(p: Path, *, column: str | None, label_column: str | None, split: str | None, **_: Any) -> Raw:
    try:
        import datasets
    except ImportError as e:
        raise DistacError(
            f"data '{p}' is a saved Hugging Face dataset; reading it needs the 'datasets' package: pip install datasets"
        ) from e
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        name = split or ("train" if "train" in ds else None)
        if name not in ds:
            raise DistacError(f"data '{p}' has splits {names}; choose one with split=")
        ds = ds[name]
    cols = list(ds.column_names)
    lab = _pick(label_column, cols, _LABEL_COLUMNS, "label column", p)
    col = _pick(column, cols, _TEXT_COLUMNS + _IMAGE_COLUMNS, "column", p)
    if col is None:
        raise DistacError(
            f"data '{p}': say which column holds the inputs with --column (`column:` in a tune config; columns: {cols})"
        )
    values: list[Any] | np.ndarray = list(ds[col])
    first = values[0] if len(values) else None
    kind = "text" if isinstance(first, str) else "image" if hasattr(first, "convert") else "array"
    if kind == "array":
        values = np.asarray(values)
    elif kind == "image":
        values = [v.convert("RGB") for v in values]
    return Raw(values, list(ds[lab]) if lab else None, kind)


_READERS: dict[str, Callable[..., Raw]] = {
    ".txt": _read_lines,
    ".csv": _read_table,
    ".tsv": _read_table,
    ".jsonl": _read_table,
    ".npy": _read_npy,
    ".npz": _read_npz,
}


def labels_tensor(
    values: Sequence[Any] | np.ndarray, p: Path, where: Callable[[int], str] = lambda i: f"row {i}"
) -> Tensor:
    """Integer class ids; a fractional, non-finite, non-numeric or negative label is an error naming its row."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
    elif arr.dtype.kind == "f":
        ok = np.isfinite(arr) & (arr == np.round(arr))
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise DistacError(
                f"labels of '{p}': {where(i)} holds {arr[i]!r}; "
                "labels must be integer class ids (distac never rounds them)"
            )
        out = arr.astype(np.int64)
    else:
        out = np.asarray([_one_label(v, i, p, where) for i, v in enumerate(arr.tolist())], dtype=np.int64)
    if out.size and out.min() < 0:
        i = int(np.flatnonzero(out < 0)[0])
        raise DistacError(f"labels of '{p}' must be >= 0, found {int(out[i])} at {where(i)}")
    return torch.from_numpy(out)


def _one_label(v: Any, i: int, p: Path, where: Callable[[int], str]) -> int:
    text = str(v).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        f = math.nan
    if math.isfinite(f) and f.is_integer():
        return int(f)
    raise DistacError(
        f"labels of '{p}': {where(i)} holds {v!r}; labels must be integer class ids (distac never rounds them)"
    )

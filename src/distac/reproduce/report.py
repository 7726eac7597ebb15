"""Tables (markdown + CSV) and plots (PNG) of a reproduce run.

Everything is written to ``<out>/`` through temporary names renamed on completion. Numbers are
percentages; "norm." is normalised accuracy (merged ÷ ideal fine-tuned accuracy, per task, averaged).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import write_text
from .grid import CellResult, SourceSet

__all__ = ["COLUMNS", "by_key", "mean_sd", "targets", "write_csv", "write_text"]

# the headline table's columns: (setting, source)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("ideal", "raw"),
    ("ideal", "distac"),
    ("norm", "raw"),
    ("norm", "rescaled"),
    ("norm", "distac"),
    ("conf", "raw"),
    ("conf", "distac"),
)
# naive rescaling under low confidence is κ = 1 (distac.md §1.4): the raw models themselves, so it
# has no column of its own.
_COL_TITLE = {
    ("ideal", "raw"): "ideal",
    ("ideal", "distac"): "ideal + DisTaC",
    ("norm", "raw"): "norm mismatch",
    ("norm", "rescaled"): "+ naive rescale",
    ("norm", "distac"): "+ DisTaC",
    ("conf", "raw"): "low confidence",
    ("conf", "distac"): "+ DisTaC",
}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float]) -> str:
    m, sd = mean_sd(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f}±{sd:.1f}"


def by_key(cells: Sequence[CellResult]) -> dict[tuple[str, str, str], list[CellResult]]:
    out: dict[tuple[str, str, str], list[CellResult]] = {}
    for c in cells:
        out.setdefault((c.label, c.setting, c.source), []).append(c)
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def headline_table(cells: Sequence[CellResult], labels: Sequence[str]) -> str:
    """Method × column: mean test accuracy (normalised accuracy), mean ± sd over seeds."""
    return _method_by_column(
        cells, labels, lambda cs: f"{_fmt([c.mean_acc for c in cs])} ({_fmt([c.mean_norm for c in cs])})"
    )


def _method_by_column(
    cells: Sequence[CellResult], labels: Sequence[str], fmt: Callable[[list[CellResult]], str]
) -> str:
    """A method × (setting, source) markdown table; ``fmt`` renders one cell's results over seeds."""
    by = by_key(cells)
    rows = []
    for lab in labels:
        row = [lab]
        for setting, source in COLUMNS:
            cs = by.get((lab, setting, source))
            row.append(fmt(cs) if cs else "–")
        rows.append(row)
    return _md_table(["method", *(_COL_TITLE[c] for c in COLUMNS)], rows)


def ece_table(cells: Sequence[CellResult], labels: Sequence[str]) -> str:
    """Method × column: mean test ECE (%) before → after per-task temperature scaling."""
    return _method_by_column(
        cells,
        labels,
        lambda cs: (
            f"{_fmt([100 * statistics.fmean(c.ece_before) for c in cs])} → "
            f"{_fmt([100 * statistics.fmean(c.ece_after) for c in cs])}"
        ),
    )


def alpha_table(cells: Sequence[CellResult], labels: Sequence[str]) -> str:
    """The α selected on validation per cell (seed 0's, then the others)."""
    return _method_by_column(cells, labels, lambda cs: "/".join(f"{c.alpha:g}" for c in cs))


def sources_table(sources: Sequence[tuple[SourceSet, list[float]]], names: Sequence[str]) -> str:
    """Per source set: ‖τ_t‖ and the model's own test accuracy per task (seed 0)."""
    rows = []
    for s, own in sources:
        rows.append([f"{s.setting}/{s.source}", "‖τ‖", *(f"{v:.2f}" for v in s.norms)])
        rows.append(["", "own acc", *(f"{100 * v:.1f}" for v in own)])
    return _md_table(["setting/source", "", *names], rows)


def sweep_table(sweeps: Mapping[str, list[list[tuple[float, float, float]]]]) -> str:
    """α × method: mean test accuracy (normalised) of the sensitivity experiment."""
    labels = list(sweeps)
    alphas = [a for a, _, _ in sweeps[labels[0]][0]]
    rows = []
    for i, a in enumerate(alphas):
        row = [f"{a:g}"]
        for lab in labels:
            acc = [s[i][1] for s in sweeps[lab]]
            nrm = [s[i][2] for s in sweeps[lab]]
            row.append(f"{_fmt(acc)} ({_fmt(nrm)})")
        rows.append(row)
    spread = ["max − min"]
    for lab in labels:
        spread.append(_fmt([max(p[1] for p in s) - min(p[1] for p in s) for s in sweeps[lab]]))
    rows.append(spread)
    return _md_table(["α", *labels], rows)


def _target(name: str, measured: Any, threshold: Any, gap: float | None) -> dict[str, Any]:
    return {"target": name, "measured": measured, "threshold": threshold, "gap": None if gap is None else round(gap, 1)}


def _harm_and_recovery_targets(norm: Callable[[str, str, str], float | None], labels: Sequence[str]) -> list[dict]:
    """Defect costs (TA, TIES, TSV-M), DisTaC vs ideal and vs naive rescaling, and DisTaC on the ideal zoo."""
    out = []
    for lab in ("TA", "TIES", "TSV-M"):
        for setting in ("norm", "conf"):
            ideal, raw = norm(lab, "ideal", "raw"), norm(lab, setting, "raw")
            if ideal is not None and raw is not None:
                out.append(
                    _target(
                        f"{lab}: {setting} setting costs ≥ 5 points of norm. acc.",
                        round(ideal - raw, 1),
                        5.0,
                        ideal - raw - 5.0,
                    )
                )
    for lab in labels:
        ideal = norm(lab, "ideal", "raw")
        for setting in ("norm", "conf"):
            dis, res = norm(lab, setting, "distac"), norm(lab, setting, "rescaled")
            if ideal is None or dis is None:
                continue
            out.append(
                _target(
                    f"{lab}/{setting}: DisTaC within 2 points of ideal", round(ideal - dis, 1), 2.0, 2.0 - (ideal - dis)
                )
            )
            if res is not None:
                out.append(
                    _target(f"{lab}/{setting}: DisTaC beats naive rescaling", round(dis - res, 1), 0.0, dis - res)
                )
        dis = norm(lab, "ideal", "distac")
        if ideal is not None and dis is not None:
            out.append(
                _target(
                    f"{lab}/ideal: DisTaC on the ideal zoo costs < 2 points",
                    round(ideal - dis, 1),
                    2.0,
                    2.0 - (ideal - dis),
                )
            )
    return out


def _column_means(
    by: Mapping[tuple[str, str, str], list[CellResult]], labels: Sequence[str], setting: str, source: str
) -> list[float]:
    """Per seed: the mean over methods of the normalised accuracy in one column (methods with every seed)."""
    runs = [by[(lab, setting, source)] for lab in labels if (lab, setting, source) in by]
    if not runs:
        return []
    n = min(len(r) for r in runs)
    return [statistics.fmean(r[i].mean_norm for r in runs) for i in range(n)]


def _rescaling_target(by: Mapping[tuple[str, str, str], list[CellResult]], labels: Sequence[str]) -> list[dict]:
    """DisTaC beats naive rescaling (norm mismatch) on the mean over methods by more than one sd over seeds."""
    dis, res = _column_means(by, labels, "norm", "distac"), _column_means(by, labels, "norm", "rescaled")
    if not dis or not res:
        return []
    diff = statistics.fmean(dis) - statistics.fmean(res)
    if len(dis) < 2:
        return [
            _target(
                "mean over methods: DisTaC − naive rescaling > 1 sd (norm)", round(diff, 1), "sd needs ≥ 2 seeds", None
            )
        ]
    sd = max(statistics.stdev(dis), statistics.stdev(res))
    return [
        _target(
            "mean over methods: DisTaC − naive rescaling > 1 sd (norm)",
            f"{diff:.1f} (sd {sd:.1f})",
            "> 1 sd",
            diff - sd,
        )
    ]


def targets(
    cells: Sequence[CellResult],
    sweeps: Mapping[str, list[list[tuple[float, float, float]]]],
    base_norm: float | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, the threshold and the gap (negative = missed).

    ``base_norm``: mean normalised accuracy at α = 0 (the ideal TA's margin over the pre-trained model).
    Cells of one (method, setting, source) come in seed order.
    """
    by = by_key(cells)

    def norm(lab: str, setting: str, source: str) -> float | None:
        cs = by.get((lab, setting, source))
        return statistics.fmean(c.mean_norm for c in cs) if cs else None

    labels = list(dict.fromkeys(c.label for c in cells))
    out: list[dict[str, Any]] = []
    ta = norm("TA", "ideal", "raw")
    if ta is not None:
        out.append(_target("ideal TA keeps ≥ 70 % normalised", round(ta, 1), 70.0, ta - 70.0))
        if base_norm is not None:
            out.append(
                _target(
                    "ideal TA beats α = 0 by ≥ 10 points (norm.)", round(ta - base_norm, 1), 10.0, ta - base_norm - 10.0
                )
            )
    out += _harm_and_recovery_targets(norm, labels)
    out += _rescaling_target(by, labels)
    if "TA" in sweeps and "Gradient matching" in sweeps:

        def spread(lab: str) -> float:
            return statistics.fmean(max(p[1] for p in s) - min(p[1] for p in s) for s in sweeps[lab])

        ta_s, gm = spread("TA"), spread("Gradient matching")
        out.append(
            _target(
                "gradient matching varies less across α than TA (max − min of mean acc.)",
                f"GM {gm:.1f} vs TA {ta_s:.1f}",
                "GM < TA",
                ta_s - gm,
            )
        )
    return out


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return _md_table(
        ["target", "measured", "threshold", "gap (≥ 0 = met)"],
        [[str(r["target"]), str(r["measured"]), str(r["threshold"]), str(r["gap"])] for r in rows],
    )


def write_csv(path: Path, cells: Sequence[CellResult], names: Sequence[str], seeds: Sequence[int]) -> None:
    """One row per cell × task (plus a ``mean`` row): accuracy, normalised accuracy, ECE, T, α."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "seed",
            "method",
            "setting",
            "source",
            "alpha",
            "task",
            "test_acc",
            "test_norm_acc",
            "ece_before",
            "ece_after",
            "temperature",
        ]
    )
    for seed, c in zip(seeds, cells, strict=True):
        for i, n in enumerate(names):
            w.writerow(
                [
                    seed,
                    c.method,
                    c.setting,
                    c.source,
                    c.alpha,
                    n,
                    f"{c.test_acc[i]:.4f}",
                    f"{c.test_norm[i]:.4f}",
                    f"{c.ece_before[i]:.4f}",
                    f"{c.ece_after[i]:.4f}",
                    f"{c.temperatures[i]:.4f}",
                ]
            )
        w.writerow(
            [
                seed,
                c.method,
                c.setting,
                c.source,
                c.alpha,
                "mean",
                f"{c.mean_acc / 100:.4f}",
                f"{c.mean_norm / 100:.4f}",
                f"{statistics.fmean(c.ece_before):.4f}",
                f"{statistics.fmean(c.ece_after):.4f}",
                "",
            ]
        )
    write_text(path, buf.getvalue())

"""Tables (markdown + CSV) and plots (PNG) of a reproduce run.

Everything is written to ``<out>/`` through temporary names renamed on completion. Numbers are
percentages; "norm." is normalised accuracy (merged ÷ ideal fine-tuned accuracy, per task, averaged).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distac.nn.evaluate import reliability_diagram

from .grid import CellResult, SourceSet

__all__ = ["COLUMNS", "targets", "write_csv", "write_plots", "write_text"]

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


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float]) -> str:
    m, sd = _mean_sd(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f}±{sd:.1f}"


def _by_key(cells: Sequence[CellResult]) -> dict[tuple[str, str, str], list[CellResult]]:
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
    by = _by_key(cells)
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
    by = _by_key(cells)

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


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


_COLORS = {"raw": "#c44e52", "rescaled": "#dd8452", "distac": "#55a868"}
# the headline plot's bar groups: (setting, tick label, sources drawn as bars)
_GROUPS = (
    ("ideal", "ideal", ("distac",)),
    ("norm", "norm mismatch", ("raw", "rescaled", "distac")),
    ("conf", "low confidence", ("raw", "distac")),
)


def write_plots(
    out: Path,
    cells: Sequence[CellResult],
    sources: Sequence[tuple[SourceSet, list[float]]],
    sweeps: Mapping[str, list[list[tuple[float, float, float]]]],
    names: Sequence[str],
    labels_y: Mapping[str, Any],
    *,
    base_norm: float | None = None,
) -> list[str]:
    """headline.png (per method: ideal vs harmful vs DisTaC), norms.png, reliability.png, alpha.png.

    ``base_norm``: the α = 0 reference (pre-trained body with the task heads), drawn in the headline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (
        ("headline.png", lambda: _plot_headline(plt, cells, base_norm)),
        ("norms.png", lambda: _plot_norms(plt, sources, names)),
        ("reliability.png", lambda: _plot_reliability(plt, cells, names, labels_y)),
        ("alpha.png", lambda: _plot_alpha(plt, sweeps)),
    ):
        fig = draw()
        if fig is None:
            continue
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)
    return written


def _plot_headline(plt: Any, cells: Sequence[CellResult], base_norm: float | None) -> Any:
    """Per method: the ideal merge (dashed), α = 0 (dotted) and bars per setting and source."""
    by = _by_key(cells)
    labels = list(dict.fromkeys(c.label for c in cells))
    cols = 4
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, lab in zip(axes.flat, labels, strict=False):
        ideal = by.get((lab, "ideal", "raw"))
        if ideal:
            ax.axhline(statistics.fmean(c.mean_norm for c in ideal), color="#4c72b0", ls="--", label="ideal")
        if base_norm is not None:
            ax.axhline(base_norm, color="0.4", ls=":", label="pre-trained (α = 0)")
        ticks = []
        for j, (setting, title, srcs) in enumerate(_GROUPS):
            ticks.append((j * 4 + (len(srcs) - 1) / 2, title))
            for k, src in enumerate(srcs):
                cs = by.get((lab, setting, src))
                if cs:
                    mean = statistics.fmean(c.mean_norm for c in cs)
                    ax.bar(j * 4 + k, mean, color=_COLORS[src], label=src if setting == "norm" else None)
        ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=8)
        ax.set_title(lab)
        ax.set_ylabel("norm. acc. (%)")
        lo = min([c.mean_norm for c in cells if c.label == lab] + ([base_norm] if base_norm is not None else []))
        ax.set_ylim(max(0, lo - 10), 102)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    handles, names_ = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=len(names_), fontsize=8, frameon=False)
    fig.suptitle("Normalised test accuracy: ideal (dashed) vs harmful zoo, naive rescaling and DisTaC")
    fig.subplots_adjust(bottom=0.14)
    return fig


def _plot_norms(plt: Any, sources: Sequence[tuple[SourceSet, list[float]]], names: Sequence[str]) -> Any:
    """Task-vector norms of the harmful settings' source sets, with the ideal norms as ticks."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    ideal = next((s for s, _ in sources if (s.setting, s.source) == ("ideal", "raw")), None)
    for ax, setting in zip(axes, ("norm", "conf"), strict=True):
        sets = [s for s, _ in sources if s.setting == setting]
        width = 0.8 / max(1, len(sets))
        for k, s in enumerate(sets):
            ax.bar(
                [i + k * width for i in range(len(names))], s.norms, width, label=s.source, color=_COLORS.get(s.source)
            )
        if ideal:
            ax.plot(range(len(names)), ideal.norms, "k_", ms=14, label="ideal")
        ax.set_xticks(range(len(names)), names, rotation=40, fontsize=7)
        ax.set_ylabel("‖τ_t‖ (body)")
        ax.set_title(f"{setting}: task-vector norms before/after conditioning")
        ax.legend(fontsize=7)
    return fig


def _plot_reliability(
    plt: Any, cells: Sequence[CellResult], names: Sequence[str], labels_y: Mapping[str, Any]
) -> Any | None:
    """Reliability diagrams of each method's merged model, low-confidence setting, raw vs DisTaC."""
    seen: dict[tuple[str, str], CellResult] = {}
    for c in cells:
        if c.setting == "conf" and c.source in ("raw", "distac") and c.test_logits:
            seen.setdefault((c.label, c.source), c)
    if not seen:
        return None
    labels = list(dict.fromkeys(c.label for c in cells))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("raw sources", "raw", False),
        ("DisTaC sources", "distac", False),
        ("DisTaC sources, temperature-scaled", "distac", True),
    )
    for ax, (title, src, calibrated) in zip(axes, panels, strict=True):
        for lab in labels:
            cell = seen.get((lab, src))
            if cell is None:
                continue
            # heads have different class counts, so bin each task's max-prob and pool the bins
            temps = cell.temperatures if calibrated else [1.0] * len(names)
            d = _pooled_diagram(cell.test_logits, [labels_y[n] for n in names], temps)
            ax.plot(d[0], d[1], "o-", ms=3, label=lab)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"low confidence: {title}", fontsize=9)
    axes[0].legend(fontsize=7)
    return fig


def _plot_alpha(plt: Any, sweeps: Mapping[str, list[list[tuple[float, float, float]]]]) -> Any | None:
    """Mean test accuracy against α on the ideal zoo (the sensitivity experiment)."""
    if not sweeps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, runs in sweeps.items():
        alphas = [a for a, _, _ in runs[0]]
        ys = [statistics.fmean(r[i][1] for r in runs) for i in range(len(alphas))]
        ax.plot(alphas, ys, "o-", label=lab)
    ax.set_xlabel("α (scaling coefficient)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("Sensitivity to α (ideal zoo)")
    ax.legend()
    return fig


def _pooled_diagram(logits: Sequence[Any], labels: Sequence[Any], temps: Sequence[float]) -> tuple[list, list]:
    """Reliability curve pooled over tasks: per-bin confidence and accuracy weighted by bin counts."""
    conf_sum: list[float] | None = None
    acc_sum: list[float] = []
    cnt: list[float] = []
    for z, y, t in zip(logits, labels, temps, strict=True):
        d = reliability_diagram(z, y, temperature=t)
        if conf_sum is None:
            conf_sum, acc_sum, cnt = [0.0] * len(d["count"]), [0.0] * len(d["count"]), [0.0] * len(d["count"])
        for b, (c, a, n) in enumerate(zip(d["confidence"], d["accuracy"], d["count"], strict=True)):
            conf_sum[b] += c * n
            acc_sum[b] += a * n
            cnt[b] += n
    assert conf_sum is not None
    xs = [c / n for c, n in zip(conf_sum, cnt, strict=True) if n > 0]
    ys = [a / n for a, n in zip(acc_sum, cnt, strict=True) if n > 0]
    return xs, ys

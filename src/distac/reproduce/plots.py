"""The reproduce suites' plots: headline bars, task-vector norms, reliability diagrams, accuracy against α."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distac.io.atomic import atomic_file
from distac.nn.evaluate import reliability_diagram

from .grid import CellResult, SourceSet
from .report import by_key

__all__ = ["write_plots"]


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


_COLORS = {"raw": "#c44e52", "rescaled": "#dd8452", "distac": "#55a868"}
# the headline plot's bar groups: (setting, tick label, sources drawn as bars); the ideal zoo's raw
# merge is the dashed line, its bar the DisTaC control
_GROUPS = (
    ("ideal", "ideal", ("distac",)),
    ("norm", "norm", ("raw", "rescaled", "distac")),
    ("conf", "conf.", ("raw", "distac")),
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
    by = by_key(cells)
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
        ax.set_title(lab, fontsize=10)
        if ax in axes[:, 0]:
            ax.set_ylabel("norm. acc. (%)")
        lo = min([c.mean_norm for c in cells if c.label == lab] + ([base_norm] if base_norm is not None else []))
        ax.set_ylim(max(0, lo - 10), 102)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    handles, names_ = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=len(names_), fontsize=8, frameon=False)
    fig.suptitle(
        "Normalised test accuracy: ideal merge (dashed) vs norm mismatch and low confidence, raw, naive "
        "rescaling and DisTaC; 'ideal' bar = the ideal zoo conditioned by DisTaC"
    )
    fig.subplots_adjust(bottom=0.1, hspace=0.35, wspace=0.2)
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

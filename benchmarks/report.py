"""Tables and a plot from ``bench_merge.py`` results (JSON lines), for docs/performance.md.

Per (checkpoint set, N, method family, tool): the median over the interleaved repetitions of wall
time, durable time (wall + fdatasync of the output), peak RSS of the process tree, block I/O read
and written; the ratio of durable time to the I/O bound measured in the same session; and, for
the anchors, their median wall time over distac's in the same family (> 1: distac is faster).

Usage: ``python benchmarks/report.py RESULTS.jsonl [...] --plot docs/performance.png``
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

TOOLS = ("distac", "mergekit", "fusionbench")


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        g[(Path(r["data"]).name, r["n"], r["family"], r["tool"])].append(r)
    return g


def _med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _fix_sidecar_bound(r: dict) -> dict:
    """Gradient matching also reads N fp32 Fisher sidecars: add them to the run's read bound."""
    if r["family"] != "gradient_matching" or r.get("bound_includes_sidecars"):
        return r
    extra = r["n"] * r["params"] * 4 / (1 << 20) / r["disk_read_mb_s"]
    return {**r, "bound_s": r["bound_s"] + extra, "bound_includes_sidecars": True}


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (data, N, family, tool) with medians, ratios and failures spelled out."""
    g = group([_fix_sidecar_bound(r) for r in rows])
    out = []
    for (data, n, family, tool), rs in sorted(
        g.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], TOOLS.index(kv[0][3]))
    ):
        ok = [r for r in rs if r["rc"] == 0 and not r["killed"]]
        line = {
            "data": data,
            "n": n,
            "family": family,
            "tool": tool,
            "runs": len(rs),
            "ok": len(ok),
            "failure": "; ".join(sorted({r["killed"] or f"exit {r['rc']}" for r in rs if r not in ok})),
            "bound_s": rs[0]["bound_s"],
            "rss_target_mb": rs[0]["rss_target_mb"],
            "disk": f"{rs[0]['disk_read_mb_s']:.0f}/{rs[0]['disk_write_mb_s']:.0f}",
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
        if ok:
            line.update(
                wall_s=_med(ok, "wall_s"),
                durable_s=statistics.median(r["wall_s"] + r["flush_s"] for r in ok),
                read_mb=_med(ok, "read_mb"),
                write_mb=_med(ok, "write_mb"),
                rchar_mb=_med(ok, "rchar_mb"),
                cpu_s=_med(ok, "cpu_s"),
                walls=[r["wall_s"] for r in ok],
            )
            # each run has its own bound (disk throughput measured right before it): ratio per run, then median
            line["x_bound"] = statistics.median((r["wall_s"] + r["flush_s"]) / r["bound_s"] for r in ok)
            line["bound_s"] = _med(ok, "bound_s")
            line["disk"] = f"{_med(ok, 'disk_read_mb_s'):.0f}/{_med(ok, 'disk_write_mb_s'):.0f}"
        out.append(line)
    for line in out:
        ref = next(
            (
                x
                for x in out
                if x["tool"] == "distac"
                and x["family"] == line["family"]
                and x["data"] == line["data"]
                and x["n"] == line["n"]
                and "wall_s" in x
            ),
            None,
        )
        if ref and "wall_s" in line and line["tool"] != "distac":
            line["vs_distac"] = line["wall_s"] / ref["wall_s"]
            line["cpu_vs_distac"] = line["cpu_s"] / ref["cpu_s"]
    return out


def markdown(summary: list[dict]) -> str:
    head = (
        "| checkpoints | N | method | tool | wall s (each run) | CPU s | wall+flush s | × I/O bound | "
        "disk read/write MB/s | peak RSS MB (target) | read_bytes / rchar / written MB | "
        "anchor ÷ distac: wall (CPU) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for s in summary:
        if "wall_s" not in s:
            lines.append(
                f"| {s['data']} | {s['n']} | {s['family']} | {s['tool']} | failed: {s['failure']} | | | | | "
                f"{s['peak_rss_mb']:.0f} ({s['rss_target_mb']:.0f}) | | |"
            )
            continue
        walls = ", ".join(f"{w:.1f}" for w in s["walls"])
        vs = f"{s['vs_distac']:.2f}× ({s['cpu_vs_distac']:.2f}×)" if "vs_distac" in s else ""
        lines.append(
            f"| {s['data']} | {s['n']} | {s['family']} | {s['tool']} | **{s['wall_s']:.1f}** ({walls}) | "
            f"{s['cpu_s']:.1f} | "
            f"{s['durable_s']:.1f} | {s['x_bound']:.2f} (bound {s['bound_s']:.1f} s) | {s['disk']} | "
            f"{s['peak_rss_mb']:.0f} ({s['rss_target_mb']:.0f}) | "
            f"{s['read_mb']:.0f} / {s['rchar_mb']:.0f} / {s['write_mb']:.0f} | {vs} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Grouped bars: wall time per method family and tool, one panel per checkpoint set; I/O bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({(s["data"], s["n"]) for s in summary})
    cols = min(2, len(sets))
    nrows = -(-len(sets) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(sets) :]:
        ax.set_visible(False)
    colors = {"distac": "#1b9e77", "mergekit": "#d95f02", "fusionbench": "#7570b3"}
    for ax, (data, n) in zip(axes.flat, sets, strict=False):
        rows = [s for s in summary if s["data"] == data and s["n"] == n]
        fams = list(dict.fromkeys(s["family"] for s in rows))
        width = 0.8 / len(TOOLS)
        labelled: set[str] = set()
        for j, tool in enumerate(TOOLS):
            for i, fam in enumerate(fams):
                s = next((x for x in rows if x["family"] == fam and x["tool"] == tool), None)
                if s is None:
                    continue
                x = i + (j - 1) * width
                label = None if tool in labelled else tool
                labelled.add(tool)
                if "wall_s" in s:
                    ax.bar(x, s["wall_s"], width, color=colors[tool], label=label)
                else:
                    ax.bar(x, 0, width, color=colors[tool], label=label)
                    ax.text(x, 0, "✗", ha="center", va="bottom", color=colors[tool], fontsize=12)
        bound = statistics.median(x["bound_s"] for x in rows)
        ax.axhline(bound, ls="--", color="k", lw=1, label=f"I/O bound {bound:.1f} s")
        ax.set_xticks(range(len(fams)), [f.replace(" (", "\n(") for f in fams], fontsize=7)
        ax.set_xlim(-0.6, max(len(fams), 2) - 0.4)
        ax.set_title(f"{data}, N={n} (✗ = killed at the 10 GB RSS cap)", fontsize=9)
        ax.set_ylabel("wall time (s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def svd_markdown(rows: list[dict]) -> str:
    """Table of ``bench_svd.py`` rows: time per matrix against size, randomized-SVD error, TSV-M/Iso-C."""
    head = (
        "| matrix | shape | N | k = r/N | exact SVD s | randomized SVD s | excess rank-k error | "
        "max top-k σ error | tsv_m exact s | tsv_m low-rank s | ‖Δ_lowrank − Δ_exact‖/‖Δ_exact‖ | "
        "iso_c s | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["n_models"], r["numel"])):

        def opt(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if key in r else "—"

        lines.append(
            f"| {r['tensor'].split('.')[-2]} | {r['shape'][0]}×{r['shape'][1]} | {r['n_models']} | {r['k']} | "
            f"{r['svd_exact_s']:.2f} | {r['svd_lowrank_s']:.2f} | {r['lowrank_excess_error']:.2%} | "
            f"{r['topk_sigma_max_rel_error']:.1%} | {opt('tsvm_exact_s', '.1f')} | {opt('tsvm_lowrank_s', '.1f')} | "
            f"{opt('tsvm_lowrank_rel_diff', '.1%')} | {opt('isoc_s', '.1f')} | {r['device']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--svd", action="store_true", help="the inputs are bench_svd.py rows")
    a = ap.parse_args()
    if a.svd:
        print(svd_markdown(load(a.results)))
        return
    summary = summarise(load(a.results))
    print(markdown(summary))
    if a.plot:
        plot(summary, a.plot)


if __name__ == "__main__":
    main()

"""The vision suite end to end: zoo -> source sets -> grid -> α sweep -> tables and plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..nn.models import default_device
from ..progress import track
from .grid import (
    CellResult,
    Evaluator,
    SourceSet,
    alpha_sweep,
    own_accuracy,
    profile_specs,
    run_cell,
    task_names,
)
from .plots import write_plots
from .profile import Profile
from .report import (
    alpha_table,
    ece_table,
    headline_table,
    sources_table,
    sweep_table,
    targets,
    targets_table,
    write_csv,
    write_text,
)
from .sources import add_fishers, base_fisher, conditioned_tasks, distac_sources, flagged_tasks, rescaled_sources
from .tasks import load_digits_5000, make_tasks
from .zoo import SETTINGS, Zoo, build_or_load_zoo, zoo_norms

__all__ = ["SWEEP_METHODS", "prior_data_for", "run_suite", "run_vision"]

# the gradient-matching paper's comparison (merge-methods.md §1.5)
SWEEP_METHODS = ("task_arithmetic", "fisher", "gradient_matching")


def _bar(enabled: bool) -> Callable[[Iterable[Any], str], Iterable[Any]]:
    def wrap(it: Iterable[Any], desc: str) -> Iterable[Any]:
        return track(it, desc=desc, quiet=not enabled)

    return wrap


def _machine(device: torch.device) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": round(load[0], 2),
    }


def _source_sets(zoo: Any, evaluator: Evaluator, *, progress: bool, log: Callable[[str], None]) -> list[SourceSet]:
    """raw for every setting; naive rescaling for norm mismatch; DisTaC for both harmful settings.

    With ``profile.distac_on_ideal`` the ideal zoo is conditioned too (the control: does DisTaC hurt
    when nothing is wrong?). The ideal raw set stays first (the α sweep uses it).
    """
    sets = []
    for setting in SETTINGS:
        raw = zoo.setting(setting)
        sets.append(SourceSet(setting, "raw", raw, flagged_tasks(zoo.profile, setting), zoo_norms(zoo, raw)))
    sets.append(rescaled_sources(zoo, "norm"))
    for setting in ("norm", "conf", "ideal"):
        if setting == "ideal" and not zoo.profile.distac_on_ideal:
            continue
        t0 = time.perf_counter()
        sets.append(distac_sources(zoo, setting, evaluator=evaluator, progress=progress))
        log(
            f"DisTaC ({setting}): {len(conditioned_tasks(zoo.profile, setting))} model(s) in "
            f"{time.perf_counter() - t0:.0f}s"
        )
    return sets


def run_vision(
    profile: Profile,
    *,
    out: Path,
    cache: Path,
    seeds: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "distac reproduce",
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run the whole vision suite and write ``out/`` (results.md, CSVs, PNGs, run.json).

    ``device`` (default: CUDA when available) runs every training, merge and evaluation.
    """
    bar = _bar(progress)
    dev = default_device(device)

    def zoo_for(seed: int) -> Zoo:
        return build_or_load_zoo(profile, cache=cache, seed=seed, progress=bar, log=log, device=dev)

    return run_suite(
        profile,
        zoo_for,
        suite="vision",
        out=out,
        seeds=seeds,
        progress=progress,
        log=log,
        command=command,
        prior_data=prior_data_for(profile),
        device=dev,
    )


def prior_data_for(profile: Profile) -> Callable[[Zoo], tuple[torch.Tensor, torch.Tensor]]:
    """The pre-training images and labels of ``profile``'s split (gradient matching's H_0 data)."""

    def prior_data(zoo: Zoo) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = load_digits_5000()
        pre, _ = make_tasks(
            x, y, n_pretrain=profile.n_pretrain, n_train=profile.n_train, n_val=profile.n_val, n_test=profile.n_test
        )
        return pre.x, pre.y

    return prior_data


def run_suite(
    profile: Profile,
    zoo_for: Callable[[int], Zoo],
    *,
    suite: str,
    out: Path,
    seeds: int,
    progress: bool,
    log: Callable[[str], None],
    command: str,
    prior_data: Callable[[Zoo], tuple[torch.Tensor, torch.Tensor]] | None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Zoo per seed -> source sets -> grid -> α sweep -> ``out/`` (shared by the vision and text suites).

    ``prior_data(zoo)`` gives the pre-training inputs and labels for gradient matching's H_0 (the
    base's Fisher with its pre-training head); without it H_0 is the method's δ_0 prior only.
    ``out/`` is rewritten after every seed (its tables then hold the seeds done so far), so a run
    stopped part-way leaves the results of its finished seeds. ``device``: where the grid runs
    (default: CUDA when available); ``zoo_for`` places each zoo itself.
    """
    t_start = time.perf_counter()
    dev = default_device(device)
    machine = _machine(dev)
    out.mkdir(parents=True, exist_ok=True)
    specs = profile_specs(profile)
    if not specs:
        raise RuntimeError("no merge method of the grid is registered in distac.METHODS")
    acc = _Accumulated()
    result: dict[str, Any] = {}

    def partial() -> None:
        # cells.csv is rewritten after every source set, so a run stopped mid-grid keeps its cells
        write_csv(out / "cells.csv", acc.cells, acc.names, acc.cell_seeds)

    for seed in range(seeds):
        t0 = time.perf_counter()
        zoo = zoo_for(seed)
        acc.timings[f"seed{seed}_zoo_s"] = round(time.perf_counter() - t0, 1)
        _run_seed(acc, zoo, seed, specs, prior_data=prior_data, device=dev, progress=progress, log=log, saved=partial)
        log(f"{suite}: seed {seed} done, timings {acc.timings}")
        meta = {
            "suite": suite,
            "profile": profile.name,
            "command": command,
            "seeds": seed + 1,
            "machine": machine,
            "methods": [s.method for s in specs],
            "profile_manifest": json.loads(json.dumps(profile.manifest())),
        }
        result = _write_outputs(acc, meta, out, time.perf_counter() - t_start, log)
    return result


@dataclass
class _Accumulated:
    """What the seeds of a run have produced so far (the report is written from it after every seed)."""

    cells: list[CellResult] = field(default_factory=list)
    cell_seeds: list[int] = field(default_factory=list)
    sweeps: dict[str, list[list[tuple[float, float, float]]]] = field(default_factory=dict)
    seed0_sources: list[tuple[SourceSet, list[float]]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    method_seconds: dict[str, float] = field(default_factory=dict)  # grid wall time per method, all seeds
    names: list[str] = field(default_factory=list)
    labels_y: dict[str, torch.Tensor] = field(default_factory=dict)
    base_rows: list[tuple[float, float]] = field(default_factory=list)


def _run_seed(
    acc: _Accumulated,
    zoo: Zoo,
    seed: int,
    specs: list[Any],
    *,
    prior_data: Callable[[Zoo], tuple[torch.Tensor, torch.Tensor]] | None,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
    saved: Callable[[], None] = lambda: None,
) -> None:
    """One zoo through source sets, Fishers, grid and α sweep; its cells and timings go into ``acc``.

    ``saved()`` is called after each source set's cells (the caller writes them out).
    """
    profile, timings = zoo.profile, acc.timings
    acc.names = task_names(zoo.tasks)
    acc.labels_y = {td.spec.name: td.test.y for td in zoo.tasks}
    evaluator = Evaluator(zoo, device)
    # the reference point α = 0: the pre-trained body with the frozen zero-shot heads
    zero = evaluator.accuracy(zoo.base, zoo.setting("ideal"), "test")
    acc.base_rows.append((100 * sum(zero) / len(zero), 100 * sum(evaluator.normalised(zero, "test")) / len(zero)))
    t0 = time.perf_counter()
    sets = _source_sets(zoo, evaluator, progress=progress, log=log)
    timings[f"seed{seed}_distac_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    bf = None
    if any(s.fisher for s in specs):
        fcache: dict[int, dict[str, torch.Tensor]] = {}
        for s in track(sets, desc="fishers", quiet=not progress):
            add_fishers(s, zoo, evaluator, cache=fcache, progress=False)
        if prior_data is not None and any(s.base_fisher for s in specs):
            px, py = prior_data(zoo)
            bf = base_fisher(zoo, evaluator, px, py, progress=False)
    timings[f"seed{seed}_fisher_s"] = round(time.perf_counter() - t0, 1)
    if bf is not None or any(s.fishers for s in sets):
        log(f"fishers: {timings[f'seed{seed}_fisher_s']:.0f}s")
    if seed == 0:
        own_cache: dict[tuple[int, int], float] = {}  # models shared between sets are evaluated once
        acc.seed0_sources = [(s, own_accuracy(evaluator, s, cache=own_cache)) for s in sets]
    t0 = time.perf_counter()
    for s in track(sets, desc=f"grid (seed {seed})", quiet=not progress):
        spent = []
        for spec in specs:
            t1 = time.perf_counter()
            acc.cells.append(run_cell(evaluator, spec, s, profile=profile, base=zoo.base, base_fisher=bf))
            acc.cell_seeds.append(seed)
            dt = time.perf_counter() - t1
            acc.method_seconds[spec.label] = acc.method_seconds.get(spec.label, 0.0) + dt
            spent.append(f"{spec.label} {dt:.1f}s ({acc.cells[-1].mean_norm:.1f})")
        # where the grid's time goes, per cell (the GPU run's grid was slower than its estimate by 25x),
        # with each cell's normalised test accuracy
        log(f"grid: {s.setting}/{s.source}: {', '.join(spent)}")
        saved()
    timings[f"seed{seed}_grid_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ideal = sets[0]
    for spec in track([s for s in specs if s.method in SWEEP_METHODS], desc="α sweep", quiet=not progress):
        acc.sweeps.setdefault(spec.label, []).append(
            alpha_sweep(evaluator, spec, ideal, profile.alpha_sweep, base=zoo.base, base_fisher=bf)
        )
    timings[f"seed{seed}_sweep_s"] = round(time.perf_counter() - t0, 1)


def _write_outputs(
    acc: _Accumulated, meta: dict[str, Any], out: Path, wall: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """results.md, cells.csv, the plots and run.json of the seeds in ``acc`` (rewritten after each seed)."""
    machine = meta["machine"]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    machine["loadavg_1m_at_end"] = round(load[0], 2)
    machine["loadavg_15m_at_end"] = round(load[2], 2)
    cells = acc.cells
    labels = list(dict.fromkeys(c.label for c in cells))
    base_norm = statistics.fmean(n for _, n in acc.base_rows) if acc.base_rows else None
    tgt = targets(cells, acc.sweeps, base_norm)
    meta = {
        **meta,
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": round(wall, 1),
        "timings": dict(acc.timings),
        "grid_seconds_by_method": {k: round(v, 1) for k, v in acc.method_seconds.items()},
        "base_test_acc": [round(a, 2) for a, _ in acc.base_rows],
        "base_test_norm_acc": [round(n, 2) for _, n in acc.base_rows],
    }
    write_csv(out / "cells.csv", cells, acc.names, acc.cell_seeds)
    plots = write_plots(out, cells, acc.seed0_sources, acc.sweeps, acc.names, acc.labels_y, base_norm=base_norm)
    md = _markdown(meta, cells, labels, acc.seed0_sources, acc.names, acc.sweeps, tgt, plots)
    write_text(out / "results.md", md)
    write_text(out / "run.json", json.dumps(dict(meta, targets=tgt), indent=2, default=str))
    log(f"reproduce: wrote {out}/results.md ({wall:.0f}s)")
    return dict(meta, targets=tgt, cells=cells, sweeps=acc.sweeps)


def _mean_sd(values: list[float]) -> str:
    """``61.2`` for one seed, ``61.2 ± 0.4`` (sd over seeds) for several."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def _markdown(
    meta: dict[str, Any],
    cells: list[CellResult],
    labels: list[str],
    sources: list[tuple[SourceSet, list[float]]],
    names: list[str],
    sweeps: dict[str, list[list[tuple[float, float, float]]]],
    tgt: list[dict[str, Any]],
    plots: list[str],
) -> str:
    m = meta["machine"]
    parts = [
        f"# distac reproduce: {meta['suite']} suite ({meta['profile']} profile)",
        "",
        f"* command: `{meta['command']}`",
        f"* date: {meta['date_utc']}; wall time: {meta['wall_time_s']:.0f} s; seeds: {meta['seeds']}",
        f"* machine: {m['platform']}, {m['cpus']} CPUs, device {m['device']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); "
        f"load average {m['loadavg_1m_at_start']} at start, {m['loadavg_1m_at_end']} at end "
        f"(15 min: {m['loadavg_15m_at_end']})",
        f"* stage timings (s): {meta['timings']}",
        f"* grid wall time by method (s, all seeds): {meta['grid_seconds_by_method']}",
        "",
        "## Mean test accuracy (normalised accuracy), α selected on validation",
        "",
        headline_table(cells, labels),
        "",
        f"Reference, α = 0 (the pre-trained body with the frozen task heads): {_mean_sd(meta['base_test_acc'])} "
        f"({_mean_sd(meta['base_test_norm_acc'])}).",
        "",
        "Normalised accuracy divides by each task's *ideal* fine-tuned test accuracy in every column. "
        "Naive rescaling under low confidence is κ = 1, i.e. the raw models, so it has no column. "
        "± is the sd over seeds.",
        "",
        "## Targets",
        "",
        targets_table(tgt),
        "",
        "## ECE (%) of the merged model, before → after per-task temperature scaling on validation",
        "",
        ece_table(cells, labels),
        "",
        "## Selected α",
        "",
        alpha_table(cells, labels),
        "",
        "## Source models (seed 0): task-vector norm and own test accuracy",
        "",
        sources_table(sources, names),
        "",
    ]
    if sweeps:
        parts += ["## Accuracy vs α on the ideal zoo (test split)", "", sweep_table(sweeps), ""]
    parts += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    return "\n".join(parts)

"""``distac tune TUNE.yml --out DIR``: grid-search a merge config's hyperparameters on validation data.

The YAML names a merge config (the one ``distac merge`` takes, by path or inline), a grid and each
model's validation data::

    merge: merge.yml                      # or the merge config itself as a mapping
    grid: {scale: [0.2, 0.4, 0.6, 0.8, 1.0], density: [0.1, 0.2]}
    data: {a: a_val.csv, b: b_val.csv}    # keyed by the merge config's model names
    labels: {a: a_labels.npy}             # optional, when the data files carry no label column
    column: text                          # optional input column / array name
    label_column: label                   # optional label column / array name
    criterion: auto                       # auto | normalized_accuracy | accuracy | entropy
    arch: my_pkg.models:build             # only for a base given as a plain weights file
    arch_kwargs: {}
    batch_size: 256
    max_length: 128                       # tokenizer truncation for text
    calibrate: false                      # fit a temperature per task on the same (labeled) data

It writes ``DIR/model/`` (the merge with the best parameters, exactly what ``distac merge`` gives,
plus ``temperatures.json`` with ``calibrate``), ``DIR/tune.json`` (every point), ``DIR/tune.md``
(the table) and ``DIR/tune.png`` (score against each parameter, when matplotlib is installed).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ..errors import DistacError, closest

TUNE_KEYS = (
    "merge",
    "grid",
    "data",
    "labels",
    "column",
    "label_column",
    "criterion",
    "arch",
    "arch_kwargs",
    "batch_size",
    "max_length",
    "calibrate",
)


def _read_yaml(path: Path) -> dict[str, Any]:
    from ..merging.config import read_yaml

    obj = read_yaml(path)
    if not isinstance(obj, dict):
        raise DistacError(f"{path}: a tune config must be a mapping with keys {list(TUNE_KEYS)}")
    for k in obj:
        if k not in TUNE_KEYS:
            raise DistacError(f"{path}: unknown key '{k}'{closest(str(k), TUNE_KEYS)}")
    for k in ("merge", "grid", "data"):
        if k not in obj:
            raise DistacError(f"{path}: missing '{k}'")
    return obj


def _paths(obj: Any, key: str, folder: Path) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping) or not all(isinstance(v, str) for v in obj.values()):
        raise DistacError(f"tune config '{key}' must map model names to file paths")
    return {str(k): str(folder / v) for k, v in obj.items()}


def _merge_config(spec: Any, folder: Path) -> dict[str, Any]:
    """The merge config as a dict whose relative paths are absolute (so it runs from anywhere)."""
    from ..merging.config import load_config

    if isinstance(spec, str):
        return copy.deepcopy(load_config(folder / spec).raw)
    if isinstance(spec, Mapping):
        return copy.deepcopy(load_config(_absolute(dict(spec), folder)).raw)
    raise DistacError("tune config 'merge' must be a path to a merge config or the config itself")


def _absolute(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    def fix(entry: Any) -> Any:
        if isinstance(entry, str):
            return str(folder / entry)
        if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
            out = dict(entry)
            out["model"] = str(folder / entry["model"])
            return out
        return entry

    cfg["base_model"] = fix(cfg.get("base_model"))
    cfg["models"] = [fix(m) for m in cfg.get("models") or []]
    return cfg


def _check_tunable(cfg: Mapping[str, Any], grid: Mapping[str, Any]) -> None:
    for m in cfg.get("models", []):
        per_model = set((m.get("parameters") or {}) if isinstance(m, Mapping) else ())
        both = sorted(per_model & set(grid))
        if both:
            raise DistacError(f"tune: {both} set per model in the merge config; remove it there to tune it")


def _check_mergekit_reading(cfg: Any, merge_cfg: Mapping[str, Any], grid: Mapping[str, Any]) -> None:
    """A merge config read with mergekit's meaning: what tune honours, or one line naming what it cannot.

    The search runs on the config's distac parameters (so ``normalize``'s ``merge_fn: weighted_mean``
    and a zero reference are kept); the best point is written back in mergekit's spelling
    (``scale`` as ``lambda``), checked here before the search so a refusal costs nothing.

    Returns:
        The grid's first point as the best config's ``parameters`` will hold it.
    """
    from ..merging.config import load_config

    if getattr(cfg.params, "varying", False):
        raise DistacError(
            "tune: the merge config's parameters vary per tensor (mergekit gradients or filter lists), but tune "
            "searches one value per parameter; give them as single numbers"
        )
    fixed = sorted(set(grid) & {"merge_fn", "weights"})
    if fixed:
        raise DistacError(
            f"tune: {fixed} cannot be tuned on a config read with mergekit's meaning (it sets them from "
            "'normalize' and each model's 'weight'); write the merge config in distac's terms to tune them"
        )
    reading = getattr(cfg.params, "reading", None)
    if (
        "density" in grid
        and reading is not None
        and reading.source.startswith("dare")
        and not reading.options["rescale"]
    ):
        raise DistacError(
            "tune: 'density' cannot be tuned with mergekit's 'rescale: false' (the density is folded into each "
            "model's weight when the config is read); remove 'rescale: false' or tune another parameter"
        )
    first = _mergekit_spelling({k: v[0] for k, v in grid.items() if isinstance(v, list) and v})
    load_config({**merge_cfg, "parameters": {**(merge_cfg.get("parameters") or {}), **first}})


def _mergekit_spelling(point: Mapping[str, Any]) -> dict[str, Any]:
    return {("lambda" if k == "scale" else k): v for k, v in point.items()}


def _plot(result: Any, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = list(result.best.params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    pick = max if result.higher_is_better else min
    for ax, k in zip(axes[0], keys, strict=True):
        values = list(dict.fromkeys(p.params[k] for p in result.points))
        best = [pick(p.score for p in result.points if p.params[k] == v) for v in values]
        numeric = all(isinstance(v, int | float) for v in values)
        xs = values if numeric else list(range(len(values)))
        ax.plot(xs, best, marker="o")
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in values])
        ax.set_xlabel(k)
        ax.set_ylabel(result.criterion.replace("_", " "))
        ax.set_title("best over the other parameters", fontsize=9)
    fig.suptitle(f"distac tune: {result.method}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@click.command("tune")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing distac output folder.")
@click.option("--device", default=None, help="cpu, cuda, ... (default: CUDA when available).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def tune_command(config: Path, out: Path, overwrite: bool, device: str | None, quiet: bool) -> None:
    """Grid-search a merge's hyperparameters on validation data; write the best merge, a table and a plot."""
    from ..io import atomic_dir, check_output
    from ..merging.checkpoints import merge_checkpoints
    from ..merging.config import load_config
    from ..nn.models import EncoderClassifier
    from .search import tune

    raw = _read_yaml(config)
    folder = config.resolve().parent
    merge_cfg = _merge_config(raw["merge"], folder)
    grid = raw["grid"]
    if not isinstance(grid, Mapping) or not grid:
        raise DistacError(f"{config}: 'grid' must map parameter names to lists of values")
    _check_tunable(merge_cfg, grid)
    data_paths = _paths(raw["data"], "data", folder)
    label_paths = _paths(raw.get("labels"), "labels", folder)
    cfg = load_config(merge_cfg)
    if cfg.mergekit is not None:
        _check_mergekit_reading(cfg, merge_cfg, grid)
    inputs: list[str | Path] = [config, cfg.base.path, *(m.path for m in cfg.models)]
    inputs += [m.adapter for m in cfg.models if m.adapter is not None]  # BASE+ADAPTER: both sides are inputs
    inputs += [*data_paths.values(), *label_paths.values()]
    check_output(out, overwrite=overwrite, inputs=inputs)
    model, base, models, data, stats = _load(raw, cfg, data_paths, label_paths)
    # a bare encoder's head is the wrapper's (random, the same in every model, in no checkpoint): never merged
    heads = list(cfg.heads) or (["head.*"] if isinstance(model, EncoderClassifier) else [])
    result = tune(
        model,
        base,
        models,
        data,
        method=cfg.method.name,
        grid=grid,
        # a mergekit reading fills in every parameter (its defaults): the grid's take their place
        params=cfg.params if cfg.mergekit is None else {k: v for k, v in cfg.params.items() if k not in grid},
        criterion=str(raw.get("criterion", "auto")),
        heads=heads,
        batch_size=int(raw.get("batch_size", 256)),
        device=device,
        progress=not quiet,
        **stats,
    )
    best_cfg = copy.deepcopy(merge_cfg)
    best = result.best.params if cfg.mergekit is None else _mergekit_spelling(result.best.params)
    best_cfg["parameters"] = {**(best_cfg.get("parameters") or {}), **best}
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        merge_checkpoints(best_cfg, tmp / "model", device=device, quiet=True)
        if raw.get("calibrate"):
            _calibrate(model, tmp / "model", models, data, cfg.heads, device)
        (tmp / "tune.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        (tmp / "tune.md").write_text(result.table() + "\n")
        _plot(result, tmp / "tune.png")
    click.echo(result.table())
    click.echo(f"best {result.best.params} ({result.criterion} {result.best.score:.4f}); wrote {out}")


def _load(raw: Mapping[str, Any], cfg: Any, data_paths: dict[str, str], label_paths: dict[str, str]) -> tuple:
    import torch

    from ..nn.data import load_task_data
    from ..nn.models import load_model, load_state_like, read_state

    kwargs = raw.get("arch_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise DistacError("tune config 'arch_kwargs' must be a mapping")
    loaded = load_model(cfg.base.path, factory=raw.get("arch"), factory_kwargs=kwargs, heads=cfg.heads or None)
    models = {m.name: load_state_like(m.ref, loaded) for m in cfg.models}
    base = loaded.state
    if cfg.base.zero:  # a mergekit config without base_model: the reference is zero weights, as the merge's
        base = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in base.items()}
    data = load_task_data(
        loaded,
        data_paths,
        tasks=list(models),
        column=raw.get("column"),
        label_column=raw.get("label_column"),
        labels=label_paths,
        max_length=int(raw.get("max_length", 128)),
        source="tune config: data/labels",
    )

    def side(path: Any) -> dict:
        # sidecars name tensors as the checkpoint does; a bare encoder is loaded wrapped (`encoder.` + name)
        got = read_state(path)
        return {f"encoder.{k}": v for k, v in got.items()} if loaded.kind == "hf-encoder" else got

    stats: dict[str, Any] = {}
    if any("fisher" in m.stats for m in cfg.models):
        stats["fishers"] = [side(m.stats["fisher"]) for m in cfg.models]
    if "fisher" in cfg.base.stats:
        stats["base_fisher"] = side(cfg.base.stats["fisher"])
    if any("gram" in m.stats for m in cfg.models):
        stats["grams"] = [side(m.stats["gram"]) for m in cfg.models]
    return loaded.module, base, models, data, stats


def _calibrate(model: Any, folder: Path, models: Mapping, data: Mapping, heads: list[str], device: str | None) -> None:
    from ..conditioning.calibrate import calibrate, write_temperatures
    from ..nn.models import read_state
    from ..taskvector import match_heads

    merged = read_state(folder)
    results = {}
    for t, d in data.items():
        if d.labels is None:
            raise DistacError(f"tune: calibrate needs labels; task '{t}' ({d.source}) has none")
        state = {**merged, **{k: models[t][k] for k in match_heads(merged, heads)}}
        results[t] = calibrate(model, state, d, device=device)
    write_temperatures(folder, results)

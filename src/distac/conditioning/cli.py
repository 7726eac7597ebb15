"""``distac diagnose``, ``distac condition`` and ``distac calibrate``: thin layers over the Python API.

Models: ``--base`` is a Hugging Face directory, or a weights file plus ``--arch package.module:factory``
(``--arch-kwargs`` JSON is passed to the factory). ``--model NAME=PATH`` gives each fine-tune (a directory
or a weights file of the same architecture). ``--data NAME=PATH`` gives each task's inputs (any format of
:mod:`distac.nn.data`); labels come from ``--label-column`` (tables, ``.npz``, saved datasets), image
sub-folders, or ``--labels NAME=FILE``.

Every output folder is written to a temporary folder and renamed when complete, so a failure (bad
input, NaN loss) leaves no half-written output. ``distac condition`` runs under Hugging Face
Accelerate; see ``docs/distac.md`` for the multi-process launch commands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..errors import DistacError
from ..nn.data import Inputs, load_task_data
from ..nn.models import LoadedModel, is_hf_dir, load_model, load_state_like, read_state
from .config import ConditionConfig, click_options

POSITIVE = click.FloatRange(min=0, min_open=True)


def _pairs(values: Sequence[str], option: str) -> dict[str, str]:
    """``NAME=PATH`` options as an ordered dict; duplicate or malformed entries are errors."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise DistacError(f"{option} '{v}' must look like NAME=PATH")
        if name in out:
            raise DistacError(f"{option}: task '{name}' is given twice")
        out[name] = path
    return out


def _load_base(base: str, arch: str | None, arch_kwargs: str | None, heads: Sequence[str]) -> LoadedModel:
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else {}
    except json.JSONDecodeError as e:
        raise DistacError(f"--arch-kwargs is not valid JSON: {e}") from e
    return load_model(base, factory=arch, factory_kwargs=kwargs, heads=list(heads) or None)


def _common_options(fn):
    options = [
        click.option("--base", required=True, help="Base model: an HF directory, or a weights file with --arch."),
        click.option("--arch", default=None, help="package.module:factory building the torch module (plain models)."),
        click.option("--arch-kwargs", default=None, help="JSON object of keyword arguments for --arch."),
        click.option(
            "--model",
            "models",
            multiple=True,
            required=True,
            help="NAME=PATH of a fine-tuned model (HF folder, weights file, LoRA adapter folder, or BASE+ADAPTER).",
        ),
        click.option(
            "--data",
            "data",
            multiple=True,
            help="NAME=PATH of a task's inputs: .txt (one text per line), .csv/.tsv/.jsonl (column text, "
            "labels label), .npy/.npz (x, y), an image folder (one sub-folder per class) or a saved dataset.",
        ),
        click.option("--labels", "labels", multiple=True, help="NAME=FILE of labels (.npy or one per line)."),
        click.option("--column", default=None, help="Input column/array (default: text / x)."),
        click.option("--label-column", default=None, help="Label column/array (default: label / y)."),
        click.option("--heads", multiple=True, help="Head name pattern (glob, or re:REGEX); default per model type."),
        click.option(
            "--max-length",
            default=128,
            show_default=True,
            type=click.IntRange(min=1),
            help="Tokenizer truncation length for text.",
        ),
        click.option("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _setup(
    base,
    arch,
    arch_kwargs,
    models,
    heads,
    need_data: bool,
    data,
    labels,
    column,
    label_column,
    need_labels: bool,
    max_length,
) -> tuple[LoadedModel, dict[str, Any], dict[str, str], dict[str, Inputs]]:
    loaded = _load_base(base, arch, arch_kwargs, heads)
    paths = _pairs(models, "--model")
    finetuned = {n: _load_finetune(p, loaded) for n, p in paths.items()}
    data_paths = _pairs(data, "--data")
    if need_data and not data_paths:
        raise DistacError("--data NAME=PATH is required")
    inputs = load_task_data(
        loaded,
        data_paths,
        tasks=list(paths),
        column=column,
        label_column=label_column,
        labels=_pairs(labels, "--labels"),
        need_labels=need_labels,
        max_length=max_length,
    )
    return loaded, finetuned, paths, inputs


def _load_finetune(path: str, loaded: LoadedModel) -> Any:
    """A ``--model`` path: a LoRA adapter folder, or BASE+ADAPTER with the ``--base`` itself, stays an adapter on
    the base (measured from its factors, conditioned as a LoRA by default); anything else is read as a checkpoint.
    """
    from ..io.lora import AdapterSource, is_adapter, read_adapter, split_adapter_ref
    from ..tensors import DictSource

    model, adapter = split_adapter_ref(path)
    if adapter is None and is_adapter(path):
        adapter = path
    elif adapter is None or Path(model).resolve() != Path(loaded.source).resolve():
        return load_state_like(path, loaded)
    return AdapterSource(DictSource(loaded.state, loaded.source), read_adapter(adapter), label=path)


@click.command("diagnose")
@_common_options
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--norm-ratio", default=2.0, show_default=True, type=POSITIVE, help="Flag norm ratios at or above this.")
@click.option(
    "--entropy",
    "entropy",
    default=0.25,
    show_default=True,
    type=POSITIVE,
    help="Flag mean normalised entropy (H / ln C) at or above this.",
)
@click.option("--max-batches", default=None, type=click.IntRange(min=1), help="Evaluate at most this many batches.")
def diagnose_command(
    base,
    arch,
    arch_kwargs,
    models,
    data,
    labels,
    column,
    label_column,
    heads,
    batch_size,
    max_length,
    device,
    out,
    overwrite,
    norm_ratio,
    entropy,
    max_batches,
) -> None:
    """Report task-vector norms, ratios, cosines and confidence; flag tasks and recommend κ and temperatures.

    Writes OUT/diagnose.json and OUT/diagnose.png and prints a table.
    """
    from ..io import atomic_dir, check_output
    from .diagnose import FlagRules, diagnose

    read = _read_paths(base, models, data, labels)
    check_output(out, overwrite=overwrite, inputs=read)  # before the work, not after it
    loaded, finetuned, _, inputs = _setup(
        base, arch, arch_kwargs, models, heads, False, data, labels, column, label_column, False, max_length
    )
    with_labels = {n: x for n, x in inputs.items() if x.labels is not None}
    rules = FlagRules(norm_ratio=norm_ratio, normalized_entropy=entropy)
    report = diagnose(
        loaded.module,
        loaded.state,
        finetuned,
        inputs or None,
        with_labels or None,
        heads=loaded.head_patterns,
        rules=rules,
        batch_size=batch_size,
        max_batches=max_batches,
        device=device,
    )
    with atomic_dir(out, overwrite=overwrite, inputs=read) as tmp:
        report.to_json(tmp / "diagnose.json")
        report.figure(tmp / "diagnose.png")
    click.echo(report.table())
    click.echo(f"wrote {out / 'diagnose.json'} and {out / 'diagnose.png'}")


@click.command("condition")
@_common_options
@click.option(
    "--task", "tasks", multiple=True, help="Task(s) to condition (default: every task auto flags, or the only one)."
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Save resumable state here (per task sub-folder); a later run resumes from it.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click_options
def condition_command(
    base,
    arch,
    arch_kwargs,
    models,
    data,
    labels,
    column,
    label_column,
    heads,
    max_length,
    device,
    out,
    overwrite,
    tasks,
    state_dir,
    quiet,
    **settings,
) -> None:
    """Condition fine-tuned models with DisTaC (distillation into θ_0 + κτ).

    Writes OUT/<task>.safetensors (or OUT/<task>/ when the fine-tune is an HF directory, or a LoRA
    adapter folder OUT/<task>/ for a LoRA student) and OUT/<task>.report.json for each conditioned task.
    A --model may be a LoRA adapter folder (or BASE+ADAPTER): --student says what trains. Run under
    torchrun / accelerate launch for many processes.
    """
    from ..io import check_output
    from ._setup import accelerator_session
    from .distill import condition

    cfg = ConditionConfig.of(**settings)
    read = _read_paths(base, models, data, labels, state_dir=state_dir)
    check_output(out, overwrite=overwrite, inputs=read)  # before a long run, not after it
    loaded, finetuned, paths, inputs = _setup(
        base, arch, arch_kwargs, models, heads, True, data, labels, column, label_column, False, max_length
    )
    modes = _choose_modes(loaded, finetuned, inputs, list(tasks), cfg, device)
    with accelerator_session(device) as accelerator:
        results = {
            t: condition(
                loaded.module,
                loaded.state,
                finetuned,
                inputs,
                cfg,
                task=t,
                mode=mode,
                heads=loaded.head_patterns,
                state_dir=(state_dir / t) if state_dir is not None else None,
                progress=not quiet,
                accelerator=accelerator,
            )
            for t, mode in modes.items()
        }
        if not accelerator.is_main_process:
            return
        _write_conditioned(out, overwrite, read, results, paths, loaded)
        for t, res in results.items():
            r, c = res.report, res.report.config
            click.echo(
                f"{t}: mode={c.mode} student={c.student} kappa={c.kappa:.4g} T=({c.t_teacher:g},{c.t_student:g}) "
                f"norm {r.norm_before:.4g} -> {r.norm_after:.4g}, agreement {_pct(r.agreement)}, "
                f"max-prob {_mp(r.confidence_before)} -> {_mp(r.confidence_after)}"
            )
        if not results:
            click.echo("nothing flagged: no task conditioned (use --task and --mode to force one)")
        click.echo(f"wrote {out}")


def _choose_modes(
    loaded: LoadedModel,
    finetuned: dict[str, Any],
    inputs: dict[str, Inputs],
    chosen: list[str],
    cfg: ConditionConfig,
    device: str | None,
) -> dict[str, str]:
    """``{task: mode}`` to condition: the ``--task`` ones (all flagged ones under ``auto``), each with data."""
    from .diagnose import diagnose

    for t in chosen:
        if t not in finetuned:
            raise DistacError(f"--task '{t}' is not one of the --model names {list(finetuned)}")
    modes = dict.fromkeys(chosen or finetuned, cfg.mode)
    if cfg.mode == "auto":
        # one diagnosis over every task and its data, so each task is judged against all the others
        rep = diagnose(
            loaded.module,
            loaded.state,
            finetuned,
            inputs,
            heads=loaded.head_patterns,
            batch_size=cfg.batch_size,
            max_batches=8,
            device=device,
        )
        modes = {t: rep[t].mode for t in (chosen or rep.flagged)}
        for t in [t for t, m in modes.items() if m == "none"]:
            click.echo(f"{t}: nothing flagged, not conditioned", err=True)
            del modes[t]
    elif not chosen and len(finetuned) != 1:
        raise DistacError(f"several models given; say which to condition with --task ({list(finetuned)})")
    missing = [t for t in modes if t not in inputs]
    if missing:
        raise DistacError(f"no --data for task(s) {missing}: conditioning needs each task's unlabeled inputs")
    return modes


def _write_conditioned(
    out: Path, overwrite: bool, read: list[str], results: dict[str, Any], paths: dict[str, str], loaded: LoadedModel
) -> None:
    """OUT/<task>.safetensors (or an HF folder) and OUT/<task>.report.json for each result, all or nothing."""
    from ..io import atomic_dir
    from ..nn.models import save_state_like
    from .lowrank import write_adapter

    with atomic_dir(out, overwrite=overwrite, inputs=read) as tmp:
        for t, res in results.items():
            res.report.to_json(tmp / f"{t}.report.json")
            if res.adapter is not None:  # a LoRA student: an adapter folder of the input's rank
                write_adapter(res.adapter, loaded.state, tmp / t, metadata=_card(res.report))
                continue
            as_dir = is_hf_dir(paths[t]) and loaded.kind == "hf"
            save_state_like(
                res.state,
                tmp / (t if as_dir else f"{t}.safetensors"),
                loaded,
                fmt="hf" if as_dir else "safetensors",
                metadata=_card(res.report),
            )


def _read_paths(base: str, *options: Sequence[str], state_dir: Path | None = None) -> list[str]:
    """Every path a command reads: the base, each NAME=PATH of ``options``, the state folder. An output
    may not equal, contain or lie inside any of them (:func:`distac.io.check_output`).
    """
    from ..io.lora import split_adapter_ref

    given = [base] + [v.partition("=")[2] for values in options for v in values if "=" in v]
    paths = [p for g in given for p in split_adapter_ref(g) if p is not None]  # BASE+ADAPTER reads both
    return paths + ([str(state_dir)] if state_dir is not None else [])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mp(c: dict | None) -> str:
    return "-" if not c else f"{c['mean_max_prob']:.3f}"


def _card(report) -> dict[str, str]:
    """What the conditioned checkpoint records about its making (safetensors metadata, all strings):
    the task, the mode and every setting that changes the weights.
    """
    made = {"task": report.task, "mode": report.config.mode, **report.config.fingerprint()}
    return {"distac_conditioning": json.dumps(made)}


@click.command("calibrate")
@click.option("--merged", required=True, help="The merged model (folder from `distac merge`, or a weights file).")
@click.option("--arch", default=None, help="package.module:factory when the merged model is not an HF directory.")
@click.option("--arch-kwargs", default=None, help="JSON object of keyword arguments for --arch.")
@click.option("--data", "data", multiple=True, required=True, help="NAME=PATH of a task's labeled held-out data.")
@click.option("--labels", "labels", multiple=True, help="NAME=FILE of labels (.npy or one per line).")
@click.option(
    "--head",
    "head_from",
    multiple=True,
    help="NAME=CHECKPOINT to take that task's head from (default: MERGED/heads/NAME.safetensors).",
)
@click.option("--column", default=None)
@click.option("--label-column", default=None)
@click.option("--heads", multiple=True, help="Head name pattern; default per model type.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default=None)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="temperatures.json path (default: inside the merged folder, or next to the merged file).",
)
def calibrate_command(
    merged, arch, arch_kwargs, data, labels, head_from, column, label_column, heads, batch_size, max_length, device, out
) -> None:
    """Fit one temperature per task head of a merged model (NLL over log T) and store them in temperatures.json."""
    from ..io import check_output
    from ..taskvector import match_heads
    from .calibrate import TEMPERATURES_FILE, calibrate, task_state, write_temperatures

    target = out if out is not None else (Path(merged) if Path(merged).is_dir() else Path(merged).parent)
    target = target / TEMPERATURES_FILE if target.is_dir() else target
    read = _read_paths(merged, data, labels, head_from)
    if Path(merged).is_dir():  # the file goes inside the merged folder: protect every other file there
        read = read[1:] + [str(f) for f in Path(merged).iterdir() if f.name != TEMPERATURES_FILE]
    check_output(target, overwrite=True, inputs=read, folder=False)
    loaded = _load_base(merged, arch, arch_kwargs, heads)
    data_paths = _pairs(data, "--data")
    heads_from = _pairs(head_from, "--head")
    inputs = load_task_data(
        loaded,
        data_paths,
        tasks=list(data_paths),
        column=column,
        label_column=label_column,
        labels=_pairs(labels, "--labels"),
        need_labels=True,
        max_length=max_length,
    )
    head_names = sorted(match_heads(loaded.state.keys(), loaded.head_patterns))
    results = {}
    for t, x in inputs.items():
        src = heads_from.get(t) or _head_file(merged, t)
        head = {}
        if src is not None:
            st = read_state(src)
            head = {k: st[k] for k in head_names if k in st}
            if not head:
                raise DistacError(f"'{src}' holds none of the head tensors {head_names[:3]} of the merged model")
        results[t] = calibrate(
            loaded.module,
            task_state(loaded.state, head, loaded.head_patterns),
            x,
            None,
            batch_size=batch_size,
            device=device,
        )
    path = write_temperatures(target, results, inputs=read)
    for t, r in results.items():
        click.echo(
            f"{t}: T={r.temperature:.4g}  NLL {r.nll_before:.4f} -> {r.nll_after:.4f}  "
            f"ECE {r.ece_before:.4f} -> {r.ece_after:.4f}  (n={r.n})"
        )
    click.echo(f"wrote {path}")


def _head_file(merged: str, task: str) -> Path | None:
    p = Path(merged) / "heads" / f"{task}.safetensors"
    return p if p.is_file() else None


__all__ = ["calibrate_command", "condition_command", "diagnose_command"]

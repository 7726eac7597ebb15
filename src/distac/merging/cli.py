"""The ``distac merge``, ``distac methods`` and ``distac export-tasks`` commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from ..errors import DistacError
from ..methods import METHODS, Method, get_method
from .checkpoints import export_task_models, merge_checkpoints
from .emr import EMR, MANIFEST, describe_emr, export_per_task, load_emr_bundle

__all__ = ["describe_method", "export_tasks_command", "merge_command", "methods_command"]


def _writes_checkpoints(
    out_help: str, *, out_required: bool = True
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options every command that writes checkpoints shares: --out, --overwrite, --shard-size, --quiet."""
    path = click.Path(file_okay=False, path_type=Path)
    options = [
        click.option("--out", "-o", required=out_required, type=path, help=out_help),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder that distac wrote."),
        click.option("--shard-size", default="1GB", show_default=True, help="Largest output shard, e.g. 500MB, 2GiB."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]

    def apply(fn: Callable[..., None]) -> Callable[..., None]:
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return apply


def _out_folder(positional: Path | None, option: Path | None) -> Path:
    """OUT given as mergekit's positional argument or as --out (both: they must agree)."""
    if positional is None and option is None:
        raise click.UsageError("give the output folder: distac merge CONFIG OUT (or --out OUT)")
    if positional is not None and option is not None and positional != option:
        raise click.UsageError(f"two output folders: OUT {positional} and --out {option}; give one")
    out = positional if positional is not None else option
    assert out is not None
    return out


@click.command("merge")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", metavar="[OUT]", required=False, type=click.Path(file_okay=False, path_type=Path))
@_writes_checkpoints("Output folder (written to a temporary folder, renamed when complete).", out_required=False)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available).")
@click.option(
    "--chunk-size",
    default="16MiB",
    show_default=True,
    help="Memory budget per piece of a tensor: the N+1 fp32 copies (base and N models) of one piece fit in "
    "it; larger tensors are merged in row chunks (methods that need whole tensors ignore it).",
)
@click.option("--export-per-task", is_flag=True, help="Also write OUT/tasks/<name>/: one full model per task.")
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Write merged tensors holding NaN/Inf or overflowing the output dtype (default: stop naming the tensor).",
)
@click.option(
    "--lora-rank",
    type=click.IntRange(min=1),
    default=None,
    help="Write a PEFT LoRA adapter of this rank (truncated SVD of each merged ΔW = merged - base) instead of "
    "the full model, for any method; the models must include LoRA adapters and no full fine-tune. The card "
    "lists each module's relative error.",
)
@click.option(
    "--max-error",
    type=click.FloatRange(min=0),
    default=None,
    help="With --lora-rank: fail, writing nothing and naming the module, when a module's relative Frobenius "
    "error ‖ΔW - BA‖/‖ΔW‖ exceeds this (e.g. 0.1).",
)
@click.option("--cuda", is_flag=True, hidden=True)  # mergekit-yaml's flags: see the docstring
@click.option("--lazy-unpickle/--no-lazy-unpickle", default=True, hidden=True)
@click.option("--allow-crimes", is_flag=True, hidden=True)
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, hidden=True)
def merge_command(
    config: Path,
    out_dir: Path | None,
    out: Path | None,
    overwrite: bool,
    device: str | None,
    shard_size: str,
    chunk_size: str,
    export_per_task: bool,
    quiet: bool,
    allow_nonfinite: bool,
    lora_rank: int | None,
    max_error: float | None,
    cuda: bool,
    lazy_unpickle: bool,
    allow_crimes: bool,
    copy_tokenizer: bool,
) -> None:
    """Merge the checkpoints named in CONFIG (a distac or mergekit YAML) into OUT (or --out OUT).

    \b
    CONFIG: merge_method (`distac methods` lists them, with their parameters), base_model, models
    (each `model:` an HF folder, a weights file, a Hub id org/name[@revision], a PEFT LoRA adapter
    folder, or mergekit's BASE+ADAPTER), parameters (top level, or per model under models[i]), and
    optionally out_dtype, heads; mergekit's own keys (linear, lambda, normalize, gradient lists,
    filters, slices, tokenizer_source, dtype) run unchanged: see "Coming from mergekit" in the README.
    OUT gets the merged model (or, with --lora-rank, an adapter), a model card (README.md) and
    distac_config.yml to re-run the merge.

    \b
    mergekit-yaml's --cuda (= --device cuda), --lazy-unpickle, --allow-crimes and --copy-tokenizer
    are accepted, so its command lines run as they are: distac always reads tensors lazily, checks
    the tensors' names and shapes (not the architecture's name), and copies the base's tokenizer.
    """
    if not copy_tokenizer:
        raise click.UsageError("--no-copy-tokenizer: distac always writes the base's tokenizer files; remove it")
    if cuda and device not in (None, "cuda") and not str(device).startswith("cuda:"):
        raise click.UsageError(f"--cuda and --device {device} disagree; give one")
    path = merge_checkpoints(
        config,
        _out_folder(out_dir, out),
        overwrite=overwrite,
        device=device or ("cuda" if cuda else None),
        max_shard_bytes=shard_size,
        chunk_bytes=chunk_size,
        export_per_task=export_per_task,
        quiet=quiet,
        allow_nonfinite=allow_nonfinite,
        lora_rank=lora_rank,
        max_error=max_error,
    )
    click.echo(str(path))


def describe_method(m: Method) -> list[str]:
    """Lines describing one method for ``distac methods``: summary, paper, parameters, engine needs."""
    needs = [
        "row-chunked"
        if m.chunkable is True
        else "whole tensors"
        if m.chunkable is False
        else "row-chunked for some parameters"
    ]
    if m.prepass is not None:
        needs.append("global pre-pass for some parameters")
    if m.stats:
        needs.append("statistics: " + ", ".join(m.stats))
    count = f"{m.min_models}" + (f"..{m.max_models}" if m.max_models != m.min_models else "")
    count = count.replace("..None", "+")
    lines = [f"{m.name}  ({count} models; {'; '.join(needs)})", f"    {m.summary}", f"    paper: {m.paper}"]
    lines += [f"    {p.describe()}" for p in m.params.values()] or ["    (no parameters)"]
    lines.append(f"    memory: {m.memory}")
    return lines


HEADER = (
    "Each method: name (how many models; how the engine reads tensors), summary, paper, then its parameters\n"
    "as name=default, '(per model)' when it may be set per model under models[i].parameters (else only under\n"
    "the top-level parameters), and the allowed range. `merge_method: linear` (mergekit) is accepted too:\n"
    "`distac methods linear`."
)
LINEAR = (
    "linear  (mergekit's name; 1+ models, no base needed)\n"
    "    A config with merge_method: linear runs unchanged with mergekit's meaning: normalize: true (its\n"
    "    default) is `average` of the models with their weights (weights / their sum); normalize: false is\n"
    "    Σ w_i θ_i (`task_arithmetic` against zero weights). A base_model is one of the averaged models: list\n"
    "    it under models (or give a top-level weight). See `distac methods average` and 'Coming from\n"
    "    mergekit' in the README."
)


@click.command("methods")
@click.argument("name", required=False)
def methods_command(name: str | None) -> None:
    """List every merge method with its parameters (name=default, range, per model) and paper."""
    if name == EMR.name:
        click.echo("\n".join(describe_emr(full=True)))
        return
    if name == "linear":  # mergekit's name, accepted in configs: say what it runs as
        click.echo(LINEAR)
        return
    chosen = [get_method(name)] if name else list(METHODS.values())
    if not name:
        click.echo(HEADER + "\n")
    for i, m in enumerate(chosen):
        if i:
            click.echo("")
        click.echo("\n".join(describe_method(m)))
        if name and m.notes:
            click.echo(f"    convention: {m.notes}")
    if not name:
        click.echo(f"\n{len(chosen)} methods. `distac methods NAME` adds the convention notes.", file=sys.stdout)
        click.echo("\nNot one merged model (not per tensor):\n" + "\n".join(describe_emr()))


@click.command("export-tasks")
@click.argument("merged", type=click.Path(file_okay=False, path_type=Path))
@_writes_checkpoints("Folder to create: OUT/<task>/, one complete checkpoint per task.")
@click.option("--base", default=None, help="EMR bundle only: θ0, when not at the path the bundle records.")
def export_tasks_command(
    merged: Path, out: Path, base: str | None, overwrite: bool, shard_size: str, quiet: bool
) -> None:
    """Write one complete model per task from MERGED: a `distac merge` output with heads, or an EMR bundle.

    A merge with heads gives the merged weights plus each task's head (calibrated when `distac
    calibrate` wrote temperatures); an EMR bundle gives each task's θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni.
    """
    if (merged / MANIFEST).is_file():
        bundle = load_emr_bundle(merged, base=base)
        try:
            written = export_per_task(bundle, out, overwrite=overwrite, max_shard_bytes=shard_size, quiet=quiet)
        finally:
            bundle.close()
    elif base is not None:
        raise DistacError(f"{merged}: --base is for EMR bundles (a folder with {MANIFEST}); remove it")
    else:
        written = export_task_models(merged, out, overwrite=overwrite, max_shard_bytes=shard_size, quiet=quiet)
    for folder in written.values():
        click.echo(str(folder))

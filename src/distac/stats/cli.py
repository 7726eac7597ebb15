"""``distac stats fisher|gram|adam``: compute curvature statistics and write them as sidecars."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import click

from ..errors import DistacError

Estimator = Literal["sampled", "exact", "empirical"]
Scale = Literal["sum", "mean"]


def _model_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.option("--arch", "factory", default=None, help="package.module:factory building the torch module."),
            click.option("--num-labels", type=int, default=None, help="Classes of a bare HF encoder's head."),
        ]
    ):
        f = opt(f)
    return f


def _data_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.option("--column", default=None, help="Input column (CSV/JSONL/HF dataset) or array (.npz)."),
            click.option("--label-column", default=None, help="Label column / array."),
            click.option("--labels", "labels_file", default=None, help="Separate labels file (.npy or .txt)."),
            click.option("--split", default=None, help="Split of a saved DatasetDict."),
            click.option("--max-length", type=int, default=128, show_default=True, help="Tokeniser truncation."),
            click.option("--n-examples", type=int, default=None, help="Use at most this many examples."),
            click.option("--batch-size", type=int, default=8, show_default=True),
            click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
        ]
    ):
        f = opt(f)
    return f


def _out_options(f: Any) -> Any:
    f = click.option("--overwrite", is_flag=True, help="Replace an existing file at --out (never an input).")(f)
    return click.option(
        "--out", required=True, type=click.Path(dir_okay=False), help="Sidecar to write (.safetensors)."
    )(f)


def _inputs(*paths: str | None) -> list[Path]:
    """What a statistics command reads; the sidecar may never replace one of them.

    A model folder contributes its files rather than itself, so a sidecar may be written next to
    the weights (``model/fisher.safetensors``) but never over one of them.
    """
    from ..io.lora import split_adapter_ref

    out: list[Path] = []
    for p in paths:
        if p is None:
            continue
        model, adapter = split_adapter_ref(str(p))  # BASE+ADAPTER reads both
        for path in (Path(model), *([Path(adapter)] if adapter else [])):
            out.extend(sorted(path.iterdir()) if path.is_dir() else [path])
    return out


def _check_out(out: str, overwrite: bool, inputs: list[Path]) -> list[Path]:
    """Refuse a bad --out before any work is done (and again when writing); return the inputs."""
    from ..io import check_output

    check_output(out, overwrite=overwrite, inputs=inputs, folder=False)
    return inputs


def _load(model: str, data: str, *, factory: str | None, num_labels: int | None, need_labels: bool, **kw: Any):
    """The model through distac.nn.models and its data through distac.nn.data (tokenised with its tokenizer)."""
    from ..nn.data import load_inputs
    from ..nn.models import load_model

    loaded = load_model(model, factory=factory, num_labels=num_labels)
    inputs = load_inputs(
        data,
        tokenizer=loaded.tokenizer,
        image_processor=loaded.image_processor,
        column=kw["column"],
        label_column=kw["label_column"],
        labels=kw["labels_file"],
        need_labels=need_labels,
        max_length=kw["max_length"],
        split=kw["split"],
    )
    return loaded, inputs


def _as_checkpoint(loaded: Any, *maps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``maps`` under the checkpoint's own tensor names: a bare encoder is loaded wrapped with a new
    head (``EncoderClassifier``: its weights under ``encoder.``, a random ``head.*``), so its
    statistics are renamed back and the head, which no checkpoint holds, is left out; else unchanged.
    Without this, ``distac merge`` refuses the sidecar of the very model it was computed on."""
    if loaded.kind != "hf-encoder":
        return [dict(m) for m in maps]
    return [{k.removeprefix("encoder."): v for k, v in m.items() if k.startswith("encoder.")} for m in maps]


def _batches(inputs: Any, batch_size: int, n_examples: int | None, with_labels: bool) -> Iterator[Any]:
    """Consecutive slices (views, no copies) of the first ``n_examples``, with labels when asked."""
    if batch_size < 1:
        raise DistacError(f"--batch-size must be >= 1, got {batch_size}")
    if with_labels and inputs.labels is None:
        raise DistacError(f"{inputs.source}: no labels (give --label-column or --labels)")
    stop = len(inputs) if n_examples is None else min(n_examples, len(inputs))
    for i in range(0, stop, batch_size):
        idx = slice(i, min(i + batch_size, stop))
        yield (inputs.select(idx), inputs.labels[idx]) if with_labels else inputs.select(idx)


@click.group("stats")
def stats_command() -> None:
    """Compute curvature statistics (Fisher, Gram, Adam) as safetensors sidecars for curvature merges."""


@stats_command.command("fisher")
@click.argument("model")
@click.argument("data")
@_out_options
@click.option(
    "--estimator",
    type=click.Choice(["sampled", "exact", "empirical"]),
    default="sampled",
    show_default=True,
    help="sampled: label drawn from the model (official UBGM); exact: expectation over classes "
    "(Matena & Raffel); empirical: true labels.",
)
@click.option(
    "--scale",
    type=click.Choice(["sum", "mean"]),
    default="sum",
    show_default=True,
    help="sum: N × mean Fisher (what gradient_matching expects); mean: ÷ N.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the label sampler.")
@_model_options
@_data_options
def fisher_cmd(
    model: str,
    data: str,
    out: str,
    overwrite: bool,
    estimator: str,
    scale: str,
    seed: int,
    factory: str | None,
    num_labels: int | None,
    n_examples: int | None,
    batch_size: int,
    device: str | None,
    **data_kw: Any,
) -> None:
    """Diagonal Fisher of MODEL on DATA from per-example gradients.

    MODEL is a Hugging Face classifier directory, or a weights file with --arch package.module:factory.
    The result is on the sum scale (N × mean Fisher) unless --scale mean.
    """
    from ..nn.models import default_device
    from .fisher import fisher_diagonal
    from .sidecar import save_stats

    read = _check_out(out, overwrite, _inputs(model, data, data_kw["labels_file"]))
    need = estimator == "empirical"
    loaded, inputs = _load(model, data, factory=factory, num_labels=num_labels, need_labels=need, **data_kw)
    info: dict[str, Any] = {}
    f = fisher_diagonal(
        loaded.module,
        _batches(inputs, batch_size, n_examples, need),
        estimator=cast(Estimator, estimator),
        n_examples=n_examples,
        scale=cast(Scale, scale),
        seed=seed,
        device=default_device(device),
        progress=True,
        info=info,
    )
    f, state = _as_checkpoint(loaded, f, loaded.state)
    path = save_stats(
        out,
        f,
        kind="fisher",
        model=state,
        n_examples=info["n_examples"],
        scale=scale,
        estimator=estimator,
        data_fingerprint=info["data_fingerprint"],
        overwrite=overwrite,
        inputs=read,
    )
    n = info["n_examples"]
    click.echo(f"wrote {path}: {estimator} Fisher ({scale} scale) of {len(f)} tensors over {n} examples")


@stats_command.command("gram")
@click.argument("model")
@click.argument("data")
@_out_options
@click.option(
    "--scale",
    type=click.Choice(["mean", "sum"]),
    default="mean",
    show_default=True,
    help="mean: XᵀX / rows (official RegMean); sum: XᵀX.",
)
@_model_options
@_data_options
def gram_cmd(
    model: str,
    data: str,
    out: str,
    overwrite: bool,
    scale: str,
    factory: str | None,
    num_labels: int | None,
    n_examples: int | None,
    batch_size: int,
    device: str | None,
    **data_kw: Any,
) -> None:
    """Gram matrices XᵀX of linear-layer inputs, for RegMean.

    Every nn.Linear / HF Conv1D of MODEL on DATA; padding positions are left out; stored as the
    running mean XᵀX / rows (official RegMean) unless --scale sum.
    """
    from ..nn.models import default_device
    from .gram import gram_matrices
    from .sidecar import save_stats

    read = _check_out(out, overwrite, _inputs(model, data, data_kw["labels_file"]))
    loaded, inputs = _load(model, data, factory=factory, num_labels=num_labels, need_labels=False, **data_kw)
    info: dict[str, Any] = {}
    g = gram_matrices(
        loaded.module,
        _batches(inputs, batch_size, n_examples, False),
        n_examples=n_examples,
        scale=cast(Scale, scale),
        device=default_device(device),
        progress=True,
        info=info,
    )
    g, state, rows, layout = _as_checkpoint(loaded, g, loaded.state, info["rows"], info["layout"])
    path = save_stats(
        out,
        g,
        kind="gram",
        model=state,
        n_examples=info["n_examples"],
        scale=scale,
        estimator="forward",
        data_fingerprint=info["data_fingerprint"],
        rows=rows,
        layout=layout,
        overwrite=overwrite,
        inputs=read,
    )
    layouts = sorted(set(info["layout"].values()))
    hint = f"; merge with regmean layout={layouts[0]}" if len(layouts) == 1 else ""
    click.echo(f"wrote {path}: Grams of {len(g)} linear layers over {info['n_examples']} examples{hint}")


@stats_command.command("adam")
@click.argument("model")
@click.argument("optimizer_state", type=click.Path(exists=True, dir_okay=False))
@_out_options
@click.option("--n-examples", type=int, required=True, help="N, the size of the training set.")
@click.option("--batch-size", type=int, required=True, help="B, the training batch size.")
@click.option("--no-bias-correction", is_flag=True, help="Use exp_avg_sq as stored (no ÷ (1 − β₂^step)).")
@_model_options
def adam_cmd(
    model: str,
    optimizer_state: str,
    out: str,
    overwrite: bool,
    n_examples: int,
    batch_size: int,
    no_bias_correction: bool,
    factory: str | None,
    num_labels: int | None,
) -> None:
    """Adam second moments as a sum-scale Fisher proxy, H ≈ N·B·v.

    OPTIMIZER_STATE is torch.save(optimizer.state_dict()) of the fine-tuning run; MODEL gives the
    parameter names in the order they were handed to the optimizer.
    """
    from ..nn.models import load_model
    from .fisher import adam_fisher
    from .sidecar import save_stats

    read = _check_out(out, overwrite, _inputs(model, optimizer_state))
    loaded = load_model(model, factory=factory, num_labels=num_labels)
    f = adam_fisher(
        optimizer_state,
        loaded.module,
        n_examples=n_examples,
        batch_size=batch_size,
        bias_correction=not no_bias_correction,
    )
    f, state = _as_checkpoint(loaded, f, loaded.state)
    path = save_stats(
        out,
        f,
        kind="adam",
        model=state,
        n_examples=n_examples,
        scale="sum",
        estimator="adam",
        overwrite=overwrite,
        inputs=read,
    )
    click.echo(f"wrote {path}: Adam curvature proxy (sum scale, N·B·v) of {len(f)} tensors")

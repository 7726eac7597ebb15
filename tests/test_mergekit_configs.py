"""mergekit's own configs through `distac merge`, unchanged except for the model paths.

The YAML texts below are mergekit 0.1.5's ``examples/*.yml`` verbatim and the configs of its
``tests/test_basic_merges.py`` (``two_model_config`` and friends) written out as YAML; only the Hub
repo ids are replaced by tiny local Llama / Mistral / BERT checkpoints built here (and the examples'
``layer_range`` of 40-layer models by ranges of their 3 layers). Each one runs
through ``distac merge CONFIG OUT`` and its result is checked against what mergekit's semantics
give. Configs of methods distac does not have are skipped, naming the method.

With ``DISTAC_MERGEKIT=/path/to/mergekit-yaml`` set, mergekit runs the same config and every
tensor is compared (:func:`_compare`): equal within the rounding of the config's ``dtype``
(mergekit computes in it, distac in fp32), or different by a documented convention that is
asserted as such (TIES keeps ``int(n·d)+1`` entries per tensor where mergekit keeps ``int(n·d)``;
DARE's and DELLA's random masks, DARE's rescale; Breadcrumbs per row).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from distac.merging.config import load_config
from distac.merging.mergekit import evaluate_setting, layer_positions, mergekit_reason

transformers = pytest.importorskip("transformers")

MERGEKIT = os.environ.get("DISTAC_MERGEKIT")

# ------------------------------------------------------------------------------------------------
# mergekit's examples/*.yml, verbatim (0.1.5)
# ------------------------------------------------------------------------------------------------
EXAMPLES = {
    "examples/linear.yml": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "examples/ties.yml": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "examples/bio-merge.yml": """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "examples/gradient-slerp.yml": """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    # the same, in "the equivalent models: syntax" its comment gives
    "examples/gradient-slerp.yml (models: syntax)": """\
models:
  - model: psmathur/orca_mini_v3_13b
  - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "examples/orcamini-platy-44layer.yml": """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "examples/arcee_fusion.yml": """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
}

#: the tiny stand-ins for the examples' Hub models (one Llama family, one Mistral family)
REPOS = {
    "TheBloke/Llama-2-13B-fp16": "llama_base",
    "psmathur/orca_mini_v3_13b": "llama_a",
    "garage-bAInd/Platypus2-13B": "llama_b",
    "WizardLM/WizardLM-13B-V1.2": "llama_c",
    "WizardLM/WizardMath-13B-V1.0": "llama_c",
    "mistralai/Mistral-7B-v0.1": "mistral_base",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral_a",
    "BioMistral/BioMistral-7B": "mistral_b",
    "model_a": "llama_a",
    "model_b": "llama_b",
}


def two_model_config(a: str, b: str, merge_method: str, base_model: str | None = None, params: str = "") -> str:
    """mergekit's ``TestBasicMerges.two_model_config`` as YAML: weights 0.6 / 0.4, dtype bfloat16."""
    text = f"""\
merge_method: {merge_method}
{f"base_model: {base_model}" if base_model else ""}
models:
  - model: {a}
    parameters:
      weight: 0.6
  - model: {b}
    parameters:
      weight: 0.4
dtype: bfloat16
"""
    return text + (f"parameters:\n{params}" if params else "")


# ------------------------------------------------------------------------------------------------
# the configs of mergekit's tests/test_basic_merges.py (model_a/b/c: tiny Llamas; granite: Mistral)
# ------------------------------------------------------------------------------------------------
BASIC = {
    "test_linear_merge": two_model_config("llama_a", "llama_b", "linear"),
    "test_slerp_merge": two_model_config("llama_a", "llama_b", "slerp", "llama_a", "  t: 0.35\n"),
    "test_task_arithmetic_merge": two_model_config("llama_a", "llama_b", "task_arithmetic", "llama_c"),
    "test_breadcrumbs_merge": two_model_config("llama_a", "llama_b", "breadcrumbs", "llama_c"),
    "test_ties_merge": two_model_config("llama_a", "llama_b", "ties", "llama_c", "  density: 0.3\n"),
    "test_dare_ties_merge": two_model_config("llama_a", "llama_b", "dare_ties", "llama_c", "  density: 0.66\n"),
    "test_model_stock_merge": two_model_config("llama_b", "llama_c", "model_stock", "llama_a"),
    "test_model_stock_filterwise_merge": two_model_config(
        "llama_b", "llama_c", "model_stock", "llama_a", "  filter_wise: true\n"
    ),
    "test_granite_linear_merge": two_model_config("mistral_a", "mistral_b", "linear"),
    "test_granite_slerp": two_model_config("mistral_a", "mistral_b", "slerp", "mistral_a", "  t: 0.5\n"),
    "test_nuslerp_merges (base_model None)": two_model_config(
        "llama_a", "llama_b", "nuslerp", None, "  nuslerp_row_wise: false\n  nuslerp_flatten: false\n"
    ),
    "test_nuslerp_merges (base_model c)": two_model_config(
        "llama_a", "llama_b", "nuslerp", "llama_c", "  nuslerp_row_wise: true\n  nuslerp_flatten: false\n"
    ),
    "test_multislerp_merge": two_model_config("llama_a", "llama_b", "multislerp", "llama_c"),
    "test_della_merge": two_model_config(
        "llama_a", "llama_b", "della", "llama_c", "  density: 0.66\n  epsilon: 0.05\n  lambda: 0.5\n"
    ),
    "test_karcher_merge": two_model_config("llama_a", "llama_b", "karcher", "llama_c", "  max_iter: 5\n  tol: 1e-5\n"),
    "test_passthrough_scale": """\
merge_method: passthrough
models:
  - model: llama_a
    parameters:
      scale:
        - filter: o_proj
          value: 0
        - value: 1
""",
    "test_gpt2_copy / test_granite_copy": "merge_method: passthrough\nmodels:\n  - model: llama_a\ndtype: bfloat16\n",
    "test_gpt2_stack": """\
merge_method: passthrough
slices:
  - sources:
      - model: llama_a
        layer_range: [0, 3]
  - sources:
      - model: llama_a
        layer_range: [0, 3]
dtype: bfloat16
""",
    "test_della_invalid_epsilon": two_model_config(
        "llama_a", "llama_b", "della", "llama_c", "  density: 0.66\n  epsilon: 1.35\n  lambda: 0.5\n"
    ),
    "test_sce_merge": two_model_config("llama_a", "llama_b", "sce", "llama_c", "  select_topk: 0.5\n"),
    "test_ram_merge": two_model_config("llama_a", "llama_b", "ram", "llama_c"),
    "test_arcee_fusion_merge": two_model_config("llama_a", "llama_b", "arcee_fusion", "llama_a"),
    "test_nearswap_merge": two_model_config("llama_a", "llama_b", "nearswap", "llama_a", "  t: 0.0001\n"),
    # a BERT encoder through the same shapes (mergekit has a bert architecture)
    "bert: test_linear_merge": two_model_config("bert_a", "bert_b", "linear"),
    "bert: test_ties_merge": two_model_config("bert_a", "bert_b", "ties", "bert_base", "  density: 0.3\n"),
}


def _absent(what: str) -> pytest.MarkDecorator:
    return pytest.mark.skip(reason=f"not in distac: {what}")


#: mergekit methods distac does not have
MARKS = {
    "examples/arcee_fusion.yml": _absent("arcee_fusion merge method"),
    "test_sce_merge": _absent("sce merge method"),
    "test_ram_merge": _absent("ram merge method"),
    "test_arcee_fusion_merge": _absent("arcee_fusion merge method"),
    "test_nearswap_merge": _absent("nearswap merge method"),
}


# ------------------------------------------------------------------------------------------------
# tiny checkpoints
# ------------------------------------------------------------------------------------------------
def _perturbed(model: torch.nn.Module, seed: int, eps: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(eps * torch.randn(p.shape, generator=g))


def _save_family(root: Path, make, prefix: str, dtype: torch.dtype, names: tuple[str, ...]) -> None:
    """A base and fine-tunes of it (base + a small random task vector), saved by transformers."""
    torch.manual_seed(0)
    base = make()
    for i, name in enumerate(names):
        model = make()
        model.load_state_dict(base.state_dict())
        if name != "base":
            _perturbed(model, 100 + i, 0.02)
        model.to(dtype).save_pretrained(root / f"{prefix}_{name}", safe_serialization=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit_zoo")
    tf = transformers
    common = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3}
    llama = tf.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mistral = tf.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    bert = tf.BertConfig(**common, num_attention_heads=4, max_position_embeddings=32, type_vocab_size=2)
    names = ("base", "a", "b", "c")
    _save_family(root, lambda: tf.LlamaForCausalLM(llama), "llama", torch.bfloat16, names)
    _save_family(root, lambda: tf.MistralForCausalLM(mistral), "mistral", torch.bfloat16, names)
    _save_family(root, lambda: tf.BertModel(bert, add_pooling_layer=False), "bert", torch.bfloat16, names)
    return root


#: the examples' layer ranges of 13B models (40 layers) scaled to the tiny models' 3 layers
LAYER_RANGES = {"[0, 40]": "[0, 3]", "[0, 24]": "[0, 2]", "[20, 40]": "[1, 3]"}


def _localise(text: str, root: Path) -> str:
    for big, tiny in LAYER_RANGES.items():
        text = text.replace(f"layer_range: {big}", f"layer_range: {tiny}")
    for repo, local in sorted(REPOS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"model: {repo}\n", f"model: {root / local}\n")
        text = text.replace(f"base_model: {repo}\n", f"base_model: {root / local}\n")
    for local in ("llama", "mistral", "bert"):
        for n in ("base", "a", "b", "c"):
            text = text.replace(f"model: {local}_{n}\n", f"model: {root / f'{local}_{n}'}\n")
    return text


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------------
# what mergekit's semantics give, computed here for the configs whose result has a closed form
# ------------------------------------------------------------------------------------------------
def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double(), v1.double()
    na, nb = a.norm(), b.norm()
    dot = float((a / (na if na > 1e-8 else 1) * (b / (nb if nb > 1e-8 else 1))).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).float()
    th = math.acos(dot)
    return (math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b).float()


def _expect_linear(m: dict[str, dict], names: list[str], w: list[float], k: str) -> torch.Tensor:
    return sum(wi * m[n][k].float() for wi, n in zip(w, names, strict=True)) / sum(w)


def _gradient_t(k: str, positions: dict[str, float]) -> float:
    t = evaluate_setting(
        k,
        [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ],
        positions[k],
    )
    return float(t)


def _check_semantics(case: str, out: dict[str, torch.Tensor], root: Path) -> None:
    m = {n: _tensors(root / n) for n in ("llama_a", "llama_b", "llama_c", "llama_base", "mistral_a", "mistral_b")}
    k0 = next((k for k in out if k.endswith("q_proj.weight")), "")
    tol = {"atol": 2e-3, "rtol": 1e-2}
    if case == "examples/linear.yml":  # three models averaged (mergekit normalizes the weights)
        for k in out:
            want = _expect_linear(m, ["llama_a", "llama_c", "llama_b"], [1.0, 0.3, 0.5], k)
            torch.testing.assert_close(out[k].float(), want.half().float(), **tol)
        assert out[k0].dtype == torch.float16
    elif case in ("test_linear_merge", "test_granite_linear_merge"):
        fam = "llama" if case == "test_linear_merge" else "mistral"
        for k in out:
            want = _expect_linear(m, [f"{fam}_a", f"{fam}_b"], [0.6, 0.4], k)
            torch.testing.assert_close(out[k].float(), want, **tol)
        assert out[k0].dtype == torch.bfloat16
    elif case in ("test_slerp_merge", "test_granite_slerp"):  # from the base (model a) to model b
        fam, t = ("llama", 0.35) if case == "test_slerp_merge" else ("mistral", 0.5)
        for k in out:
            torch.testing.assert_close(
                out[k].float(), _slerp(t, m[f"{fam}_a"][k].float(), m[f"{fam}_b"][k].float()), **tol
            )
    elif case in ("examples/gradient-slerp.yml", "examples/gradient-slerp.yml (models: syntax)"):
        pos = layer_positions(list(out))
        assert _gradient_t("model.layers.0.self_attn.q_proj.weight", pos) == 0
        assert _gradient_t("model.layers.1.self_attn.q_proj.weight", pos) == 0.3
        assert _gradient_t("model.layers.1.mlp.up_proj.weight", pos) == 0.7
        for k in out:
            want = _slerp(_gradient_t(k, pos), m["llama_a"][k].float(), m["llama_b"][k].float())
            torch.testing.assert_close(out[k].float(), want, **tol)
    elif case == "test_passthrough_scale":  # mergekit's own validation of this config
        assert all((out[k] == 0).all() for k in out if "o_proj" in k)
        assert all(out[k].count_nonzero() > 0 for k in out if "lm_head" in k)
    elif case == "test_gpt2_copy / test_granite_copy":
        assert all(torch.equal(out[k].float(), m["llama_a"][k].float()) for k in out)
    elif case == "test_task_arithmetic_merge":
        for k in out:
            c = m["llama_c"][k].float()
            want = c + 0.6 * (m["llama_a"][k].float() - c) + 0.4 * (m["llama_b"][k].float() - c)
            torch.testing.assert_close(out[k].float(), want, **tol)


# ------------------------------------------------------------------------------------------------
# the cross-check against mergekit itself
# ------------------------------------------------------------------------------------------------
#: configs whose outputs differ from mergekit's by a documented convention, and why
CONVENTIONS = {
    "test_ties_merge": "ties",
    "bert: test_ties_merge": "ties",
    "examples/ties.yml": "ties",
    "examples/bio-merge.yml": "ties",
    "test_dare_ties_merge": "dare",
    "test_della_merge": "della",
}
WHY = {
    "ties": "TIES keeps every entry tied with the int(n·d)-th magnitude (at least int(n·d)+1), mergekit int(n·d)",
    "dare": "DARE: distac's own counter-based masks and exact 1/density rescale (mergekit: torch RNG, L1 matching)",
    "della": "DELLA: distac's counter-based draws (mergekit: torch.bernoulli; equal given the same draws)",
}


@dataclass
class Compared:
    tensors: int = 0
    max_abs: float = 0.0
    differing: int = 0  # entries beyond the rounding of the config's dtype
    total: int = 0
    outside_ties: int = 0  # of those, entries where no model's |τ| is at its TIES threshold
    only_distac: list[str] = field(default_factory=list)


def _differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entries beyond mergekit's rounding: it computes in the config's dtype, so each of its few
    operations may be off by an ulp of the operands (bounded by the tensor's largest magnitude)."""
    d = (a.float() - b.float()).abs()
    scale = max(float(a.float().abs().max()), float(b.float().abs().max()), 1e-6)
    return d > 4 * torch.finfo(b.dtype).eps * scale


def _tie_positions(cfg_path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Per tensor, the entries where some model's |τ| is (within fp16 rounding) the magnitude at
    mergekit's cut, rank int(n·d): distac keeps all of them, mergekit exactly int(n·d)."""
    cfg = load_config(cfg_path)
    per = cfg.params.for_tensors(names) if hasattr(cfg.params, "for_tensors") else None
    base = _tensors(cfg.base.path)
    models = [_tensors(m.path) for m in cfg.models]
    out = {}
    for k in names:
        p = per[k] if per else dict(cfg.params)
        dens = p["density"] if isinstance(p["density"], list) else [p["density"]] * len(models)
        near = torch.zeros(base[k].numel(), dtype=torch.bool)
        for m, d in zip(models, dens, strict=True):
            mag = (m[k].float() - base[k].float()).abs().flatten()
            cut = int(d * mag.numel())
            if cut < mag.numel():
                t = mag.sort(descending=True).values[cut]
                near |= (mag - t).abs() <= t * 2**-8
        out[k] = near.reshape(base[k].shape)
    return out


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], ties=None) -> Compared:
    """Every tensor mergekit wrote against distac's (``ties``: the TIES tie positions per tensor)."""
    r = Compared(only_distac=sorted(set(ours) - set(theirs)))
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for k, b in theirs.items():
        a = ours[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        bad = _differing(a, b)
        r.tensors += 1
        r.total += b.numel()
        r.max_abs = max(r.max_abs, float((a.float() - b.float()).abs().max()))
        r.differing += int(bad.sum())
        if ties is not None:
            r.outside_ties += int((bad & ~ties[k]).sum())
    return r


#: configs mergekit 0.1.5 itself cannot run (its error), so there is nothing to compare
MERGEKIT_FAILS = {
    "bert: test_linear_merge": 'TypeError: can only concatenate list (not "tuple") to list',
    "bert: test_ties_merge": 'TypeError: can only concatenate list (not "tuple") to list',
}


def _delta_norm(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((merged[k].float() - base[k].float()).square().sum()) for k in merged))


def _run_mergekit(cfg: Path, out: Path, case: str) -> None:
    assert MERGEKIT is not None
    proc = subprocess.run(
        [MERGEKIT, str(cfg), str(out), "--no-lazy-unpickle", "--allow-crimes"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    if case in MERGEKIT_FAILS and MERGEKIT_FAILS[case] in proc.stderr:
        pytest.skip(f"mergekit fails on this config: {MERGEKIT_FAILS[case]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


CASES = {**EXAMPLES, **BASIC}

#: configs distac refuses on purpose, with the one line it prints (mergekit refuses the della one too)
REFUSED = {
    "test_model_stock_filterwise_merge": "'filter_wise: true' (per-row Model Stock) is not offered by distac",
    "test_della_invalid_epsilon": "epsilon",
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=MARKS[c]) if c in MARKS else c for c in CASES])
def test_mergekit_config_runs_unchanged(case, zoo, tmp_path, capsys):
    text = _localise(CASES[case], zoo)
    cfg = tmp_path / "config.yml"
    cfg.write_text(text)
    code, _out, err = run_cli(["merge", str(cfg), str(tmp_path / "out"), "-q"], capsys)
    if case in REFUSED:
        assert code == 2 and REFUSED[case] in err and len(err.strip().splitlines()) == 1, err
        return
    assert code == 0, err
    out = _tensors(tmp_path / "out")
    assert out and all(torch.isfinite(t.float()).all() for t in out.values())
    _check_semantics(case, out, zoo)
    if MERGEKIT is None:
        return
    _run_mergekit(cfg, tmp_path / "mk", case)
    theirs = _tensors(tmp_path / "mk")
    kind = CONVENTIONS.get(case)
    ties = _tie_positions(cfg, list(theirs)) if kind == "ties" else None
    r = _compare(out, theirs, ties)
    print(
        f"CROSSCHECK | {case} | {r.tensors} | {r.max_abs:.3g} | {r.differing}/{r.total} | "
        f"{r.outside_ties if kind == 'ties' else '-'} | {WHY.get(kind or '', 'none')}"
    )
    if kind is None:
        assert r.differing == 0, (case, r)
    elif kind == "ties":  # every difference is at a tied threshold magnitude
        assert r.outside_ties == 0, (case, r)
    else:  # DARE, DELLA: different random masks, the same expected task vector: its norm agrees
        base = _tensors(zoo / "llama_c")
        ratio = _delta_norm(out, base) / _delta_norm(theirs, base)
        print(f"CROSSCHECK | {case} | merged task vector norm, distac / mergekit = {ratio:.3f}")
        assert 0.8 < ratio < 1.25, ratio


# ------------------------------------------------------------------------------------------------
# the pieces, one by one
# ------------------------------------------------------------------------------------------------
def test_evaluate_setting_is_mergekits():
    assert evaluate_setting("a", 0.5, 0.7) == 0.5
    assert evaluate_setting("a", [0, 1], 0.25) == 0.25
    assert evaluate_setting("a", [1, 0.7, 0.1], 0.5) == 0.7
    assert evaluate_setting("a", [0, 0.3, 0.7, 1], 1.0) == 1
    assert evaluate_setting("x.mlp.w", [{"filter": "mlp", "value": 0.5}, {"value": 0}], 0) == 0.5
    assert evaluate_setting("x.attn.w", [{"filter": "mlp", "value": 0.5}, {"value": 0}], 0) == 0
    assert evaluate_setting("x.attn.w", [{"filter": "mlp", "value": 0.5}], 0) is None
    assert evaluate_setting("x.mlp.w", [{"filter": "mlp", "value": [0, 1]}, {"value": 0}], 0.5) == 0.5


def test_layer_positions_follow_mergekits_t():
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)], "lm_head.weight"]
    pos = layer_positions(names)
    assert [pos[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert pos["model.embed_tokens.weight"] == 0 and pos["lm_head.weight"] == 0
    assert layer_positions(["encoder.layer.0.w"]) == {"encoder.layer.0.w": 1.0}  # one layer: t = 1, as mergekit


def test_the_reading_rule():
    ties = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    assert mergekit_reason(ties) is not None  # mergekit requires a weight; distac users set scale etc.
    assert mergekit_reason({**ties, "parameters": {"scale": 0.5}}) is None
    assert mergekit_reason({"merge_method": "ties", "base_model": "b", "models": ["a"]}) is None
    assert mergekit_reason({**ties, "parameters": {"normalize": True, "scale": 1}}) == "parameter 'normalize'"
    assert mergekit_reason({"merge_method": "slerp", "base_model": "a", "models": ["a", "b"]}) is not None


def _llama_cfg(zoo: Path, tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yml"
    p.write_text(_localise(text, zoo))
    return p


def test_ties_normalize_divides_by_the_agreeing_weights(zoo, tmp_path, capsys):
    """mergekit's README TIES shape (weights 0.6/0.4, normalize: true): Σ_A w τ / Σ_A w, not / |A|."""
    text = two_model_config("llama_a", "llama_b", "ties", "llama_c", "  density: 1.0\n  normalize: true\n")
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), str(tmp_path / "o"), "-q"], capsys)
    assert code == 0, err
    k = "model.layers.0.self_attn.q_proj.weight"
    a, b, c = (_tensors(zoo / n)[k].float() for n in ("llama_a", "llama_b", "llama_c"))
    x = torch.stack([0.6 * (a - c), 0.4 * (b - c)])
    w = torch.tensor([0.6, 0.4]).reshape(2, 1, 1)
    sign = (x.sum(0) >= 0).float() * 2 - 1
    agree = (x * sign) > 0
    den = (w * agree).sum(0)
    den[den == 0] = 1
    want = c + (x * agree).sum(0) / den
    torch.testing.assert_close(_tensors(tmp_path / "o")[k].float(), want, atol=2e-3, rtol=1e-2)


def test_distac_reading_is_unchanged_without_mergekit_keys(zoo, tmp_path):
    text = two_model_config("llama_a", "llama_b", "ties", "llama_c", "  density: 0.3\n  scale: 1.0\n")
    cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert cfg.mergekit is None and cfg.params["weights"] == [0.6, 0.4] and "scope" not in cfg.params
    mk = load_config(_llama_cfg(zoo, tmp_path, two_model_config("llama_a", "llama_b", "ties", "llama_c")))
    assert mk.mergekit is not None and mk.params["scope"] == "tensor" and mk.params["density"] == 1.0


def test_linear_example_averages_three_models_and_needs_no_base(zoo, tmp_path):
    cfg = load_config(_llama_cfg(zoo, tmp_path, EXAMPLES["examples/linear.yml"]))
    assert cfg.method.name == "average" and len(cfg.models) == 3 and cfg.base.zero
    assert cfg.params["weights"] == [1.0, 0.3, 0.5] and cfg.out_dtype == torch.float16


def test_linear_with_normalize_false_sums_the_weighted_models(zoo, tmp_path, capsys):
    text = two_model_config("llama_a", "llama_b", "linear", params="  normalize: false\n")
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), str(tmp_path / "o"), "-q"], capsys)
    assert code == 0, err
    got = _tensors(tmp_path / "o")
    m = {n: _tensors(zoo / n) for n in ("llama_a", "llama_b")}
    for k in got:
        want = 0.6 * m["llama_a"][k].float() + 0.4 * m["llama_b"][k].float()
        torch.testing.assert_close(got[k].float(), want, atol=2e-3, rtol=1e-2)


def test_slerp_base_among_models_is_the_start_point(zoo, tmp_path):
    text = two_model_config("llama_b", "llama_a", "slerp", "llama_a", "  t: 0.35\n")
    cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert [m.path.name for m in cfg.models] == ["llama_a", "llama_b"] and cfg.base.path.name == "llama_a"


def test_top_level_weight_list_is_a_layer_gradient(zoo, tmp_path):
    text = f"merge_method: linear\nmodels:\n  - model: {zoo / 'llama_a'}\n  - model: {zoo / 'llama_b'}\n"
    text += "parameters:\n  weight: [0.2, 0.8]\n"
    cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    per = cfg.params.for_tensors(["model.layers.0.w", "model.layers.2.w", "lm_head.weight"])
    assert per["model.layers.0.w"]["weights"] == [0.2, 0.2]
    assert per["model.layers.2.w"]["weights"] == [0.8, 0.8]
    assert per["lm_head.weight"]["weights"] == [0.2, 0.2]


def test_lambda_is_scale_and_rescale_false_keeps_dare_unscaled(zoo, tmp_path):
    text = two_model_config("llama_a", "llama_b", "dare_linear", "llama_c", "  lambda: 0.5\n  rescale: false\n")
    text = text.replace("weight: 0.6", "weight: 0.6\n      density: 0.5")
    cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert cfg.params["scale"] == 0.5
    assert cfg.params["weights"] == [0.6 * 0.5, 0.4 * 1.0]  # the kept entries are not divided by density


def test_mixing_mergekit_and_distac_spellings_is_an_error(zoo, tmp_path, capsys):
    text = two_model_config("llama_a", "llama_b", "ties", "llama_c", "  lambda: 0.5\n  scale: 0.5\n")
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), str(tmp_path / "o")], capsys)
    assert code == 2 and "'lambda' (mergekit) and 'scale' (distac) are both set" in err


def test_weight_on_slerp_is_ignored_with_a_warning(zoo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="distac.merging"):
        load_config(_llama_cfg(zoo, tmp_path, BASIC["test_slerp_merge"]))
    assert "the per-model 'weight' is ignored, as mergekit ignores it" in caplog.text
    assert "read with mergekit's meaning (per-model 'weight' with 'slerp'" in caplog.text


def test_base_dropped_from_ties_is_said(zoo, tmp_path, caplog):
    text = two_model_config("llama_c", "llama_b", "ties", "llama_c")
    with caplog.at_level(logging.WARNING, logger="distac.merging"):
        cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert [m.path.name for m in cfg.models] == ["llama_b"] and "is the base_model" in caplog.text


def test_dtype_float32_writes_float32_on_bf16_models(zoo, tmp_path, capsys):
    text = two_model_config("llama_a", "llama_b", "linear").replace("dtype: bfloat16", "dtype: float32")
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 0, err
    assert {t.dtype for t in _tensors(tmp_path / "o").values()} == {torch.float32}


def test_positional_and_option_out_must_agree(zoo, tmp_path, capsys):
    cfg = _llama_cfg(zoo, tmp_path, BASIC["test_linear_merge"])
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "x"), "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "two output folders" in err
    code, _, err = run_cli(["merge", str(cfg)], capsys)
    assert code == 2 and "give the output folder" in err


def test_an_uncached_hub_id_says_how_to_download_it(tmp_path, capsys):
    cfg = tmp_path / "c.yml"
    cfg.write_text(EXAMPLES["examples/linear.yml"])
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "o")], capsys)
    assert code == 2 and "not in the Hugging Face cache" in err and "psmathur/orca_mini_v3_13b" in err


def test_unknown_keys_still_error_in_a_mergekit_config(zoo, tmp_path, capsys):
    text = two_model_config("llama_a", "llama_b", "linear") + "merge_methd: linear\n"
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown key 'merge_methd'" in err


# ------------------------------------------------------------------------------------------------
# the engine's per-tensor parameters and zero reference
# ------------------------------------------------------------------------------------------------
def _collect(got: dict[str, torch.Tensor]):
    """A sink that joins the row pieces of a chunked merge."""

    def sink(k: str, t: torch.Tensor) -> None:
        got[k] = torch.cat([got[k], t]) if k in got else t.clone()

    return sink


class _PerTensor(dict):
    """Plain parameters plus per-tensor overrides, the shape the engine asks for."""

    def __init__(self, static, per):
        super().__init__(static)
        self.per = per

    def for_tensors(self, names):
        return {n: {**self, **self.per.get(n, {})} for n in names}


def test_engine_gives_each_tensor_its_own_parameters():
    from distac.merging.engine import run_merge
    from distac.tensors import DictSource

    base = {"a": torch.zeros(4, 3), "b": torch.zeros(4, 3)}
    models = [{k: torch.ones(4, 3) for k in base}, {k: 3 * torch.ones(4, 3) for k in base}]
    got: dict[str, torch.Tensor] = {}
    params = _PerTensor({"scale": 1.0}, {"b": {"scale": 0.5}})
    plan = run_merge(
        DictSource(base, "base"),
        [DictSource(m, "m") for m in models],
        "task_arithmetic",
        params,
        _collect(got),
        chunk_bytes=64,
    )
    assert plan.per_tensor is not None and plan.per_tensor["b"]["scale"] == 0.5
    assert torch.equal(got["a"], torch.full((4, 3), 4.0)) and torch.equal(got["b"], torch.full((4, 3), 2.0))


def test_engine_checks_every_tensors_parameters_first():
    from distac.errors import DistacError
    from distac.merging.engine import plan_merge
    from distac.tensors import DictSource

    base = {"a": torch.zeros(3), "b": torch.zeros(3)}
    with pytest.raises(DistacError, match=r"tensor 'b': parameter 'density' = 1\.5 is out of range"):
        plan_merge(
            DictSource(base, "base"),
            [DictSource(base, "m")],
            "ties",
            _PerTensor({"density": 0.5, "scope": "tensor"}, {"b": {"density": 1.5}}),
        )
    with pytest.raises(DistacError, match="the density varies by tensor, but scope 'global'"):
        plan_merge(
            DictSource(base, "base"),
            [DictSource(base, "m")],
            "ties",
            _PerTensor({"density": 0.5}, {"b": {"density": 0.7}}),
        )


def test_zero_reference_makes_task_vectors_the_full_weights():
    from distac.merging.engine import ZeroReference, run_merge
    from distac.tensors import DictSource

    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "ids": torch.arange(3)}
    b = {"w": torch.tensor([[3.0, 6.0], [9.0, 12.0]]), "ids": torch.arange(3)}
    got: dict[str, torch.Tensor] = {}
    run_merge(
        ZeroReference(DictSource(a, "a")),
        [DictSource(a, "a"), DictSource(b, "b")],
        "task_arithmetic",
        {"weights": [0.6, 0.4]},
        _collect(got),
        chunk_bytes=8,
    )
    torch.testing.assert_close(got["w"], 0.6 * a["w"] + 0.4 * b["w"])
    assert torch.equal(got["ids"], a["ids"])


def test_rerunning_distac_config_of_a_mergekit_merge_gives_the_same_bytes(zoo, tmp_path, capsys):
    cfg = _llama_cfg(zoo, tmp_path, EXAMPLES["examples/gradient-slerp.yml (models: syntax)"])
    assert run_cli(["merge", str(cfg), str(tmp_path / "o"), "-q"], capsys)[0] == 0
    again = tmp_path / "o" / "distac_config.yml"
    assert run_cli(["merge", str(again), str(tmp_path / "o2"), "-q"], capsys)[0] == 0
    for f in sorted((tmp_path / "o").glob("*.safetensors")):
        assert (tmp_path / "o2" / f.name).read_bytes() == f.read_bytes()


def test_distac_ties_with_unequal_weights_warns_where_mergekit_differs(zoo, tmp_path, caplog):
    text = two_model_config("llama_a", "llama_b", "ties", "llama_c", "  density: 0.3\n  scale: 1.0\n")
    with caplog.at_level(logging.WARNING, logger="distac.merging"):
        cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert cfg.mergekit is None and "mergekit's normalize divides by the sum of their weights" in caplog.text


def test_distac_spelling_in_a_mergekit_config_names_mergekits(zoo, tmp_path, capsys):
    text = two_model_config("llama_a", "llama_b", "ties", "llama_c", "  normalize: true\n  scale: 0.5\n")
    code, _, err = run_cli(["merge", str(_llama_cfg(zoo, tmp_path, text)), str(tmp_path / "o")], capsys)
    assert code == 2 and "'scale' is distac's spelling" in err and "'lambda'" in err


BAD_VALUES = [
    ({"weight": "abc"}, "parameter 'weight' must be a number, got 'abc'"),
    (
        {"weight": [{"filter": "attn", "value": "x"}]},
        "for tensors matching 'attn' at layer position 0: parameter 'weight'",
    ),
    ({"density": [0, 1]}, "at layer position 0: parameter 'density' = 0.0 is out of range"),
    ({"density": [{"filter": "attn", "value": 2}]}, "matching 'attn' at layer position 0: parameter 'density' = 2.0"),
    ({"density": [{"filtr": "attn", "value": 2}]}, "unknown key(s) ['filtr']; a filter entry has 'filter' and 'value'"),
    ({"density": [[0.1]]}, "expected a number, a gradient [v0, v1, ...] or a list of {filter: NAME, value: V}"),
    ({"densty": 0.5}, "has no per-model parameter 'densty' (did you mean: density"),
]


@pytest.mark.parametrize(("params", "message"), BAD_VALUES, ids=[m[:30] for _, m in BAD_VALUES])
def test_bad_mergekit_values_are_one_line(tmp_path, capsys, params, message):
    from conftest import finetuned, tiny_state, write_checkpoint

    base = tiny_state(0)
    paths = [write_checkpoint(s, tmp_path / f"{n}.safetensors") for n, s in (("base", base), ("a", finetuned(base, 1)))]
    cfg = {
        "merge_method": "ties",
        "base_model": str(paths[0]),
        "models": [{"model": str(paths[1]), "parameters": {"weight": 1, **params}}],
    }
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_linear_example_converted_to_average_with_a_base_still_averages_three(zoo, tmp_path, capsys):
    """The issue's conversion: merge_method average, base_model = the first model, listed too."""
    text = EXAMPLES["examples/linear.yml"].replace("merge_method: linear", "merge_method: average")
    text += "base_model: psmathur/orca_mini_v3_13b\n"
    cfg = load_config(_llama_cfg(zoo, tmp_path, text))
    assert cfg.method.name == "average" and [m.path.name for m in cfg.models] == ["llama_a", "llama_c", "llama_b"]
    code, _, err = run_cli(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "-q"], capsys)
    assert code == 0, err
    m = {n: _tensors(zoo / n) for n in ("llama_a", "llama_b", "llama_c")}
    for k, v in _tensors(tmp_path / "o").items():
        want = _expect_linear(m, ["llama_a", "llama_c", "llama_b"], [1.0, 0.3, 0.5], k)
        torch.testing.assert_close(v.float(), want.half().float(), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize(
    ("method", "normalize", "merge_fn"),
    [
        ("ties", None, "weighted_mean"),  # mergekit's default normalize: true
        ("ties", False, "sum"),
        ("dare_ties", True, "weighted_mean"),
        ("dare_ties", None, "sum"),
        ("breadcrumbs_ties", True, "weighted_mean"),
        ("breadcrumbs_ties", None, "sum"),
        ("della", None, "weighted_mean"),  # DELLA's normalize divides by the agreeing weights, not their count
        ("della", False, "sum"),
    ],
)
def test_normalize_is_the_methods_weighted_mean(zoo, tmp_path, method, normalize, merge_fn):
    """One place for mergekit's TIES normalisation: the method's own merge_fn, on the method's own record."""
    from distac.methods import get_method

    params = "  density: 0.5\n" + (f"  normalize: {str(normalize).lower()}\n" if normalize is not None else "")
    cfg = load_config(_llama_cfg(zoo, tmp_path, two_model_config("llama_a", "llama_b", method, "llama_c", params)))
    assert cfg.mergekit is not None and cfg.method is get_method(method)
    assert cfg.params["merge_fn"] == merge_fn


def test_karcher_with_a_base_averages_it_in_as_mergekit(zoo, tmp_path):
    cfg = load_config(_llama_cfg(zoo, tmp_path, BASIC["test_karcher_merge"]))
    assert [m.path.name for m in cfg.models] == ["llama_a", "llama_b", "llama_c"] and cfg.base.zero
    assert "weights" not in cfg.params and cfg.params["max_iter"] == 5


def test_card_of_a_merge_without_base_names_no_base_model(zoo, tmp_path, capsys):
    cfg = _llama_cfg(zoo, tmp_path, BASIC["test_linear_merge"])
    assert run_cli(["merge", str(cfg), str(tmp_path / "o"), "-q"], capsys)[0] == 0
    card = (tmp_path / "o" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and "* base" not in card and str(zoo) not in card


def test_an_exponent_without_a_dot_is_a_number_as_in_mergekit(tmp_path):
    """mergekit's ``tol: 1e-5`` (YAML 1.1 would read a string; mergekit's config converts it)."""
    from distac.merging.yaml_loader import read_yaml

    (tmp_path / "c.yml").write_text("a: 1e-5\nb: 1.5E3\nc: '1e-5'\nd: x1e5\n")
    assert read_yaml(tmp_path / "c.yml") == {"a": 1e-5, "b": 1500.0, "c": "1e-5", "d": "x1e5"}

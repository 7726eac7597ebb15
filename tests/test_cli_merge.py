"""`distac merge` and `distac methods` end to end on tiny checkpoints, and every bad input the issue lists."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import finetuned, tiny_state, tree_digest, write_checkpoint
from conftest import run_cli as run
from safetensors.torch import load_file, save_file

import distac
from distac import METHODS
from distac.io import ShardWriter
from distac.merging.checkpoints import export_task_models


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def project(tmp_path):
    """An HF-style base folder, a sharded and a single-file fine-tune, and a YAML with relative paths."""
    base = tiny_state(0)
    models = [finetuned(base, 1), finetuned(base, 2)]
    write_checkpoint(base, tmp_path / "base", form="hf")
    write_checkpoint(models[0], tmp_path / "ft_a", form="sharded")
    write_checkpoint(models[1], tmp_path / "ft_b.safetensors")
    cfg = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "base"},  # mergekit configs list the base too; it is dropped
            {"model": "ft_a", "name": "a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "ft_b.safetensors", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"density": 0.3, "scale": 0.9},
        "heads": ["classifier.*"],
    }
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp_path, cfg, base, models


def write_cfg(root: Path, cfg: dict) -> Path:
    p = root / "merge.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_merge_end_to_end(project, capsys):
    root, _cfg, base, models = project
    code, out, err = run(
        [
            "merge",
            str(root / "merge.yml"),
            "--out",
            str(root / "merged"),
            "--export-per-task",
            "--shard-size",
            "1KB",
            "--chunk-size",
            "300B",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    merged = root / "merged"
    assert out.strip() == str(merged)
    want = distac.merge(
        base, models, "ties", heads=["classifier.*"], density=[0.5, 0.3], scale=0.9, weights=[0.6, 1.0], device="cpu"
    )
    got = load_dir(merged)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the base's config and tokenizer travel with the output; its own card does not
    assert (merged / "config.json").read_text() == (root / "base" / "config.json").read_text()
    assert (merged / "tokenizer.json").exists()
    assert (merged / "model.safetensors.index.json").exists()
    card = (merged / "README.md").read_text()
    assert METHODS["ties"].paper in card and "merge_method: ties" in card and "density" in card
    assert "the base's own card" not in card
    # heads: the base's in the merged weights, each model's own in heads/<name>.safetensors
    assert torch.equal(got["classifier.weight"], base["classifier.weight"])
    for name, m in (("a", models[0]), ("ft_b", models[1])):
        head = load_file(merged / "heads" / f"{name}.safetensors")
        assert torch.equal(head["classifier.weight"], m["classifier.weight"])
        task = load_dir(merged / "tasks" / name)
        assert torch.equal(task["classifier.bias"], m["classifier.bias"])
        assert torch.equal(task["embed.weight"], got["embed.weight"])
    # distac_config.yml has absolute paths: re-running it from anywhere gives the same bytes
    code, _, err = run(
        ["merge", str(merged / "distac_config.yml"), "--out", str(root / "again"), "-q", "--shard-size", "1KB"], capsys
    )
    assert code == 0, err
    for f in sorted(merged.glob("model-*.safetensors")):
        assert (root / "again" / f.name).read_bytes() == f.read_bytes()


def test_hf_bin_base_and_torch_models(tmp_path, capsys):
    base = tiny_state(4)
    models = [finetuned(base, 1), finetuned(base, 2)]
    write_checkpoint(base, tmp_path / "base", form="hf_bin")
    paths = [write_checkpoint(m, tmp_path / f"m{i}", form="pt") for i, m in enumerate(models)]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "dtype": "bfloat16",
        "models": [{"model": str(p.relative_to(tmp_path))} for p in paths],
        "parameters": {"scale": 0.5},
    }
    code, _, err = run(["merge", str(write_cfg(tmp_path, cfg)), "--out", str(tmp_path / "o"), "-q"], capsys)
    assert code == 0, err
    got = load_dir(tmp_path / "o")
    want = distac.merge(base, models, "task_arithmetic", scale=0.5, device="cpu")
    for k, v in want.items():  # mergekit's `dtype: bfloat16` sets the output dtype; arithmetic stays fp32
        w = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert torch.equal(got[k], w), k


def test_python_m_distac_merge_subprocess(project):
    root = project[0]
    r = subprocess.run(
        [sys.executable, "-m", "distac", "merge", str(root / "merge.yml"), "--out", str(root / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (root / "o" / "model.safetensors").exists() and (root / "o" / "distac_config.yml").exists()


def test_methods_lists_every_method_with_parameters_and_paper(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for m in METHODS.values():
        assert f"\n{m.name}  (" in f"\n{out}" and m.paper in out
        for p in m.params.values():
            assert p.describe() in out
    code, out, _ = run(["methods", "ties"], capsys)
    assert code == 0 and "density=0.2 (per model) in (0, 1]" in out and "convention" in out
    code, _, err = run(["methods", "tiez"], capsys)
    assert code == 2 and "did you mean: ties" in err


# ----------------------------------------------------------------------------------------------
# bad input: clear message, non-zero exit, no partial output, inputs untouched
# ----------------------------------------------------------------------------------------------
def _truncate(root: Path, cfg: dict) -> tuple[dict, str]:
    f = root / "ft_b.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    return cfg, "ft_b.safetensors"


def _corrupt_header(root: Path, cfg: dict) -> tuple[dict, str]:
    f = root / "ft_b.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"#" * 12
    f.write_bytes(bytes(raw))
    return cfg, "ft_b.safetensors: corrupt safetensors header"


def _replace_model(root: Path, cfg: dict, edit) -> None:
    state = finetuned(tiny_state(0), 9)
    edit(state)
    write_checkpoint(state, root / "ft_b.safetensors")


def _extra_key(root, cfg):
    _replace_model(root, cfg, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    return cfg, "ft_b.safetensors: has 1 tensor(s) the base lacks, e.g. ['extra.weight']"


def _bad_shape(root, cfg):
    _replace_model(root, cfg, lambda s: s.update({"layers.0.mlp.up.bias": torch.zeros(5)}))
    return cfg, "tensor 'layers.0.mlp.up.bias' has shape (5,)"


def _bad_dtype(root, cfg):
    _replace_model(root, cfg, lambda s: s.update({"position_ids": torch.zeros(6)}))
    return cfg, "ft_b.safetensors: tensor 'position_ids' has dtype torch.float32"


def _inf(root, cfg):
    _replace_model(root, cfg, lambda s: s["layers.0.attn.k.weight"].__setitem__((2, 3), float("inf")))
    return cfg, "ft_b.safetensors: tensor 'layers.0.attn.k.weight' (rows 0:3) contains NaN or Inf"


def _missing(root, cfg):
    cfg["models"][2]["model"] = "ft_c.safetensors"
    return cfg, "ft_c.safetensors: no such file"


def _unknown_method(root, cfg):
    return {**cfg, "merge_method": "tiess"}, "unknown merge method 'tiess' (did you mean: ties"


def _unknown_param(root, cfg):
    return {**cfg, "parameters": {"densty": 0.3}}, "no parameter 'densty' (did you mean: density"


def _unknown_model_param(root, cfg):
    cfg["models"][1]["parameters"]["wieght"] = 1
    return cfg, "models[1]: method 'ties' has no parameter 'wieght' (did you mean: weight"


def _unknown_key(root, cfg):
    return {**cfg, "tokenizer_src": "base"}, "unknown key 'tokenizer_src'"


def _out_of_range(root, cfg):
    return {**cfg, "parameters": {"density": 1.5}}, "parameter 'density' = 1.5 is out of range: must be in (0, 1]"


BAD = [
    _missing,
    _truncate,
    _corrupt_header,
    _extra_key,
    _bad_shape,
    _bad_dtype,
    _inf,
    _unknown_method,
    _unknown_param,
    _unknown_model_param,
    _unknown_key,
    _out_of_range,
]


@pytest.mark.parametrize("case", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input(project, capsys, case):
    root, cfg, _, _ = project
    cfg, expected = case(root, cfg)
    path = write_cfg(root, cfg)
    inputs = [
        root / "base",
        root / "ft_a",
        *([root / "ft_b.safetensors"] if (root / "ft_b.safetensors").exists() else []),
        path,
    ]
    before = tree_digest(*inputs)
    code, _, err = run(["merge", str(path), "--out", str(root / "out"), "--chunk-size", "300B", "-q"], capsys)
    assert code == 2
    assert expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (root / "out").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]  # no temporary folder left behind
    assert tree_digest(*inputs) == before


def test_existing_output_is_refused_and_kept(project, capsys):
    root = project[0]
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out")], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in (root / "out").iterdir()] == ["keep.txt"]
    # --overwrite replaces only a folder distac wrote: a user's folder is refused even then
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "--overwrite", "-q"], capsys)
    assert code == 2 and "not written by distac" in err
    assert [p.name for p in (root / "out").iterdir()] == ["keep.txt"]
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out2"), "-q"], capsys)
    assert code == 0, err
    (root / "out2" / "model.safetensors").write_bytes(b"stale")
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out2"), "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert (root / "out2" / "model.safetensors").read_bytes() != b"stale"


def test_output_inside_an_input_is_refused(project, capsys):
    root = project[0]
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "base"), "--overwrite"], capsys)
    assert code == 2 and "input" in err
    assert (root / "base" / "model.safetensors").exists()


def test_disk_full_mid_write_leaves_nothing(project, capsys, monkeypatch):
    root = project[0]
    original = ShardWriter._write_bytes

    def write_bytes(self, data):
        if self._shard >= 1:  # the first shard went through; the disk fills up on the second
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, data)

    monkeypatch.setattr(ShardWriter, "_write_bytes", write_bytes)
    before = tree_digest(root / "base", root / "ft_a", root / "ft_b.safetensors")
    code, _, err = run(
        ["merge", str(root / "merge.yml"), "--out", str(root / "out"), "--shard-size", "500B", "-q"], capsys
    )
    assert code == 2 and "disk full" in err
    assert not (root / "out").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]
    assert tree_digest(root / "base", root / "ft_a", root / "ft_b.safetensors") == before


def test_partial_per_model_weights_are_an_error(project, capsys):
    root, cfg, _, _ = project
    del cfg["models"][2]["parameters"]
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "out")], capsys)
    assert code == 2 and "parameter 'weights' is set for some models" in err


def test_statistics_for_a_method_that_does_not_read_them(project, capsys):
    root, cfg, _, _ = project
    for i in (1, 2):
        cfg["models"][i]["parameters"]["fisher"] = "ft_b.safetensors"
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "out")], capsys)
    assert code == 2 and "does not use 'fisher' statistics" in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run(["merge", str(tmp_path / "nope.yml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.yml: config file not found" in err


def test_sidecar_of_the_wrong_kind_is_refused(project, capsys):
    root, cfg, base, _ = project
    gram = {k: torch.ones(v.shape) for k, v in base.items() if v.is_floating_point()}
    save_file(gram, str(root / "g.safetensors"), metadata={"format": "distac-stats/1", "kind": "gram"})
    cfg = {**cfg, "merge_method": "fisher", "parameters": {}}
    for i in (1, 2):
        cfg["models"][i]["parameters"] = {"fisher": "g.safetensors"}
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "out")], capsys)
    assert code == 2 and "g.safetensors: holds 'gram' statistics, but the config uses it as 'fisher'" in err


def test_hugging_face_model_round_trip(tmp_path):
    """A tiny BERT classifier saved by transformers, merged with per-task heads, loads back in transformers."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = {}
    for name in ("sst2", "mnli"):
        m = transformers.BertForSequenceClassification(cfg).eval()
        m.load_state_dict(finetuned(base.state_dict(), len(tuned)))
        m.save_pretrained(tmp_path / name)
        tuned[name] = m
    out = distac.merge_checkpoints(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "base"),
            "heads": ["classifier.*"],
            "models": [{"model": str(tmp_path / n)} for n in tuned],
            "parameters": {"scale": 0.5},
        },
        tmp_path / "merged",
        export_per_task=True,
        quiet=True,
    )
    merged, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = distac.merge(
        base.state_dict(),
        [m.state_dict() for m in tuned.values()],
        "task_arithmetic",
        scale=0.5,
        heads=["classifier.*"],
        device="cpu",
    )
    got = merged.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got if k in want)
    for name, m in tuned.items():
        task = transformers.AutoModelForSequenceClassification.from_pretrained(out / "tasks" / name)
        assert torch.equal(task.classifier.weight, m.classifier.weight)
        dense = task.bert.encoder.layer[0].output.dense.weight
        assert torch.equal(dense, merged.bert.encoder.layer[0].output.dense.weight)


def test_unavailable_device_is_a_clear_error(project, capsys):
    root = project[0]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "o"), "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "o"), "--device", "tpu9"], capsys)
    assert code == 2 and "--device 'tpu9'" in err
    assert not (root / "o").exists()


def test_export_task_models_needs_heads(project, capsys):
    root = project[0]
    cfg = yaml.safe_load((root / "merge.yml").read_text())
    del cfg["heads"]
    out = distac.merge_checkpoints(write_cfg(root, cfg), root / "plain", quiet=True)
    with pytest.raises(distac.DistacError, match=r"no heads/<name>\.safetensors"):
        export_task_models(out)


def test_export_applies_calibrated_temperature_to_the_final_head_layer(project, capsys):
    """A task calibrated by `distac calibrate` is exported with logits/T (its head's last linear ÷ T)."""
    from distac.conditioning.calibrate import CalibrationResult, write_temperatures

    root, _cfg, _base, models = project
    merged = root / "merged"
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(merged), "-q"], capsys)
    assert code == 0, err
    res = CalibrationResult(temperature=2.5, nll_before=0.0, nll_after=0.0, ece_before=0.0, ece_after=0.0, n=0)
    write_temperatures(merged, {"a": res})
    out = export_task_models(merged)
    task_a, task_b = load_dir(out["a"]), load_dir(out["ft_b"])
    torch.testing.assert_close(task_a["classifier.weight"], models[0]["classifier.weight"] / 2.5)
    torch.testing.assert_close(task_a["classifier.bias"], models[0]["classifier.bias"] / 2.5)
    assert torch.equal(task_b["classifier.weight"], models[1]["classifier.weight"])  # not calibrated: unchanged


def test_yaml_sidecars_are_checked_against_their_models(project, capsys):
    """A Fisher computed on another model, or on the mean scale, is refused before anything is written."""
    from distac.stats import save_stats

    root, _cfg, _base, models = project
    fishers = [{k: v.float().abs() + 0.1 for k, v in m.items() if v.is_floating_point()} for m in models]
    save_stats(
        root / "a.fisher.safetensors",
        fishers[0],
        kind="fisher",
        model=models[0],
        n_examples=8,
        scale="sum",
        estimator="sampled",
    )
    # computed on model b, but listed for model a's partner below
    save_stats(
        root / "b.fisher.safetensors",
        fishers[1],
        kind="fisher",
        model=models[0],
        n_examples=8,
        scale="sum",
        estimator="sampled",
    )
    cfg = {
        "merge_method": "gradient_matching",
        "base_model": "base",
        "models": [
            {"model": "ft_a", "parameters": {"fisher": "a.fisher.safetensors"}},
            {"model": "ft_b.safetensors", "parameters": {"fisher": "b.fisher.safetensors"}},
        ],
        "parameters": {"prior": 1.0},
    }
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "gm"), "-q"], capsys)
    assert code == 2 and "b.fisher.safetensors" in err and "different model" in err and "ft_b" in err
    assert not (root / "gm").exists()
    # the right model, but the mean scale: gradient matching needs H_t = N × mean Fisher
    save_stats(
        root / "b.fisher.safetensors",
        fishers[1],
        kind="fisher",
        model=models[1],
        n_examples=8,
        scale="mean",
        estimator="sampled",
    )
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "gm"), "-q"], capsys)
    assert code == 2 and "mean scale" in err and "sum" in err
    save_stats(
        root / "b.fisher.safetensors",
        fishers[1],
        kind="fisher",
        model=models[1],
        n_examples=8,
        scale="sum",
        estimator="sampled",
    )
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "gm"), "-q"], capsys)
    assert code == 0, err

"""EMR-Merging from a merge YAML: `distac merge` writes the bundle, `distac export-tasks` materialises it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli as run
from safetensors.torch import load_file

import distac
from distac.io import open_checkpoint
from distac.merging.emr import emr_merge, load_emr_bundle

HEADS = ["classifier.*"]


def write_cfg(root: Path, cfg: dict) -> Path:
    p = root / "merge.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def emr_cfg(base: Path, paths: list[Path], **extra) -> dict:
    models = [{"model": str(p), "name": f"t{i}"} for i, p in enumerate(paths)]
    return {"merge_method": "emr", "base_model": str(base), "models": models, "heads": HEADS, **extra}


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_task(ck, want: dict[str, torch.Tensor]) -> None:
    assert ck.keys() == list(want)
    for k, v in want.items():
        got = ck.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k


def test_yaml_emr_merge_writes_the_bundle_emr_merge_writes_bit_for_bit(tmp_path, tiny_checkpoints, capsys):
    base, paths, _, _ = tiny_checkpoints(3)
    cfg = write_cfg(tmp_path, emr_cfg(base, paths))
    code, out, err = run(["merge", str(cfg), "--out", str(tmp_path / "bundle"), "-q", "--chunk-size", "300"], capsys)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "bundle")
    ref = emr_merge(base, paths, tasks=["t0", "t1", "t2"], heads=HEADS, out=tmp_path / "ref", quiet=True, device="cpu")
    got = load_emr_bundle(tmp_path / "bundle")
    assert got.tasks == ref.tasks and torch.equal(got.rescalers, ref.rescalers)
    for part in ("unified", "masks"):
        a, b = folder_tensors(tmp_path / "bundle" / part), folder_tensors(tmp_path / "ref" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for t in ref.tasks:
        assert (tmp_path / "bundle" / "heads" / f"{t}.safetensors").read_bytes() == (
            tmp_path / "ref" / "heads" / f"{t}.safetensors"
        ).read_bytes()
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "**emr**" in card and "arXiv 2405.17461" in card and "library_name" not in card
    for t, lam in zip(ref.tasks, ref.rescalers, strict=True):
        assert f"| {t} | {float(lam):.6g} |" in card
    assert "## Parameters" not in card and "the weights hold the base's" not in card
    # the written config re-runs as is, to the same bundle
    code, _, err = run(
        ["merge", str(tmp_path / "bundle" / "distac_config.yml"), "-o", str(tmp_path / "again"), "-q"], capsys
    )
    assert code == 0, err
    a, b = folder_tensors(tmp_path / "again" / "unified"), folder_tensors(tmp_path / "bundle" / "unified")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_python_api_and_per_task_export_load_as_normal_checkpoints(tmp_path, tiny_checkpoints, capsys):
    base, paths, _, _ = tiny_checkpoints(2, form="hf")
    out = distac.merge_checkpoints(emr_cfg(base, paths), tmp_path / "bundle", export_per_task=True, quiet=True)
    bundle = load_emr_bundle(out)
    for t in bundle.tasks:
        ck = open_checkpoint(out / "tasks" / t)
        assert_same_task(ck, bundle.task(t))
        assert (out / "tasks" / t / "config.json").is_file()  # loads like the base
    # the same tasks from the saved bundle, through the CLI
    code, stdout, err = run(["export-tasks", str(out), "--out", str(tmp_path / "per-task"), "-q"], capsys)
    assert code == 0, err
    assert stdout.split() == [str(tmp_path / "per-task" / t) for t in bundle.tasks]
    for t in bundle.tasks:
        assert_same_task(open_checkpoint(tmp_path / "per-task" / t), bundle.task(t))


def test_export_tasks_takes_a_moved_base_and_handles_heads_merges(tmp_path, tiny_checkpoints, capsys):
    base, paths, _, _ = tiny_checkpoints(2)
    distac.merge_checkpoints(emr_cfg(base, paths), tmp_path / "bundle", quiet=True)
    want = load_emr_bundle(tmp_path / "bundle").task("t1")
    moved = base.rename(tmp_path / "moved-base")
    code, _, err = run(["export-tasks", str(tmp_path / "bundle"), "-o", str(tmp_path / "x"), "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    args = ["export-tasks", str(tmp_path / "bundle"), "-o", str(tmp_path / "x"), "--base", str(moved), "-q"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert_same_task(open_checkpoint(tmp_path / "x" / "t1"), want)
    # a per-tensor merge with heads: the same command writes merged weights + each task's head
    ta = {**emr_cfg(moved, paths), "merge_method": "task_arithmetic"}
    distac.merge_checkpoints(ta, tmp_path / "ta", quiet=True)
    code, _, err = run(["export-tasks", str(tmp_path / "ta"), "-o", str(tmp_path / "y"), "-q"], capsys)
    assert code == 0, err
    merged = open_checkpoint(tmp_path / "ta")
    head = open_checkpoint(tmp_path / "ta" / "heads" / "t0.safetensors")
    got = open_checkpoint(tmp_path / "y" / "t0")
    for k in merged.keys():
        assert torch.equal(got.get(k), head.get(k) if k.startswith("classifier.") else merged.get(k))
    code, _, err = run(["export-tasks", str(tmp_path / "ta"), "-o", str(tmp_path / "z"), "--base", str(moved)], capsys)
    assert code == 2 and "--base is for EMR bundles" in err and not (tmp_path / "z").exists()


@pytest.mark.parametrize(
    ("extra", "model_params", "expected"),
    [
        ({"parameters": {"scale": 0.4}}, None, "method 'emr' takes no parameters (got ['scale']): it is tuning-free"),
        ({}, {"weight": 0.5}, "method 'emr' takes no parameters (got ['weight'])"),
        ({}, {"fisher": "f.safetensors"}, "method 'emr' reads no statistics; remove ['fisher']"),
        ({"dtype": "bfloat16"}, None, "'dtype' is not accepted with method 'emr': its bundle stores τ_uni in the base"),
        ({"out_dtype": "float16"}, None, "'out_dtype' is not accepted with method 'emr'"),
        ({"allow_nonfinite": True}, None, "'allow_nonfinite' is not accepted with method 'emr'"),
    ],
)
def test_refused_settings_are_one_line_errors(tmp_path, tiny_checkpoints, capsys, extra, model_params, expected):
    base, paths, _, _ = tiny_checkpoints(2)
    cfg = emr_cfg(base, paths, **extra)
    if model_params:
        cfg["models"][1]["parameters"] = model_params
    code, _, err = run(["merge", str(write_cfg(tmp_path, cfg)), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_allow_nonfinite_flag_is_refused_for_emr(tmp_path, tiny_checkpoints, capsys):
    base, paths, _, _ = tiny_checkpoints(2)
    args = ["merge", str(write_cfg(tmp_path, emr_cfg(base, paths))), "-o", str(tmp_path / "out"), "--allow-nonfinite"]
    code, _, err = run(args, capsys)
    assert code == 2 and "allow_nonfinite is not accepted with method 'emr'" in err
    assert not (tmp_path / "out").exists()


def test_the_per_tensor_engine_refuses_the_emr_record(tiny_checkpoints):
    from distac.merging.emr import EMR

    with pytest.raises(distac.DistacError, match="not a per-tensor merge"):
        EMR(torch.zeros(2), torch.zeros(1, 2), ctx=None)


def test_methods_lists_emr_apart_and_describes_it(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    per_tensor, _, rest = out.partition(f"{len(distac.METHODS)} methods.")
    assert "\nemr  (" not in f"\n{per_tensor}" and "emr" not in distac.METHODS
    assert "\nemr  (bundle: one model per task, needs the task id at inference" in rest and "2405.17461" in rest
    code, out, _ = run(["methods", "emr"], capsys)
    assert code == 0
    for part in ("θ0 + λ_t · M_t ⊙ τ_uni", "Huang et al.", "memory:", "OUT/masks/", "--export-per-task"):
        assert part in out

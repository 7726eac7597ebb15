"""Hostile merge inputs: the YAML loader, inputs inside --out, non-finite outputs, the CLI boundary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
import yaml
from conftest import finetuned, tiny_state, write_checkpoint
from safetensors.torch import load_file
from test_cli_merge import load_dir, project, run, write_cfg

import distac
from distac import DistacError
from distac.merging.config import read_yaml

__all__ = ["project"]  # the fixture, imported for its name


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# the YAML loader
# ----------------------------------------------------------------------------------------------
def test_yaml_alias_bomb_fails_fast_in_bounded_memory(tmp_path):
    p = tmp_path / "bomb.yml"
    p.write_text(_alias_bomb())
    assert p.stat().st_size < 1000  # a billion entries if expanded
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DistacError, match=r"bomb.yml: line 1: YAML anchors and aliases"):
        read_yaml(p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 1 and peak < 10 * 2**20


def test_yaml_any_alias_or_anchor_is_refused(tmp_path, project, capsys):
    root = project[0]
    text = (root / "merge.yml").read_text().replace("parameters:\n  density: 0.3", "parameters: &p\n  density: 0.3")
    (root / "merge.yml").write_text(text)
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "-q"], capsys)
    assert code == 2 and "anchors and aliases" in err and "merge.yml: line" in err
    assert not (root / "out").exists()


def test_yaml_duplicate_key_is_named_with_its_line(project, capsys):
    root = project[0]
    text = (root / "merge.yml").read_text() + "merge_method: task_arithmetic\n"
    (root / "merge.yml").write_text(text)
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "-q"], capsys)
    line = len(text.splitlines())
    assert code == 2 and f"line {line}: duplicate key 'merge_method' (first at line 1)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (root / "out").exists()


def test_yaml_non_utf8_deep_nesting_and_huge_files_are_one_line_errors(tmp_path, capsys):
    cases = {
        "latin1.yml": "merge_method: tiés\n".encode("latin-1"),
        "deep.yml": b"x: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "huge.yml": b"# " + b"x" * (2 << 20) + b"\n",
    }
    want = {"latin1.yml": "not UTF-8 text (byte 0xe9", "deep.yml": "nested deeper than", "huge.yml": "too large"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code, _, err = run(["merge", str(tmp_path / name), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and f"{tmp_path / name}:" in err and want[name] in err, (name, err)
        assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_yaml_config_that_is_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    os.mkfifo(tmp_path / "cfg.yml")
    code, _, err = run(["merge", str(tmp_path / "cfg.yml"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not a regular file" in err


# ----------------------------------------------------------------------------------------------
# value types
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["models"][2]["parameters"].update(weight=float("nan")),
            "'weights' (value 2 of 2) must be a finite",
        ),
        (lambda c: c["parameters"].update(scale=float("inf")), "parameter 'scale' must be a finite number"),
        (lambda c: c["models"][1]["parameters"].update(weight="heavy"), "parameter 'weights' (value 1 of 2)"),
        (lambda c: c["parameters"].update(merge_fn=["sum"]), "parameter 'merge_fn' is one value for all models"),
        (lambda c: c.update(merge_method=["ties"]), "'merge_method' must be a method name"),
        (lambda c: c.update(heads={"a": 1}), "'heads' must be a pattern or a list"),
        (lambda c: c.update(heads=["re:(unclosed"]), "heads pattern 're:(unclosed' is not a valid regular"),
        (lambda c: c["models"][1].update(model=3), "models[1]: model: expected a file or folder path"),
        (lambda c: c["models"][1].update(model="a\0b"), "models[1]: model: expected a file or folder path"),
        (lambda c: c["models"][1].update(name=7), "models[1]: 'name' must be a string"),
        (lambda c: c["models"][1].update(parameters=[1]), "models[1]: 'parameters' must be a mapping"),
        (lambda c: c.update(allow_nonfinite="yes please"), "'allow_nonfinite' must be true or false"),
    ],
)
def test_config_values_are_type_checked_at_load(project, capsys, edit, message):
    root, cfg = project[0], project[1]
    edit(cfg)
    code, _, err = run(["merge", str(write_cfg(root, cfg)), "--out", str(root / "out"), "-q"], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (root / "out").exists()


# ----------------------------------------------------------------------------------------------
# --overwrite never deletes an input that lives inside --out
# ----------------------------------------------------------------------------------------------
def test_overwrite_keeps_a_config_that_lives_inside_out(project, capsys):
    root = project[0]
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "-q"], capsys)
    assert code == 0, err
    # the written config has absolute paths: the user keeps it (renamed) inside the output
    inside = root / "out" / "my_merge.yml"
    inside.write_text((root / "out" / "distac_config.yml").read_text())
    code, _, err = run(["merge", str(inside), "--out", str(root / "out"), "--overwrite", "-q"], capsys)
    assert code == 2 and "my_merge.yml" in err, err
    assert inside.exists()


def test_overwrite_keeps_sidecars_that_live_inside_out(tmp_path, capsys):
    base = tiny_state(0)
    models = [finetuned(base, 1), finetuned(base, 2)]
    out = tmp_path / "out"
    cfg = {
        "merge_method": "fisher",
        "base_model": str(write_checkpoint(base, tmp_path / "b.safetensors")),
        "models": [],
    }
    for i, m in enumerate(models):
        fisher = {k: torch.rand(v.shape) + 0.1 for k, v in m.items() if v.is_floating_point()}
        cfg["models"].append(
            {
                "model": str(write_checkpoint(m, tmp_path / f"m{i}.safetensors")),
                "parameters": {"fisher": str(write_checkpoint(fisher, tmp_path / f"f{i}.safetensors"))},
            }
        )
    code, _, err = run(["merge", str(write_cfg(tmp_path, cfg)), "--out", str(out), "-q"], capsys)
    assert code == 0, err
    for i, entry in enumerate(cfg["models"]):  # move the sidecars into the output folder
        moved = out / f"f{i}.safetensors"
        Path(entry["parameters"]["fisher"]).rename(moved)
        entry["parameters"]["fisher"] = str(moved)
    code, _, err = run(["merge", str(write_cfg(tmp_path, cfg)), "--out", str(out), "--overwrite", "-q"], capsys)
    assert code == 2 and "f0.safetensors" in err, err
    assert (out / "f0.safetensors").exists() and (out / "f1.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# non-finite outputs
# ----------------------------------------------------------------------------------------------
def test_fp16_overflow_stops_the_merge_unless_allowed(tmp_path, capsys):
    base = tiny_state(0)
    base["embed.weight"][3, 2] = 60000.0
    ft = finetuned(base, 1)
    ft["embed.weight"][3, 2] = 70000.0
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(write_checkpoint(base, tmp_path / "b.safetensors")),
        "models": [str(write_checkpoint(ft, tmp_path / "m.safetensors"))],
        "out_dtype": "float16",
    }
    path = write_cfg(tmp_path, cfg)
    code, _, err = run(["merge", str(path), "--out", str(tmp_path / "out"), "-q"], capsys)
    assert code == 2 and "tensor 'embed.weight'" in err and "overflow torch.float16" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = run(["merge", str(path), "--out", str(tmp_path / "out"), "-q", "--allow-nonfinite"], capsys)
    assert code == 0, err
    assert torch.isinf(load_dir(tmp_path / "out")["embed.weight"][3, 2])
    cfg["allow_nonfinite"] = True  # the config key does the same
    code, _, err = run(["merge", str(write_cfg(tmp_path, cfg)), "--out", str(tmp_path / "out2"), "-q"], capsys)
    assert code == 0, err


def test_gradient_matching_with_huge_fishers_is_caught():
    base = tiny_state(0)
    models = [finetuned(base, i, eps=5.0) for i in range(2)]
    fishers = [{k: torch.full(v.shape, 3e38) for k, v in base.items() if v.is_floating_point()} for _ in models]
    with pytest.raises(DistacError, match=r"tensor '.*': the merged values hold NaN or Inf.*allow_nonfinite"):
        distac.merge(base, models, "gradient_matching", fishers=fishers, device="cpu")
    out = distac.merge(base, models, "gradient_matching", fishers=fishers, device="cpu", allow_nonfinite=True)
    assert any(not torch.isfinite(v).all() for v in out.values() if v.is_floating_point())


def test_nan_in_a_head_tensor_is_refused_naming_it(project, capsys):
    root = project[0]
    state = load_file(root / "ft_b.safetensors")
    state["classifier.bias"][1] = float("nan")
    write_checkpoint(state, root / "ft_b.safetensors")
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "-q"], capsys)
    assert code == 2 and "ft_b.safetensors (head of ft_b): tensor 'classifier.bias'" in err, err
    assert "NaN or Inf" in err and not (root / "out").exists()


# ----------------------------------------------------------------------------------------------
# the CLI boundary
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_out_in_a_read_only_folder_is_one_line(project, capsys):
    root = project[0]
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run(["merge", str(root / "merge.yml"), "--out", str(ro / "out"), "-q"], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and str(ro) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_under_proc_is_one_line(project, capsys):
    root = project[0]
    code, _, err = run(["merge", str(root / "merge.yml"), "--out", "/proc/distac-out", "-q"], capsys)
    assert code == 2 and "/proc" in err and len(err.strip().splitlines()) == 1


def test_expected_os_errors_reaching_main_are_one_line(monkeypatch, capsys):
    import distac.merging.cli as merging_cli

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    monkeypatch.setattr(merging_cli, "merge_checkpoints", disk_full)
    code, _, err = run(["merge", "x.yml", "--out", "o"], capsys)
    assert code == 2 and err.strip() == "distac: error: /data/out/model.safetensors: No space left on device"


def test_end_of_file_is_an_error_not_an_abort(monkeypatch, capsys):
    import distac.merging.cli as merging_cli

    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(merging_cli, "merge_checkpoints", truncated)
    code, _, err = run(["merge", "x.yml", "--out", "o"], capsys)
    assert code == 2 and "Ran out of input" in err and "aborted" not in err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import distac.merging.cli as merging_cli

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(merging_cli, "merge_checkpoints", bug)
    with pytest.raises(KeyError):
        run(["merge", "x.yml", "--out", "o"], capsys)


def test_sigterm_during_a_merge_leaves_no_temporary_folder(tmp_path):
    """A slow merge (many 1-row pieces) killed by SIGTERM removes its temporary output."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4000, 256, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.randn(4000, 256, generator=g)} for _ in range(2)]
    cfg = {
        "merge_method": "ties",
        "base_model": str(write_checkpoint(base, tmp_path / "b.safetensors")),
        "models": [str(write_checkpoint(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(models)],
    }
    path = write_cfg(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": str(Path(distac.__file__).parents[1])}
    cmd = [sys.executable, "-m", "distac", "merge", str(path), "--out", str(tmp_path / "out"), "--chunk-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    assert list(tmp_path.glob(".out.tmp-*")), "the merge never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()
    assert b"Traceback" not in err


def test_yaml_reader_is_the_only_yaml_loader_in_distac():
    src = Path(distac.__file__).parent
    users = [p for p in src.rglob("*.py") if "yaml.safe_load" in p.read_text() or "yaml.load(" in p.read_text()]
    assert users == [], users
    assert yaml.safe_dump({"a": 1})  # (yaml stays importable for dumping)

"""diagnose / condition / calibrate never destroy their inputs and never write NaN with exit 0."""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from distac_tiny import digits, make_mlp, zoo
from safetensors.torch import save_file

import distac
from distac.errors import DistacError
from distac.io.atomic import MARKER
from distac.nn.data import Inputs


def _run(args: list[str], capsys) -> tuple[int, str]:
    from distac.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return tmp_path


def _models(d: Path) -> list[str]:
    z = zoo()
    for k in ("base", "long", "short_a"):
        save_file(z[k], str(d / f"{k}.safetensors"))
    return ["--arch", "distac_tiny:make_mlp", "--model", "long=long.safetensors", "--model", "a=short_a.safetensors"]


# ------------------------------------------------------------------------------------------------
# --out DIR --overwrite with the inputs inside DIR
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "inside"),
    [("diagnose", "base"), ("diagnose", "data"), ("condition", "base"), ("condition", "data"), ("condition", "state")],
)
def test_overwrite_never_deletes_inputs_inside_out(work, capsys, command, inside):
    out = work / "out"
    out.mkdir()
    (out / MARKER).write_text("")  # an earlier distac output, so --overwrite may replace it
    z = zoo()
    save_file(z["base"], str(out / "base.safetensors") if inside == "base" else "base.safetensors")
    args = _models(work)[:]
    data = out / "x.npy" if inside == "data" else work / "x.npy"
    np.save(data, digits()[0].numpy())
    base = "out/base.safetensors" if inside == "base" else "base.safetensors"
    cmd = [command, "--base", base, *args, "--data", f"long={data}", "--out", "out", "--overwrite"]
    if command == "condition":
        cmd += ["--task", "long", "--mode", "norm", "--steps", "2", "-q"]
        if inside == "state":
            cmd += ["--state-dir", "out/state"]
    before = sorted(p.name for p in out.iterdir())
    code, err = _run(cmd, capsys)
    assert code == 2 and "input" in err, err
    assert sorted(p.name for p in out.iterdir()) == before


# ------------------------------------------------------------------------------------------------
# calibrate: temperatures.json never replaces an input; a full disk leaves no temporary
# ------------------------------------------------------------------------------------------------


def _calibrate_args() -> list[str]:
    _, _, xte, yte = digits()
    np.savez("test.npz", x=xte.numpy(), y=yte.numpy())
    return ["calibrate", "--merged", "base.safetensors", "--arch", "distac_tiny:make_mlp", "--data", "t=test.npz"]


def test_calibrate_out_onto_an_input_is_refused(work, capsys):
    _models(work)
    before = (work / "base.safetensors").read_bytes()
    code, err = _run([*_calibrate_args(), "--out", "base.safetensors"], capsys)
    assert code == 2 and "is an input" in err, err
    assert (work / "base.safetensors").read_bytes() == before


def test_calibrate_on_a_full_disk_leaves_nothing(work, capsys, monkeypatch):
    _models(work)
    args = _calibrate_args()
    real_bytes, real_text = pathlib.Path.write_bytes, pathlib.Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".temperatures.json") or self.name == "temperatures.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return (real_bytes if isinstance(a[0], bytes) else real_text)(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    code, err = _run(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "disk full" in err, err
    assert not [p for p in work.iterdir() if "temperatures" in p.name]


# ------------------------------------------------------------------------------------------------
# NaN/Inf data or weights: one error, nothing written
# ------------------------------------------------------------------------------------------------


def test_all_nan_data_stops_diagnose_and_calibrate_naming_the_file(work, capsys):
    args = _models(work)
    np.save("nan.npy", np.full((20, 64), np.nan, dtype=np.float32))
    code, err = _run(["diagnose", "--base", "base.safetensors", *args, "--data", "long=nan.npy", "--out", "d"], capsys)
    assert code == 2 and "nan.npy': row 0 holds NaN or Inf (20 of 20" in err, err
    assert not (work / "d").exists()
    np.savez("nan.npz", x=np.full((20, 64), np.inf, dtype=np.float32), y=np.zeros(20, dtype=np.int64))
    code, err = _run(
        ["calibrate", "--merged", "base.safetensors", "--arch", "distac_tiny:make_mlp", "--data", "t=nan.npz"], capsys
    )
    assert code == 2 and "nan.npz': row 0 holds NaN or Inf" in err, err
    assert not (work / "temperatures.json").exists()


def test_nan_inputs_or_weights_never_give_nan_metrics_in_python():
    z = zoo()
    x = torch.full((16, 64), float("nan"))
    with pytest.raises(DistacError, match=r"task 'long'.*logits are NaN or Inf for 16 of 16"):
        distac.diagnose(make_mlp(), z["base"], {"long": z["long"], "a": z["short_a"]}, {"long": Inputs(x)})
    _, _, xte, yte = digits()
    with pytest.raises(DistacError, match="logits are NaN or Inf"):
        distac.calibrate(make_mlp(), z["base"], x, torch.zeros(16, dtype=torch.long), device="cpu")
    broken = dict(z["base"])
    broken["2.bias"] = torch.full_like(broken["2.bias"], float("inf"))
    with pytest.raises(DistacError, match="logits are NaN or Inf for 540 of 540"):
        distac.calibrate(make_mlp(), broken, xte, yte, device="cpu")
    with pytest.raises(DistacError, match="logits are NaN or Inf"):
        distac.conditioning.fit_temperature(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long))


def test_float_label_tensors_are_not_truncated():
    z = zoo()
    _, _, xte, yte = digits()
    y = yte.double()
    y[3] = 1.9
    with pytest.raises(DistacError, match=r"calibration labels: row 3 holds 1.9"):
        distac.calibrate(make_mlp(), z["base"], xte, y, device="cpu")
    with pytest.raises(DistacError, match=r"row 3 holds 1\.9"):
        distac.diagnose(make_mlp(), z["base"], {"long": z["long"]}, {"long": xte}, {"long": y})
    whole = distac.calibrate(make_mlp(), z["base"], xte, yte.double(), device="cpu")  # 2.0 is class 2
    assert whole.temperature == distac.calibrate(make_mlp(), z["base"], xte, yte, device="cpu").temperature

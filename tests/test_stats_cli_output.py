"""`distac stats ... --out`: never replaces an input, replaces an existing file only with --overwrite,
and a full disk is one line with nothing left behind."""

from __future__ import annotations

import errno
import textwrap

import numpy as np
import pytest
import torch
from conftest import run_cli as run
from safetensors.torch import save_file

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp(d_in=4, n_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, n_classes))
    """
)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "stats_out_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import stats_out_factory

    model = stats_out_factory.mlp()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(6, 4)).astype(np.float32))
    common = [str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"), "--arch", "stats_out_factory:mlp"]
    return tmp_path, common


@pytest.mark.parametrize("command", ["fisher", "gram"])
def test_an_existing_out_is_replaced_only_with_overwrite(setup, capsys, command):
    tmp_path, common = setup
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"my notes")
    code, _, err = run(["stats", command, *common, "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"my notes"
    code, _, err = run(["stats", command, *common, "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert out.read_bytes() != b"my notes"


@pytest.mark.parametrize("which", ["m.safetensors", "x.npy"])
def test_out_is_never_an_input_even_with_overwrite(setup, capsys, which):
    tmp_path, common = setup
    target = tmp_path / which
    before = target.read_bytes()
    code, _, err = run(["stats", "fisher", *common, "--out", str(target), "--overwrite"], capsys)
    assert code == 2 and "is an input" in err and "Traceback" not in err
    assert target.read_bytes() == before


def test_adam_out_is_never_its_optimizer_state(setup, capsys):
    tmp_path, _ = setup
    import stats_out_factory

    model = stats_out_factory.mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    before = (tmp_path / "opt.pt").read_bytes()
    args = [
        "stats",
        "adam",
        str(tmp_path / "m.safetensors"),
        str(tmp_path / "opt.pt"),
        "--arch",
        "stats_out_factory:mlp",
    ]
    code, _, err = run(
        [*args, "--n-examples", "8", "--batch-size", "2", "--out", str(tmp_path / "opt.pt"), "--overwrite"], capsys
    )
    assert code == 2 and "is an input" in err
    assert (tmp_path / "opt.pt").read_bytes() == before


def test_a_full_disk_while_writing_a_sidecar_is_one_line_and_leaves_nothing(setup, capsys, monkeypatch):
    import distac.stats.sidecar as sidecar

    tmp_path, common = setup
    before = sorted(p.name for p in tmp_path.iterdir())

    def full_disk(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sidecar, "write_safetensors", full_disk)
    code, _, err = run(["stats", "fisher", *common, "--out", str(tmp_path / "f.safetensors")], capsys)
    assert code == 2 and "disk full" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == [
        n for n in before if n != "__pycache__"
    ]


@pytest.mark.parametrize("content", [b"\x80\x04garbage", b"hello", "FIFO"])
def test_adam_refuses_a_broken_or_special_optimizer_file_in_one_line(tmp_path, content):
    import os
    import threading

    from distac.errors import DistacError
    from distac.stats import adam_fisher

    path = tmp_path / "opt.pt"
    if content == "FIFO":
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    box: dict[str, BaseException] = {}

    def call():
        try:
            adam_fisher(str(path), ["w"], n_examples=4, batch_size=2)
        except BaseException as e:
            box["error"] = e

    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(10)
    if th.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail("blocked on the FIFO")
    assert isinstance(box.get("error"), DistacError), box
    assert "opt.pt" in str(box["error"]) and "\n" not in str(box["error"])

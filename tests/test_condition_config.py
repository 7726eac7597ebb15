"""ConditionConfig is the one place a setting lives: the flags, validation, fingerprint and report derive from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distac_tiny import digits, make_mlp, zoo
from safetensors.torch import save_file

import distac
from distac.conditioning.config import ConditionConfig
from distac.errors import DistacError
from distac.nn.data import Inputs


def test_every_field_is_a_flag_of_distac_condition():
    from distac.conditioning.cli import condition_command

    flags = {o for p in condition_command.params for o in p.opts}
    for f in dataclasses.fields(ConditionConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_validation_names_the_setting_and_misspellings_get_a_suggestion():
    with pytest.raises(DistacError, match="max_grad_norm must be > 0"):
        ConditionConfig(max_grad_norm=0.0)
    with pytest.raises(DistacError, match="eval_examples must be >= 1"):
        ConditionConfig(eval_examples=0)
    with pytest.raises(DistacError, match="unknown conditioning setting 'kapa' \\(did you mean: kappa"):
        ConditionConfig.of(kapa=0.5)


def test_fingerprint_holds_what_changes_the_weights():
    fp = ConditionConfig().fingerprint()
    assert {"kappa", "beta", "steps", "lr", "seed", "max_grad_norm", "train_mode"} <= set(fp)
    assert not {"save_every", "log_every", "resume", "eval_examples"} & set(fp)


def test_a_state_predating_a_setting_resumes_at_its_default(tmp_path):
    z = zoo()
    xtr = digits()[0]
    kw = dict(mode="norm", kappa=0.5, steps=10, batch_size=32, device="cpu", progress=False, state_dir=tmp_path)
    distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), save_every=5, **kw)
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["fingerprint"]["train_mode"]  # as written before the setting existed
    torch.save(state, ckpt)
    assert distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), **kw).report.resumed_from == 10
    with pytest.raises(DistacError, match=r"other settings .*train_mode"):
        distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), train_mode=True, **kw)


def test_a_foreign_state_file_is_one_error_not_a_traceback(tmp_path):
    z = zoo()
    torch.save([1, 2, 3], tmp_path / "checkpoint.pt")
    kw = dict(mode="norm", kappa=0.5, steps=4, device="cpu", progress=False, state_dir=tmp_path)
    with pytest.raises(DistacError, match="is not a distac conditioning state"):
        distac.condition(make_mlp(), z["base"], z["long"], Inputs(digits()[0]), **kw)


def test_new_flags_reach_the_report_and_the_checkpoint_card(tmp_path, monkeypatch):
    from distac.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    z = zoo()
    for k in ("base", "long"):
        save_file(z[k], f"{k}.safetensors")
    np.save("x.npy", digits()[0].numpy())
    args = [
        "condition",
        "--base",
        "base.safetensors",
        "--arch",
        "distac_tiny:make_mlp",
        "--model",
        "long=long.safetensors",
    ]
    args += ["--data", "long=x.npy", "--mode", "norm", "--kappa", "0.5", "--steps", "4", "--out", "out", "-q"]
    args += ["--max-grad-norm", "0.25", "--train-mode", "--eval-examples", "64", "--log-every", "2"]
    main(args)
    rep = json.loads(Path("out/long.report.json").read_text())
    assert (rep["max_grad_norm"], rep["train_mode"], rep["eval_examples"]) == (0.25, True, 64)
    assert [s for s, _ in rep["norm_curve"]] == [2, 4]
    from safetensors import safe_open

    with safe_open("out/long.safetensors", "pt") as f:
        card = json.loads(f.metadata()["distac_conditioning"])
    assert card["max_grad_norm"] == 0.25 and card["train_mode"] is True and card["mode"] == "norm"

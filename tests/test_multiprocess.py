"""Two CPU processes (torchrun + Accelerate DDP, gloo) condition exactly like one process at the same global batch.

Each process takes an equal, deterministic slice of the same global batch; DDP averages the gradients,
so the update equals the single-process one up to float summation order. Tolerance: every tensor of
the result within 1e-5 (absolute) of the single-process result (observed: ~3e-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distac_tiny import digits, zoo
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-5


def _run(cmd: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def test_two_processes_match_one(tmp_path):
    z = zoo()
    for k in ("base", "long", "short_a"):
        save_file(z[k], str(tmp_path / f"{k}.safetensors"))
    np.save(tmp_path / "x.npy", digits()[0].numpy())
    args = [
        "condition",
        "--base",
        "base.safetensors",
        "--arch",
        "distac_tiny:make_mlp",
        "--model",
        "long=long.safetensors",
        "--model",
        "short=short_a.safetensors",
        "--data",
        "long=x.npy",
        "--task",
        "long",
        "--mode",
        "norm",
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "-q",
    ]
    _run([sys.executable, "-m", "distac", *args, "--out", "one"], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "distac",
            *args,
            "--out",
            "two",
        ],
        tmp_path,
    )
    one = load_file(str(tmp_path / "one" / "long.safetensors"))
    two = load_file(str(tmp_path / "two" / "long.safetensors"))
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=TOLERANCE, rtol=0)
    r1 = json.loads((tmp_path / "one" / "long.report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "long.report.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["loss_curve"] == pytest.approx(r1["loss_curve"], rel=1e-4)
    # the student really moved (the comparison is not between two untouched copies)
    assert r1["norm_after"] != pytest.approx(r1["norm_init"], rel=1e-3)

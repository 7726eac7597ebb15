"""Tiny-checkpoint fixtures shared by the I/O, engine and CLI tests (others may reuse them).

``tiny_state(seed)`` builds a decoder-like state dict in miniature (embedding, attention and MLP
matrices, norms, an int buffer, a classifier head); ``write_checkpoint`` saves one in any of the
forms distac reads, *without* using distac's own writer, so reader and writer are tested
independently.
"""

from __future__ import annotations

import os

# tests never download: a model reference that is not a path must fail from the local cache at once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]


def tiny_state(seed: int = 0, *, vocab: int = 37, d: int = 8, n_classes: int = 3, dtype=torch.float32) -> StateDict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dtype)

    return {
        "embed.weight": r(vocab, d),
        "layers.0.attn.q.weight": r(d, d),
        "layers.0.attn.k.weight": r(d, d),
        "layers.0.mlp.up.weight": r(2 * d, d),
        "layers.0.mlp.up.bias": r(2 * d),
        "layers.0.mlp.down.weight": r(d, 2 * d),
        "layers.0.norm.weight": torch.ones(d, dtype=dtype) + 0.1 * r(d).float().to(dtype),
        "position_ids": torch.arange(6),
        "scalar": r(),
        "classifier.weight": r(n_classes, d),
        "classifier.bias": r(n_classes),
    }


def finetuned(base: StateDict, seed: int, eps: float = 0.05) -> StateDict:
    """base + a small random task vector (float entries only; int buffers copied)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v.float() + eps * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def write_checkpoint(state: StateDict, path: Path, *, form: str = "file", shard_tensors: int = 4) -> Path:
    """Save ``state`` as ``form``: "file" (one .safetensors), "sharded" (a folder with an index),
    "hf" (folder with config.json and tokenizer files), "hf_bin" (config.json + pytorch_model.bin)
    or "pt" (a torch state dict file). Returns the path to hand to distac."""
    state = {k: v.contiguous() for k, v in state.items()}
    if form == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    if form == "pt":
        torch.save(state, path / "weights.pt")
        return path / "weights.pt"
    if form in ("hf", "hf_bin"):
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
        (path / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}))
        (path / "README.md").write_text("the base's own card")
    if form == "hf_bin":
        torch.save(state, path / "pytorch_model.bin")
        return path
    names = list(state)
    if form == "hf":
        save_file(state, str(path / "model.safetensors"))
        return path
    assert form == "sharded", form
    groups = [names[i : i + shard_tensors] for i in range(0, len(names), shard_tensors)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, str(path / fname))
        weight_map.update(dict.fromkeys(group, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``distac ARGS`` in-process: ``(exit code, stdout, stderr)``."""
    from distac.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def tree_digest(*paths: Path) -> str:
    """blake2b over every file (name and bytes) under the given paths: inputs must stay untouched."""
    h = hashlib.blake2b()
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def tiny_checkpoints(tmp_path: Path) -> Callable[..., tuple[Path, list[Path], StateDict, list[StateDict]]]:
    """Factory: ``(base_path, model_paths, base_state, model_states)`` for N tiny fine-tunes.

    ``form`` applies to the base; the models alternate sharded / single-file so every reader runs.
    """

    def make(n: int = 2, *, form: str = "sharded", dtype=torch.float32, seed: int = 0):
        base = tiny_state(seed, dtype=dtype)
        models = [finetuned(base, seed + i + 1) for i in range(n)]
        base_path = write_checkpoint(base, tmp_path / "base", form=form)
        paths = [
            write_checkpoint(
                m,
                tmp_path / f"ft{i}" if i % 2 == 0 else tmp_path / f"ft{i}.safetensors",
                form="sharded" if i % 2 == 0 else "file",
            )
            for i, m in enumerate(models)
        ]
        return base_path, paths, base, models

    return make


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, restoring the previous count after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

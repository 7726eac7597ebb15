"""Hub repo ids resolve through the local Hugging Face cache (a cache laid out in the test; no network)."""

from __future__ import annotations

import pytest
from conftest import tiny_state
from safetensors.torch import save_file

import distac
from distac.io.hub import is_repo_id, resolve_model


def _cache(tmp_path, monkeypatch, repo="org/tiny", commit="a" * 40, ref="main"):
    """A minimal huggingface_hub cache holding one snapshot of ``repo``."""
    import huggingface_hub.constants as c

    root = tmp_path / "hub"
    folder = root / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(tiny_state(0), str(snap / "model.safetensors"))
    (snap / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / ref).write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_paths_and_repo_ids_are_told_apart():
    assert is_repo_id("sentence-transformers/all-MiniLM-L6-v2")
    assert is_repo_id("org/name@v1.0")
    assert not is_repo_id("./org/name") and not is_repo_id("/abs/path") and not is_repo_id("base")
    assert not is_repo_id("a/b/c")


def test_an_existing_local_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve_model("org/tiny") == tmp_path.joinpath("org", "tiny").relative_to(tmp_path)


def test_a_cached_repo_resolves_offline_with_and_without_revision(tmp_path, monkeypatch):
    snap = _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/tiny") == snap
    assert resolve_model(f"org/tiny@{'a' * 40}") == snap
    ck = distac.open_checkpoint(resolve_model("org/tiny"))
    assert "embed.weight" in ck.keys()


def test_an_uncached_repo_offline_says_how_to_download(tmp_path, monkeypatch):
    _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(distac.DistacError, match=r"base_model 'org/other'.*HF_HUB_OFFLINE=1.*huggingface-cli download"):
        resolve_model("org/other", where="base_model")
    with pytest.raises(distac.DistacError, match="--revision v2"):
        resolve_model("org/tiny@v2")


def test_a_merge_config_may_name_models_by_repo_id(tmp_path, monkeypatch):
    from conftest import finetuned

    snap = _cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    from safetensors.torch import save_file as save

    save(finetuned(tiny_state(0), 1), str(tmp_path / "ft.safetensors"))
    cfg = {"merge_method": "task_arithmetic", "base_model": "org/tiny", "models": ["ft.safetensors"]}
    out = distac.merge_checkpoints(cfg, tmp_path / "out", quiet=True)
    assert (out / "model.safetensors").is_file() and snap.is_dir()
    from distac.merging.config import load_config

    assert load_config(cfg).base.name == "tiny"

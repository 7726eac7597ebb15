"""distac reproduce: the quick vision profile end to end, plus the grid's pure pieces."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import distac
from distac.reproduce.grid import METHOD_SPECS, SourceSet, available_specs, merge_fn, select_alpha
from distac.reproduce.profile import QUICK
from distac.reproduce.sources import kappas
from distac.reproduce.tasks import TASKS, Split, TaskData, make_tasks
from distac.reproduce.vit import TinyViT, ViTConfig
from distac.reproduce.zoo import build_or_load_zoo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _silent(it, _desc):
    return it


def test_kappa_shrinks_long_vectors_to_the_mean_of_the_others():
    k = kappas([1.0, 1.0, 6.0], ["a", "b", "c"], ["c"], "norm")
    assert k == {"c": pytest.approx(1 / 6)}
    assert kappas([1.0, 1.0, 6.0], ["a", "b", "c"], ["c"], "conf") == {"c": 1.0}


class _FakeEval:
    """select_alpha only needs logits(), accuracy_of() and normalised(); scores follow a fixed curve.

    The "logits" of a state (here: α itself) are a one-element list holding that α.
    """

    def __init__(self, curve):
        self.curve = curve
        self.calls = []

    def logits(self, state, heads_from, split):
        self.calls.append(state)
        return [state]

    def accuracy_of(self, logits, split):
        return [self.curve[logits[0]]]

    def normalised(self, acc, split):
        return acc


def test_select_alpha_picks_the_best_and_stops_after_patience():
    curve = {0.1: 0.5, 0.2: 0.8, 0.3: 0.7, 0.4: 0.6, 0.5: 0.55, 0.6: 0.99}
    ev = _FakeEval(curve)
    a, searched, val_logits = select_alpha(ev, lambda x: x, [], sorted(curve), patience=3)
    assert a == 0.2
    assert ev.calls == [0.1, 0.2, 0.3, 0.4, 0.5]  # 0.6 is never tried: 3 values without a gain
    assert [s for _, s in searched] == [0.5, 0.8, 0.7, 0.6, 0.55]
    assert val_logits == [0.2]  # the logits of the selected α, not of the last one tried


def test_linear_merge_interpolation_matches_a_direct_merge():
    torch.manual_seed(0)
    m = TinyViT(ViTConfig(dim=16, depth=1, heads=2), {"a": 3, "b": 2})
    base = {k: v.clone() for k, v in m.state_dict().items()}
    models = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    sources = SourceSet("ideal", "raw", models, [], [1.0, 1.0])
    for spec in METHOD_SPECS:
        if spec.method not in ("task_arithmetic", "ties", "tsv_m") or spec.method not in distac.METHODS:
            continue
        at = merge_fn(spec, base, sources, None)
        direct = distac.merge(base, models, spec.method, heads=["heads.*"], scale=0.3, **spec.params)
        for k in base:
            torch.testing.assert_close(at(0.3)[k], direct[k], rtol=1e-5, atol=1e-6)


def test_tasks_are_distinct_and_splits_disjoint():
    x = torch.rand(100, 28, 28)
    y = torch.arange(100) % 10
    pre, tasks = make_tasks(x, y, n_pretrain=40, n_train=30, n_val=10, n_test=20)
    assert len(tasks) == len(TASKS) == 8 and len(pre.x) == 40
    assert all(len(t.train.x) == 30 and len(t.val.x) == 10 and len(t.test.x) == 20 for t in tasks)
    assert len({t.spec.name for t in tasks}) == 8
    # same source images, different transforms: no two tasks see identical training inputs
    flat = [t.train.x.flatten() for t in tasks]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    with pytest.raises(distac.DistacError, match="need"):
        make_tasks(x, y, n_pretrain=90, n_train=30, n_val=10, n_test=20)


def test_task_transforms_keep_images_in_range_and_are_deterministic():
    x = torch.rand(12, 28, 28)
    for spec in TASKS:
        a, b = spec.transform(x), spec.transform(x.clone())
        assert a.shape == x.shape, spec.name
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6, spec.name
        assert torch.equal(a, b), spec.name  # the noisy background is seeded, not drawn per call
        labels = spec.label(torch.arange(10))
        assert labels.min() >= 0 and labels.max() < spec.classes, spec.name
        assert len(labels.unique()) == spec.classes, spec.name  # every class is reachable


def test_zero_shot_heads_average_the_digit_rows_of_each_class():
    from distac.reproduce.train import zero_shot_heads

    torch.manual_seed(0)
    parity = next(t for t in TASKS if t.name == "rotm35_parity")
    digit = next(t for t in TASKS if t.label(torch.arange(10)).tolist() == list(range(10)))
    m = TinyViT(ViTConfig(dim=16, depth=1, heads=2), {parity.name: 2, digit.name: 10})
    w = torch.randn(10, 16)
    x = torch.rand(4, 28, 28)
    tasks = [TaskData(spec, *(Split(x, torch.zeros(4, dtype=torch.long)),) * 3) for spec in (parity, digit)]
    zero_shot_heads(m, tasks, w)
    assert torch.equal(m.heads[digit.name].weight, w)  # a digit task copies the digit head
    even, odd = w[0::2].mean(0), w[1::2].mean(0)
    assert torch.allclose(m.heads[parity.name].weight, torch.stack([even, odd]))


def test_cosine_head_logits_are_scaled_cosines_whatever_the_row_norms():
    torch.manual_seed(0)
    cfg = ViTConfig(dim=16, depth=1, heads=2, logit_scale=100.0, cosine_head=True)
    m = TinyViT(cfg, {"a": 3})
    with torch.no_grad():
        m.heads["a"].weight.mul_(torch.tensor([[0.1], [1.0], [7.0]]))  # rows of very different norms
    f = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    w = torch.nn.functional.normalize(m.heads["a"].weight, dim=-1)
    torch.testing.assert_close(m.logits(f, "a"), 100.0 * f @ w.T)
    assert float(m.logits(f, "a").abs().max()) <= 100.0 + 1e-4
    # without the option the rows' norms scale the logits (the previous head)
    plain = TinyViT(replace(cfg, cosine_head=False), {"a": 3})
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(plain.logits(f, "a"), 100.0 * f @ m.heads["a"].weight.T)


def test_cosine_zero_shot_heads_are_unit_rows_of_the_mean_direction():
    from distac.reproduce.train import zero_shot_heads

    parity = next(t for t in TASKS if t.name == "rotm35_parity")
    m = TinyViT(ViTConfig(dim=16, depth=1, heads=2, cosine_head=True), {parity.name: 2})
    w = torch.randn(10, 16) * torch.linspace(0.5, 5, 10)[:, None]
    x = torch.rand(4, 28, 28)
    zero_shot_heads(m, [TaskData(parity, *(Split(x, torch.zeros(4, dtype=torch.long)),) * 3)], w)
    u = torch.nn.functional.normalize(w, dim=-1)
    expect = torch.nn.functional.normalize(torch.stack([u[0::2].mean(0), u[1::2].mean(0)]), dim=-1)
    torch.testing.assert_close(m.heads[parity.name].weight, expect)


def test_pretraining_augmentation_is_seeded_per_image_and_identity_when_off():
    from distac.reproduce.train import Augment, _random_affine

    x = torch.rand(6, 28, 28)
    aug = Augment(degrees=20.0, scale=0.2, shear=0.3)
    a = _random_affine(x, torch.Generator().manual_seed(1), aug)
    b = _random_affine(x, torch.Generator().manual_seed(1), aug)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.allclose(a, x)
    # one independent map per image: the same image twice in a batch comes out different
    twin = _random_affine(torch.stack([x[0], x[0]]), torch.Generator().manual_seed(2), aug)
    assert not torch.allclose(twin[0], twin[1])
    assert _random_affine(x, torch.Generator().manual_seed(1), Augment()) is x


def _cell(label, setting, source, norm):
    from distac.reproduce.grid import CellResult

    return CellResult("m", label, setting, source, 1.0, 0.0, [norm / 100], [norm / 100], [0.0], [0.0], [1.0], [])


def test_targets_report_ideal_ta_margin_and_distac_vs_rescaling_over_seeds():
    from distac.reproduce.report import targets

    cells = []
    for lab, shift in (("TA", 0.0), ("TIES", 2.0)):
        for seed_norms in ((72, 60, 64, 70, 71), (70, 58, 66, 69, 69)):
            ideal, nraw, nres, ndis, idis = (v + shift for v in seed_norms)
            cells += [
                _cell(lab, "ideal", "raw", ideal),
                _cell(lab, "norm", "raw", nraw),
                _cell(lab, "norm", "rescaled", nres),
                _cell(lab, "norm", "distac", ndis),
                _cell(lab, "ideal", "distac", idis),
            ]
    rows = {r["target"]: r for r in targets(cells, {}, base_norm=58.0)}
    assert rows["ideal TA keeps ≥ 70 % normalised"]["gap"] == 1.0
    assert rows["ideal TA beats α = 0 by ≥ 10 points (norm.)"]["gap"] == 3.0
    assert rows["TA: norm setting costs ≥ 5 points of norm. acc."]["measured"] == 12.0
    assert rows["TA/ideal: DisTaC on the ideal zoo costs < 2 points"]["measured"] == 1.0
    # per seed, DisTaC − rescaling over methods: 6 and 3 -> mean 4.5; column sds: 0.7 (distac), 1.4 (rescaled)
    r = rows["mean over methods: DisTaC − naive rescaling > 1 sd (norm)"]
    assert r["gap"] == pytest.approx(4.5 - 2**0.5, abs=0.051)
    one_seed = {r["target"]: r for r in targets(cells[:5] + cells[10:15], {})}
    assert one_seed["mean over methods: DisTaC − naive rescaling > 1 sd (norm)"]["gap"] is None


def _check_wudi_and_emr_cells(zoo):
    # one cell each, checked against a direct evaluation: WUDI at its only α = 1, EMR scoring task t
    # with its own model θ̂_t, both as CellResults with per-task ECE
    from distac.reproduce.grid import Evaluator, run_cell
    from distac.reproduce.per_task import per_task_states

    specs = {s.method: s for s in available_specs(None)}
    assert {"wudi", "emr"} <= set(specs)  # the full profile (methods=None) runs both
    ev = Evaluator(zoo)
    models = zoo.setting("norm")
    sources = SourceSet("norm", "raw", models, [], [1.0] * len(models))
    n = len(ev.tasks)

    wudi = run_cell(ev, specs["wudi"], sources, profile=QUICK, base=zoo.base, base_fisher=None)
    assert wudi.alpha == 1.0 and [a for a, _ in wudi.curve] == [1.0]
    direct = distac.merge(zoo.base, models, "wudi", heads=["heads.*"])
    assert wudi.test_acc == pytest.approx(ev.accuracy(direct, models, "test"))

    emr = run_cell(ev, specs["emr"], sources, profile=QUICK, base=zoo.base, base_fisher=None)
    states = per_task_states(ev, sources, base=zoo.base)
    assert emr.test_acc == [ev.own(sd, i, "test") for i, sd in enumerate(states)]
    assert emr.alpha == 1.0 and emr.val_norm == pytest.approx(
        sum(ev.normalised([ev.own(sd, i, "val") for i, sd in enumerate(states)], "val")) / n
    )
    # task t's model differs from task u's (mask and rescaler are per task), so EMR is not one merged model
    assert not torch.equal(states[0]["blocks.0.qkv.weight"], states[1]["blocks.0.qkv.weight"])
    for cell in (wudi, emr):
        assert len(cell.test_logits) == len(cell.ece_before) == len(cell.temperatures) == n
        assert all(t > 0 for t in cell.temperatures) and all(e >= 0 for e in cell.ece_after)
    # the grid fits T_t on the validation logits it already has: exactly what distac.calibrate of the
    # model serving task t (merged body + task t's head; EMR's θ̂_t) gives with its own forward pass
    for t, td in enumerate(ev.tasks):
        name, head = td.spec.name, f"heads.{td.spec.name}.weight"
        for cell, state in ((wudi, {**direct, head: models[t][head]}), (emr, states[t])):
            ref = distac.calibrate(ev.task_model(state, name), state, td.val.x, td.val.y, device=ev.device)
            assert cell.temperatures[t] == ref.temperature


def test_quick_profile_end_to_end(tmp_path):
    from distac.cli import cli

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["reproduce", "--quick", "--out", str(out), "--cache", str(cache), "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "zoo: built" in res.output
    md = (out / "results.md").read_text()
    for needle in ("## Mean test accuracy", "## Targets", "## ECE", "TA", "+ DisTaC", "wall time"):
        assert needle in md
    for png in ("headline.png", "norms.png", "reliability.png", "alpha.png"):
        assert (out / png).stat().st_size > 1000, png
    rows = list(csv.DictReader((out / "cells.csv").open()))
    methods = {r["method"] for r in rows}
    assert methods == {s.method for s in available_specs(QUICK.methods)} == set(QUICK.methods)
    # 7 source sets (ideal/norm/conf raw, norm rescaled, ideal/norm/conf DisTaC) × methods × (8 tasks + mean)
    assert len(rows) == 7 * len(methods) * 9
    assert {(r["setting"], r["source"]) for r in rows} >= {("ideal", "distac"), ("conf", "distac")}
    assert "| ideal + DisTaC |" in md
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["ece_before"]) >= 0.0
    run = json.loads((out / "run.json").read_text())
    assert run["profile"] == "quick" and run["wall_time_s"] > 0 and run["targets"]

    manifest = json.loads((cache / "quick" / "seed0" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and len(manifest["own_test_accuracy"]) == len(manifest["models"])
    # a second load comes from the cache; a changed recipe makes it stale and rebuilds
    logs: list[str] = []
    zoo = build_or_load_zoo(QUICK, cache=cache, progress=_silent, log=logs.append)
    assert logs == [f"zoo: loaded {len(manifest['models'])} models from {cache / 'quick' / 'seed0'}"]
    assert torch.equal(zoo.base["patch.weight"], zoo.model().state_dict()["patch.weight"])
    assert zoo.own_acc == manifest["own_test_accuracy"]
    _check_wudi_and_emr_cells(zoo)  # here, on the cached zoo: a zoo of its own would cost ~20 s
    stale = replace(QUICK, pretrain_steps=QUICK.pretrain_steps + 1)
    logs.clear()
    build_or_load_zoo(stale, cache=cache, progress=_silent, log=logs.append)
    assert any("stale" in m for m in logs) and logs[-1].startswith("zoo: built")


def test_zoo_manifests_compare_equal_after_a_json_round_trip():
    # the cache check compares the expected manifest with the one read back from manifest.json, so
    # tuples in it (task label lists, recipes) must already be lists, or every cache looks stale
    from distac.reproduce.text import TEXT_PROFILE, _text_manifest
    from distac.reproduce.zoo import _expected_manifest

    for manifest in (_expected_manifest(QUICK, 0), _text_manifest(TEXT_PROFILE, 0, ["a__ideal"])):
        assert json.loads(json.dumps(manifest)) == manifest

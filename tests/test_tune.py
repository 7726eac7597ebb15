"""distac.tune / distac tune: grid search on validation data, the linear-scale shortcut, AdaMerging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from distac_tiny import digits, make_mlp, zoo
from safetensors.torch import load_file, save_file

import distac
from distac.cli import main
from distac.nn.data import Inputs
from distac.nn.evaluate import accuracy, collect_logits, entropy
from distac.tuning import adamerging, tune

HEADS = ["2.*"]
TASKS = ("short_a", "short_b", "long")


def _val(n: int = 200, labels: bool = True) -> Inputs:
    _, _, x, y = digits()
    return Inputs(x[:n], y[:n] if labels else None, source="digits val")


def _setup(labels: bool = True):
    z = zoo()
    models = {t: z[t] for t in TASKS}
    data = {t: _val(labels=labels) for t in TASKS}
    return make_mlp(), z["base"], models, data


def _acc(model, state, data) -> float:
    return accuracy(collect_logits(model, data.batches(256), state=state), data.labels)


def test_best_point_is_the_max_and_scores_are_normalised_accuracies():
    model, base, models, data = _setup()
    res = tune(
        model,
        base,
        models,
        data,
        method="task_arithmetic",
        grid={"scale": [0.1, 0.4, 1.0]},
        heads=HEADS,
        progress=False,
    )
    assert res.criterion == "normalized_accuracy"
    assert [p.params["scale"] for p in res.points] == [0.1, 0.4, 1.0]
    assert res.best.score == max(p.score for p in res.points)
    for t in TASKS:
        assert res.own[t] == pytest.approx(_acc(model, models[t], data[t]))
    # the best point's parameters, merged directly, give the scores tune reported
    merged = distac.merge(base, [models[t] for t in TASKS], "task_arithmetic", heads=HEADS, **res.best.params)
    for t in TASKS:
        state = {**merged, **{k: models[t][k] for k in ("2.weight", "2.bias")}}
        assert _acc(model, state, data[t]) / res.own[t] == pytest.approx(res.best.per_task[t], abs=1e-6)


def test_linear_scale_shortcut_matches_direct_merges_for_ties_with_a_second_parameter():
    model, base, models, data = _setup()
    grid = {"density": [0.2, 0.5], "scale": [0.5, 1.0]}
    res = tune(model, base, models, data, method="ties", grid=grid, heads=HEADS, criterion="accuracy", progress=False)
    assert len(res.points) == 4
    for p in res.points:
        merged = distac.merge(base, [models[t] for t in TASKS], "ties", heads=HEADS, **p.params)
        direct = [_acc(model, {**merged, **{k: models[t][k] for k in ("2.weight", "2.bias")}}, data[t]) for t in TASKS]
        assert p.score == pytest.approx(sum(direct) / len(direct), abs=1e-6)


def test_entropy_criterion_without_labels_and_clear_errors():
    model, base, models, data = _setup(labels=False)
    res = tune(model, base, models, data, grid={"scale": [0.2, 1.0]}, heads=HEADS, progress=False)
    assert res.criterion == "entropy"
    assert res.best.score == min(p.score for p in res.points)
    with pytest.raises(distac.DistacError, match="needs labels"):
        tune(model, base, models, data, grid={"scale": [1.0]}, heads=HEADS, criterion="accuracy", progress=False)
    with pytest.raises(distac.DistacError, match="non-empty list"):
        tune(model, base, models, data, grid={"scale": []}, heads=HEADS, progress=False)
    with pytest.raises(distac.DistacError, match="both fixed and in the grid"):
        tune(model, base, models, data, grid={"scale": [1.0]}, params={"scale": 1.0}, heads=HEADS, progress=False)
    with pytest.raises(distac.DistacError, match="no validation data"):
        tune(model, base, models, {"short_a": data["short_a"]}, heads=HEADS, progress=False)


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range():
    model, base, models, data = _setup(labels=False)
    merged, coeffs = adamerging(
        model, base, models, data, heads=HEADS, steps=30, lr=1e-2, batch_size=64, progress=False
    )
    assert set(coeffs) == set(TASKS) and all(0.0 <= c <= 1.0 for cs in coeffs.values() for c in cs)
    assert len(coeffs["long"]) == 2  # the two merged body tensors (0.weight, 0.bias); the head is per task

    def mean_entropy(state):
        out = []
        for t in TASKS:
            s = {**state, **{k: models[t][k] for k in ("2.weight", "2.bias")}}
            out.append(float(entropy(collect_logits(model, data[t].batches(256), state=s)).mean()))
        return sum(out) / len(out)

    init = distac.merge(base, [models[t] for t in TASKS], "task_arithmetic", heads=HEADS, scale=0.3)
    assert mean_entropy(merged) < mean_entropy(init)


def _write_zoo_and_val(tmp_path, monkeypatch, names, *, n_val):
    """Work in ``tmp_path`` with the tiny zoo's ``names`` as safetensors files and ``val.npz`` of ``n_val`` digits.

    Returns the zoo (every model, by name).
    """
    monkeypatch.chdir(tmp_path)
    z = zoo()
    for name in names:
        save_file(z[name], str(tmp_path / f"{name}.safetensors"))
    _, _, x, y = digits()
    np.savez(tmp_path / "val.npz", x=x[:n_val].numpy(), y=y[:n_val].numpy())
    return z


def test_cli_writes_the_best_merge_table_plot_and_temperatures(tmp_path, monkeypatch, capsys):
    z = _write_zoo_and_val(tmp_path, monkeypatch, ("base", *TASKS), n_val=200)
    merge_cfg = {
        "merge_method": "ties",
        "base_model": "base.safetensors",
        "heads": HEADS,
        "models": [{"model": f"{t}.safetensors", "name": t} for t in TASKS],
    }
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(merge_cfg))
    tune_cfg = {
        "merge": "merge.yml",
        "grid": {"scale": [0.3, 1.0], "density": [0.2, 0.6]},
        "data": dict.fromkeys(TASKS, "val.npz"),
        "arch": "distac_tiny:make_mlp",
        "calibrate": True,
    }
    (tmp_path / "tune.yml").write_text(yaml.safe_dump(tune_cfg))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    main(["tune", "tune.yml", "--out", "tuned", "-q"])
    rep = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert len(rep["points"]) == 4 and rep["criterion"] == "normalized_accuracy"
    assert (tmp_path / "tuned" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert "*" in (tmp_path / "tuned" / "tune.md").read_text()
    temps = json.loads((tmp_path / "tuned" / "model" / "temperatures.json").read_text())["temperatures"]
    assert set(temps) == set(TASKS) and all(t > 0 for t in temps.values())
    # the written model is the plain merge with the chosen parameters, bit for bit
    want = distac.merge(z["base"], [z[t] for t in TASKS], "ties", heads=HEADS, **rep["best"]["params"])
    got = load_file(str(tmp_path / "tuned" / "model" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grdi": {"scale": [1.0]}}, "unknown key 'grdi'"),
        ({"grid": {"density": [0.2]}, "per_model_density": True}, "set per model"),
        ({"data": {"nobody": "val.npz"}}, "unknown task"),
        ({"grid": []}, "'grid' must map"),
    ],
)
def test_cli_bad_tune_configs_are_one_line_errors(tmp_path, monkeypatch, capsys, change, message):
    _write_zoo_and_val(tmp_path, monkeypatch, ("base", "short_a"), n_val=50)
    entry = {"model": "short_a.safetensors", "name": "a"}
    if change.pop("per_model_density", False):
        entry["parameters"] = {"density": 0.5}
    merge_cfg = {"merge_method": "ties", "base_model": "base.safetensors", "heads": HEADS, "models": [entry]}
    tune_cfg = {"merge": merge_cfg, "grid": {"scale": [1.0]}, "data": {"a": "val.npz"}, "arch": "distac_tiny:make_mlp"}
    tune_cfg.update(change)
    (tmp_path / "tune.yml").write_text(yaml.safe_dump(tune_cfg))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(SystemExit) as e:
        main(["tune", "tune.yml", "--out", "tuned", "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tuned").exists()


def test_consensus_tall_lambda_is_chosen_per_task_by_the_task_own_tall_model():
    model, base, models, data = _setup()
    lambdas = [0.2, 0.4, 0.6]
    res = tune(
        model,
        base,
        models,
        data,
        method="consensus_ta",
        grid={"tall_lambda": lambdas, "scale": [0.5, 1.0]},
        heads=HEADS,
        criterion="accuracy",
        progress=False,
    )
    assert len(res.points) == 2  # λ is not part of the cartesian grid
    chosen = res.best.params["tall_lambda"]
    assert len(chosen) == 3 and set(chosen) <= set(lambdas)
    mtl = {k: sum(models[t][k] - base[k] for t in TASKS) for k in ("0.weight", "0.bias")}
    for t, lam_t in zip(TASKS, chosen, strict=True):
        scores = []
        for lam in lambdas:
            state = dict(base)
            for k, m in mtl.items():
                tau = models[t][k] - base[k]
                state[k] = base[k] + torch.where(tau.abs() > lam * (m - tau).abs(), m, torch.zeros_like(m))
            state.update({k: models[t][k] for k in ("2.weight", "2.bias")})
            scores.append(_acc(model, state, data[t]))
        assert lam_t == lambdas[scores.index(max(scores))]


def _mergekit_tune(tmp_path, monkeypatch, merge_cfg, grid):
    """Write the tiny zoo, a merge config read with mergekit's meaning and a tune config; run ``distac tune``."""
    z = _write_zoo_and_val(tmp_path, monkeypatch, ("base", *TASKS), n_val=100)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(merge_cfg))
    tune_cfg = {"merge": "merge.yml", "grid": grid, "data": dict.fromkeys(TASKS[:2], "val.npz")}
    (tmp_path / "tune.yml").write_text(yaml.safe_dump({**tune_cfg, "arch": "distac_tiny:make_mlp"}))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    main(["tune", "tune.yml", "--out", "tuned", "-q"])
    return z, json.loads((tmp_path / "tuned" / "tune.json").read_text())["best"]["params"]


def test_tune_keeps_a_mergekit_configs_zero_reference(tmp_path, monkeypatch):
    """karcher without base_model: the merge, in the search and in the written model, is of the weights."""
    models = [{"model": f"{t}.safetensors", "name": t} for t in TASKS[:2]]
    z, best = _mergekit_tune(tmp_path, monkeypatch, {"merge_method": "karcher", "models": models}, {"max_iter": [1, 3]})
    zero = {k: torch.zeros_like(v) for k, v in z["short_a"].items()}
    want = distac.merge(zero, [z[t] for t in TASKS[:2]], "karcher", **best)
    got = load_file(str(tmp_path / "tuned" / "model" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_tune_keeps_mergekits_weighted_ties_and_writes_scale_as_lambda(tmp_path, monkeypatch):
    models = [
        {"model": f"{t}.safetensors", "name": t, "parameters": {"weight": w}}
        for t, w in zip(TASKS[:2], (1, 3), strict=True)
    ]
    cfg = {"merge_method": "ties", "base_model": "base.safetensors", "models": models}
    z, best = _mergekit_tune(tmp_path, monkeypatch, cfg, {"scale": [0.5, 1.0]})
    written = yaml.safe_load((tmp_path / "tuned" / "model" / "distac_config.yml").read_text())
    assert written["parameters"]["lambda"] == best["scale"] and "scale" not in written["parameters"]
    want = distac.merge(
        z["base"], [z[t] for t in TASKS[:2]], "ties", scope="tensor", density=1.0, weights=[1.0, 3.0],
        merge_fn="weighted_mean", scale=best["scale"],
    )  # fmt: skip
    got = load_file(str(tmp_path / "tuned" / "model" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parameters": {"lambda": [0.5, 1.0]}}, "parameters vary per tensor (mergekit gradients or filter lists)"),
        ({"grid": {"merge_fn": ["sum"]}}, "['merge_fn'] cannot be tuned on a config read with mergekit's meaning"),
        ({"method": "dare_linear", "parameters": {"rescale": False}}, "'density' cannot be tuned with mergekit's"),
    ],
)
def test_tune_refuses_what_a_mergekit_config_cannot_keep(tmp_path, monkeypatch, capsys, change, message):
    models = [{"model": f"{t}.safetensors", "name": t, "parameters": {"weight": 1}} for t in TASKS[:2]]
    cfg = {"merge_method": change.get("method", "ties"), "base_model": "base.safetensors", "models": models}
    if "parameters" in change:
        cfg["parameters"] = change["parameters"]
    with pytest.raises(SystemExit) as e:
        _mergekit_tune(tmp_path, monkeypatch, cfg, change.get("grid", {"density": [0.5]}))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tuned").exists()

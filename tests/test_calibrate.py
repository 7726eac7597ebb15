"""Temperature scaling: recovery of a known temperature, lower ECE, the metrics, temperatures.json."""

from __future__ import annotations

import json
import math

import pytest
import torch
from distac_tiny import digits, make_mlp, zoo

import distac
from distac.conditioning.calibrate import fit_temperature, read_temperatures, write_temperatures
from distac.errors import DistacError
from distac.nn.evaluate import ece, nll, reliability_diagram


def test_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = 3 * torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    res = fit_temperature(true_logits * 2.5, labels)  # over-confident by a factor 2.5
    assert res.temperature == pytest.approx(2.5, rel=0.1)
    assert res.nll_after < res.nll_before and res.ece_after < res.ece_before


def test_calibration_lowers_ece_of_an_overconfident_model():
    z = zoo()
    _, _, xte, yte = digits()
    state = dict(z["smooth"])
    state["2.weight"] = state["2.weight"] * 0.3  # under-confident head -> T < 1 fixes it
    res = distac.calibrate(make_mlp(), state, xte, yte, device="cpu")
    assert res.ece_after < res.ece_before and res.nll_after < res.nll_before
    assert res.temperature < 1
    assert distac.calibrate(make_mlp(), state, xte, yte, device="cpu").temperature == pytest.approx(res.temperature)
    # sharpened (conditioned-like) model: T > 1
    sharp = dict(z["long"])
    sharp["2.weight"] = sharp["2.weight"] * 4
    assert distac.calibrate(make_mlp(), sharp, xte, yte, device="cpu").temperature > 1


def test_ece_by_hand():
    # 4 examples: confidences 0.9, 0.9 (one right), 0.6, 0.6 (both right); 15 bins
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    logits, labels = p.log(), torch.tensor([0, 1, 0, 0])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert ece(logits, labels) == pytest.approx(expected, abs=1e-6)
    d = reliability_diagram(logits, labels)
    assert sum(d["count"]) == 4 and len(d["edges"]) == 16
    assert nll(logits, labels) == pytest.approx(float(-(p[[0, 1, 2, 3], [0, 1, 0, 0]]).log().mean()), rel=1e-5)
    with pytest.raises(DistacError, match="range over"):
        ece(logits, torch.tensor([0, 1, 2, 0]))


def test_temperatures_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(200, 3, generator=g) * 4, torch.randint(0, 3, (200,), generator=g)
    r = fit_temperature(logits, labels)
    write_temperatures(tmp_path, {"a": r})
    write_temperatures(tmp_path / "temperatures.json", {"b": r})
    assert read_temperatures(tmp_path) == {"a": r.temperature, "b": r.temperature}
    obj = json.loads((tmp_path / "temperatures.json").read_text())
    assert obj["format"] == "distac.temperatures/v1" and set(obj["metrics"]) == {"a", "b"}
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(DistacError, match="not a distac temperatures file"):
        read_temperatures(tmp_path / "bad.json")
    assert read_temperatures(tmp_path / "none") == {}


def test_separable_data_gets_the_lower_bound_not_an_overflow():
    """Every example right: NLL only falls as T → 0, so the answer is the lower bound, deterministically.

    The former L-BFGS fit stopped wherever the loss underflowed (T = 0.40 here) and overflowed on
    some small validation splits of the reproduce grid."""
    from distac.conditioning.calibrate import T_BOUNDS

    labels = torch.arange(32) % 4
    logits = 8.0 * torch.nn.functional.one_hot(labels, 4).float()
    res = fit_temperature(logits, labels)
    assert res.temperature == pytest.approx(T_BOUNDS[0], rel=1e-3)
    assert res.nll_after < res.nll_before and math.isfinite(res.ece_after)

"""diagnose: norms, ratios, cosines, confidence, flags, recommendations, and the report's outputs."""

from __future__ import annotations

import json
import math

import pytest
from distac_tiny import digits, make_mlp, zoo

import distac
from distac.conditioning.diagnose import FlagRules, recommend
from distac.errors import DistacError
from distac.nn.data import Inputs
from distac.taskvector import TaskVector

# training loops in these tests are faster and bit-stable on one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report():
    z = zoo()
    xtr, ytr, _, _ = digits()
    tasks = {k: z[k] for k in ("long", "short_a", "short_b", "smooth")}
    data = {k: Inputs(xtr) for k in tasks}
    return distac.diagnose(make_mlp(), z["base"], tasks, data, {"long": ytr, "smooth": ytr}, device="cpu")


def test_norms_ratios_and_cosines(report):
    z = zoo()
    shared = [k for k in z["base"] if not k.startswith("2.")]  # default head of the MLP: its last Linear "2.*"
    assert report.heads == ["2.*"]
    norms = {}
    for name in ("long", "short_a", "short_b", "smooth"):
        tv = TaskVector.from_models({k: z["base"][k] for k in shared}, {k: z[name][k] for k in shared})
        norms[name] = tv.norm()
        t = report[name]
        assert t.norm == pytest.approx(norms[name], rel=1e-6)
        assert math.sqrt(sum(v**2 for v in t.layer_norms.values())) == pytest.approx(t.norm, rel=1e-6)
        assert set(t.layer_norms) == set(shared)
    others = [norms[n] for n in norms if n != "long"]
    assert report["long"].norm_ratio == pytest.approx(norms["long"] / (sum(others) / 3), rel=1e-6)
    assert report.cosine["long"]["short_a"] == pytest.approx(report.cosine["short_a"]["long"])
    assert report.cosine["long"]["long"] == 1.0


def test_flags_and_recommendations(report):
    assert report["long"].flags == ["norm_outlier"]
    assert report["smooth"].flags == ["low_confidence"]
    assert report["short_a"].flags == [] and report["short_a"].mode == "none"
    long = report["long"]
    others = [report[n].norm for n in ("short_a", "short_b", "smooth")]
    assert long.mode == "norm" and long.kappa == pytest.approx(sum(others) / 3 / long.norm)
    assert (long.t_teacher, long.t_student) == (10.0, 10.0)
    s = report["smooth"]
    assert (s.mode, s.kappa, s.t_teacher, s.t_student) == ("confidence", 1.0, 1.0, 10.0)
    assert s.mean_max_prob < 0.5 < report["short_a"].mean_max_prob
    assert s.accuracy is not None and s.ece > 0.3  # label smoothing: confidence far below accuracy
    assert report["short_a"].accuracy is None  # no labels given for it
    assert sorted(report.flagged) == ["long", "smooth"]


def test_recommend_never_stretches():
    assert recommend(norm=1.0, others_mean=5.0, norm_outlier=True, low_confidence=False)[1] == 1.0
    assert recommend(norm=6.0, others_mean=2.0, norm_outlier=True, low_confidence=True) == ("both", 1 / 3, 1.0, 10.0)


def test_thresholds_are_configurable():
    z = zoo()
    tasks = {k: z[k] for k in ("long", "short_a", "short_b")}
    rep = distac.diagnose(make_mlp(), z["base"], tasks, rules=FlagRules(norm_ratio=10.0))
    assert rep.flagged == []
    assert rep["long"].mean_max_prob is None  # no data: no confidence numbers


def test_outputs(report, tmp_path):
    d = json.loads(report.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == d
    assert d["tasks"]["long"]["flags"] == ["norm_outlier"] and d["thresholds"]["norm_ratio"] == 2.0
    table = report.table()
    assert all(n in table for n in ("long", "short_a", "smooth", "low_confidence"))
    png = report.figure(tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input():
    z = zoo()
    with pytest.raises(DistacError, match="at least one"):
        distac.diagnose(make_mlp(), z["base"], {})
    with pytest.raises(DistacError, match="shape"):
        distac.diagnose(make_mlp(), z["base"], {"w": make_mlp(hidden=8).state_dict()})
    with pytest.raises(DistacError, match="unknown task"):
        distac.diagnose(make_mlp(), z["base"], {"long": z["long"]}, {"lnog": Inputs(digits()[0])})
    with pytest.raises(DistacError, match="matches no tensor"):
        distac.diagnose(make_mlp(), z["base"], {"long": z["long"]}, heads=["classifier.*"])
    with pytest.raises(DistacError, match="empty"):
        distac.diagnose(make_mlp(), z["base"], {"long": z["long"]}, {"long": []})

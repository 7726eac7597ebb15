"""DisTaC on LoRA adapters: norms and cosines from the factors, the κ-scaled LoRA student, the adapter it
writes (loaded back with peft), the full-model student from an adapter, diagnose, and the CLI.

Adapters are trained in the test with peft on the tiny digits MLP (``distac_tiny``) and on a tiny BERT
classifier; nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distac_tiny import accuracy, digits, make_mlp, zoo
from safetensors.torch import load_file, save_file

import distac
from distac.conditioning.lowrank import FactoredVector, LoraStudent, LowRank, as_factored, write_adapter
from distac.errors import DistacError
from distac.io.lora import AdapterSource, open_model
from distac.nn.data import Inputs
from distac.taskvector import TaskVector
from distac.tensors import DictSource

peft = pytest.importorskip("peft")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


# training loops in these tests are faster and bit-stable on one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# adapters trained in the test
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _mlp_adapter(seed: int = 0, r: int = 4, steps: int = 300, lr: float = 2e-2):
    """A peft LoRA (layer 0, rank r) plus the head as modules_to_save, trained on digits from the zoo's base."""
    xtr, ytr, _, _ = digits()
    m = make_mlp()
    m.load_state_dict(zoo()["base"])
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], modules_to_save=["2"])
    pm = peft.get_peft_model(m, cfg)
    with torch.no_grad():  # peft starts B at 0; a random start makes A train too
        pm.base_model.model[0].lora_B["default"].weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (128,), generator=g)
        loss = F.cross_entropy(pm(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pm


def _save(pm, folder: Path) -> Path:
    pm.save_pretrained(str(folder))
    return folder


def _merged(pm) -> dict[str, torch.Tensor]:
    """The adapter's fine-tuned model as peft merges it (merge_and_unload on a copy)."""
    import copy

    return {k: v.detach().clone() for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}


def _source(folder: Path, base: dict[str, torch.Tensor]) -> AdapterSource:
    src = open_model(folder, base=DictSource(base, "base"))
    assert isinstance(src, AdapterSource)
    return src


def _peft_load(folder: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    m = make_mlp()
    m.load_state_dict(base)
    loaded = peft.PeftModel.from_pretrained(m, str(folder))
    return {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}


# ------------------------------------------------------------------------------------------------
# measures from the factors
# ------------------------------------------------------------------------------------------------


def _random_lowrank(g, m, n, r, *, transposed=False, conv=False):
    if conv:
        return LowRank(torch.randn(r, n, 1, 1, generator=g), torch.randn(m, r, 1, 1, generator=g), 0.7, (m, n, 1, 1))
    shape = (n, m) if transposed else (m, n)
    return LowRank(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), 1.3, shape, transposed)


@pytest.mark.parametrize("kind", ["linear", "transposed", "conv"])
def test_norm_and_inner_products_from_factors_equal_the_dense_ones(kind):
    g = torch.Generator().manual_seed(0)
    kw = {"transposed": kind == "transposed", "conv": kind == "conv"}
    u, v = _random_lowrank(g, 23, 17, 3, **kw), _random_lowrank(g, 23, 17, 5, **kw)
    du, dv = u.delta(torch.float64), v.delta(torch.float64)
    assert u.sq_norm() == pytest.approx(float(du.pow(2).sum()), rel=1e-10)
    assert u.dot(v) == pytest.approx(float((du * dv).sum()), rel=1e-10)
    dense = torch.randn(du.shape, generator=g)
    assert u.dot_dense(dense) == pytest.approx(float((du * dense.double()).sum()), rel=1e-9)
    # the dense ΔW has the weight's layout (Conv1D / embeddings: transposed)
    assert tuple(du.shape) == u.shape


def test_factored_vector_measures_equal_task_vector_measures():
    g = torch.Generator().manual_seed(1)
    fa = FactoredVector(
        {"w1": _random_lowrank(g, 8, 6, 2), "w2": _random_lowrank(g, 5, 4, 2, transposed=True)},
        {"b": torch.randn(8, generator=g)},
    )
    fb = FactoredVector({"w1": _random_lowrank(g, 8, 6, 3)}, {"w2": torch.randn(4, 5, generator=g)})
    dense = TaskVector({"w1": torch.randn(8, 6, generator=g), "b": torch.randn(8, generator=g)})

    def as_dense(f: FactoredVector) -> TaskVector:
        # the same vector over every name, zero where the adapter does not touch
        names = {"w1": (8, 6), "w2": (4, 5), "b": (8,)}
        return TaskVector({k: f.delta(k) if k in f else torch.zeros(s) for k, s in names.items()})

    da, db = as_dense(fa), as_dense(fb)
    assert fa.norm() == pytest.approx(da.norm(), rel=1e-6)
    assert fa.norms() == pytest.approx({k: v for k, v in da.norms().items() if k in fa}, rel=1e-6)
    assert fa.cosine(fb) == pytest.approx(da.cosine(db), rel=1e-5)
    assert distac.conditioning.lowrank.vector_cosine(dense, fa) == pytest.approx(
        TaskVector({k: da[k] for k in ("w1", "b")}).dot(dense) / (fa.norm() * dense.norm()), rel=1e-5
    )


def test_adapter_norms_from_factors_equal_the_merged_models(tmp_path):
    z = zoo()
    base = z["base"]
    folder = _save(_mlp_adapter(), tmp_path / "ad")
    fv = as_factored(_source(folder, base))
    merged = _merged(_mlp_adapter())
    tau = TaskVector.from_models(base, merged)
    assert set(fv.low_rank) == {"0.weight"} and set(fv.dense) == {"2.weight", "2.bias"}
    for k, n in fv.norms().items():
        assert n == pytest.approx(tau.norms()[k], rel=1e-5), k
    assert tau.without(fv.keys()).norm() == 0  # untouched tensors: τ = 0
    # cosine of two adapters from their factors against the dense cosine of their merged models
    other = _save(_mlp_adapter(seed=1), tmp_path / "ad1")
    fo = as_factored(_source(other, base))
    tau_o = TaskVector.from_models(base, _merged(_mlp_adapter(seed=1)))
    assert fv.cosine(fo) == pytest.approx(tau.cosine(tau_o), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# the LoRA student
# ------------------------------------------------------------------------------------------------


def test_kappa_scaled_student_starts_at_kappa_times_the_adapter(tmp_path):
    base = zoo()["base"]
    src = _source(_save(_mlp_adapter(), tmp_path / "ad"), base)
    fv = as_factored(src)
    teacher = fv.apply_to(base)
    shared = fv.without_heads(["2.*"])
    kappa = 0.3
    student = LoraStudent(make_mlp(), base, teacher, shared, kappa)
    w = student.weights()["0.weight"].detach()
    torch.testing.assert_close(w - base["0.weight"], kappa * fv.delta("0.weight"), atol=1e-6, rtol=1e-5)
    # only B is scaled; A is the teacher's
    torch.testing.assert_close(student.lora_A[0].detach(), fv.low_rank["0.weight"].a, atol=0, rtol=0)
    assert student.vector(base).norm() == pytest.approx(kappa * shared.norm(), rel=1e-6)
    # κ = 1: the student is the teacher (peft's merged weights)
    same = LoraStudent(make_mlp(), base, teacher, shared, 1.0)
    x = digits()[0][:64]
    m = make_mlp()
    m.load_state_dict(_merged(_mlp_adapter()))
    with torch.no_grad():
        torch.testing.assert_close(same(x), m(x), atol=1e-5, rtol=1e-5)
    names, params = student.trainable()
    assert names == ["lora_A.0", "lora_B.0"] and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in student.model.parameters())


def test_condition_a_lora_student_writes_an_adapter_peft_loads(tmp_path):
    z = zoo()
    base = z["base"]
    xtr, _, xte, yte = digits()
    folder = _save(_mlp_adapter(), tmp_path / "ad")
    src = _source(folder, base)
    res = distac.condition(
        make_mlp(), base, src, Inputs(xtr), mode="norm", kappa=0.5, steps=150, device="cpu", progress=False
    )
    r = res.report
    assert r.config.student == "lora" and res.adapter is not None
    assert r.norm_init == pytest.approx(0.5 * r.norm_before, rel=1e-6)
    # the rank stays the adapter's
    assert res.adapter.low_rank["0.weight"].rank == 4
    # ‖τ'‖ from the factors equals the dense norm of the materialised student's shared part
    shared = [k for k in base if not k.startswith("2.")]
    dense_after = TaskVector.from_models({k: base[k] for k in shared}, {k: res.state[k] for k in shared}).norm()
    assert r.norm_after == pytest.approx(dense_after, rel=1e-5)
    assert r.norm_after < 0.75 * r.norm_before
    teacher = _merged(_mlp_adapter())
    assert accuracy(res.state, xte, yte) >= 0.95 * accuracy(teacher, xte, yte)
    for k in ("2.weight", "2.bias"):  # the head is frozen: the adapter's own
        assert torch.equal(res.state[k], teacher[k])

    out = write_adapter(res.adapter, base, tmp_path / "out", metadata={"distac_conditioning": "{}"})
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert set(load_file(str(out / "adapter_model.safetensors"))) == set(
        load_file(str(folder / "adapter_model.safetensors"))
    )
    reloaded = _peft_load(out, base)
    for k in base:
        torch.testing.assert_close(reloaded[k], res.state[k], atol=1e-6, rtol=1e-5)
    # and distac reads its own output back to the same τ'
    again = as_factored(_source(out, base)).without_heads(["2.*"])
    assert again.norm() == pytest.approx(r.norm_after, rel=1e-5)
    assert again.cosine(res.adapter) == pytest.approx(1.0, abs=1e-6)


def test_full_student_from_an_adapter_starts_at_base_plus_kappa_delta(tmp_path):
    z = zoo()
    base = z["base"]
    xtr = digits()[0]
    src = _source(_save(_mlp_adapter(), tmp_path / "ad"), base)
    kw = dict(mode="norm", kappa=0.5, device="cpu", progress=False)
    res = distac.condition(make_mlp(), base, {"t": src}, Inputs(xtr), student="full", steps=60, **kw)
    assert res.adapter is None and res.report.config.student == "full"
    assert res.report.norm_init == pytest.approx(0.5 * res.report.norm_before, rel=1e-6)
    # the full student trains tensors the adapter never touched
    assert not torch.equal(res.state["0.bias"], base["0.bias"])
    # at step 0 (lr → 0) it is θ_0 + κΔW exactly
    still = distac.condition(make_mlp(), base, src, Inputs(xtr), student="full", steps=1, lr=1e-30, **kw)
    expected = base["0.weight"] + 0.5 * as_factored(src).delta("0.weight")
    torch.testing.assert_close(still.state["0.weight"], expected, atol=1e-6, rtol=1e-6)


def test_target_norm_mixes_adapters_and_checkpoints(tmp_path):
    z = zoo()
    base, xtr = z["base"], digits()[0]
    src = _source(_save(_mlp_adapter(), tmp_path / "ad"), base)
    dense_norm = TaskVector.from_models(base, z["short_a"]).without(["2.weight", "2.bias"]).norm()
    factor_norm = as_factored(src).without_heads(["2.*"]).norm()
    tasks = {"t": src, "a": z["short_a"]}
    kw = dict(mode="norm", steps=1, device="cpu", progress=False)
    on_adapter = distac.condition(make_mlp(), base, tasks, Inputs(xtr), task="t", **kw).report
    assert on_adapter.config.target_norm == pytest.approx(dense_norm, rel=1e-6)
    assert on_adapter.config.kappa == pytest.approx(dense_norm / on_adapter.norm_before, rel=1e-6)
    with pytest.warns(UserWarning, match="would stretch it"):  # the adapter is the longer vector here
        on_checkpoint = distac.condition(make_mlp(), base, tasks, Inputs(xtr), task="a", **kw).report
    assert on_checkpoint.config.target_norm == pytest.approx(factor_norm, rel=1e-6)
    assert on_checkpoint.config.student == "full"


def test_a_lora_student_needs_an_adapter_and_the_choice_is_fingerprinted(tmp_path):
    z = zoo()
    xtr = digits()[0]
    with pytest.raises(DistacError, match="student 'lora' needs a LoRA adapter"):
        distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), student="lora", mode="norm", kappa=0.5)
    src = _source(_save(_mlp_adapter(), tmp_path / "ad"), z["base"])
    kw = dict(mode="norm", kappa=0.5, steps=20, batch_size=64, device="cpu", progress=False, save_every=10)
    first = distac.condition(make_mlp(), z["base"], src, Inputs(xtr), state_dir=tmp_path / "s", **kw)
    again = distac.condition(make_mlp(), z["base"], src, Inputs(xtr), state_dir=tmp_path / "s", **kw)
    assert again.report.resumed_from == 20
    torch.testing.assert_close(again.adapter.low_rank["0.weight"].b, first.adapter.low_rank["0.weight"].b)
    with pytest.raises(DistacError, match=r"other settings .*student"):
        distac.condition(make_mlp(), z["base"], src, Inputs(xtr), state_dir=tmp_path / "s", student="full", **kw)


def test_a_state_saved_before_the_student_setting_resumes_as_full(tmp_path):
    z = zoo()
    xtr = digits()[0]
    kw = dict(mode="norm", kappa=0.5, steps=10, batch_size=32, device="cpu", progress=False, state_dir=tmp_path)
    distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), save_every=5, **kw)
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["fingerprint"]["student"] == "full"
    del state["fingerprint"]["student"]  # as written before the setting existed
    torch.save(state, ckpt)
    assert distac.condition(make_mlp(), z["base"], z["long"], Inputs(xtr), **kw).report.resumed_from == 10


# ------------------------------------------------------------------------------------------------
# diagnose on adapters
# ------------------------------------------------------------------------------------------------


def test_diagnose_adapters_from_factors_equals_diagnose_of_the_merged_models(tmp_path):
    z = zoo()
    base = z["base"]
    xtr, ytr, _, _ = digits()
    srcs = {f"lora{s}": _source(_save(_mlp_adapter(seed=s), tmp_path / f"ad{s}"), base) for s in (0, 1)}
    merged = {f"lora{s}": _merged(_mlp_adapter(seed=s)) for s in (0, 1)}
    data = {k: Inputs(xtr) for k in (*srcs, "long")}
    rep = distac.diagnose(make_mlp(), base, {**srcs, "long": z["long"]}, data, {"lora0": ytr}, device="cpu")
    ref = distac.diagnose(make_mlp(), base, {**merged, "long": z["long"]}, data, {"lora0": ytr}, device="cpu")
    for t in rep.tasks:
        a, b = rep[t], ref[t]
        assert a.norm == pytest.approx(b.norm, rel=1e-5)
        assert a.mean_max_prob == pytest.approx(b.mean_max_prob, abs=1e-6)
        assert a.flags == b.flags and a.mode == b.mode
        for k, v in a.layer_norms.items():
            assert v == pytest.approx(b.layer_norms[k], rel=1e-5, abs=1e-9)
        for u in rep.tasks:
            assert rep.cosine[t][u] == pytest.approx(ref.cosine[t][u], abs=1e-5)
    assert rep["lora0"].accuracy == pytest.approx(ref["lora0"].accuracy)


def test_adapter_of_another_base_is_one_error(tmp_path):
    folder = _save(_mlp_adapter(), tmp_path / "ad")
    narrow = make_mlp(hidden=16).state_dict()
    with pytest.raises(DistacError, match="has shape"):
        _source(folder, narrow)
    fv = as_factored(_source(folder, zoo()["base"]))
    with pytest.raises(DistacError, match=r"model 'a': tensor '0\.weight' has shape .* use the adapter's base"):
        distac.diagnose(make_mlp(hidden=16), narrow, {"a": fv})


# ------------------------------------------------------------------------------------------------
# a tiny BERT classifier
# ------------------------------------------------------------------------------------------------


def test_an_adapter_on_another_model_is_refused_not_misread(tmp_path):
    z = zoo()
    folder = _save(_mlp_adapter(), tmp_path / "ad")
    save_file(z["short_a"], str(tmp_path / "a.safetensors"))
    save_file(z["base"], str(tmp_path / "base.safetensors"))
    on_other = open_model(tmp_path / "a.safetensors", adapter=folder)
    with pytest.raises(DistacError, match="adapter on another model than the base"):
        distac.diagnose(make_mlp(), z["base"], {"a": on_other})
    with pytest.raises(DistacError, match=r"fine-tuned model 't' .* on another model"):
        distac.condition(make_mlp(), z["base"], {"t": on_other}, Inputs(digits()[0]), task="t", mode="norm", kappa=0.5)
    # the base read from its own file is the same base: accepted, and measured from the factors
    on_base = open_model(tmp_path / "base.safetensors", adapter=folder)
    rep = distac.diagnose(make_mlp(), z["base"], {"a": on_base})
    assert rep["a"].norm == pytest.approx(as_factored(on_base).without_heads(["2.*"]).norm(), rel=1e-9)


def _tiny_bert():
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg).eval()


def test_bert_lora_student_output_loads_with_peft(tmp_path):
    """Embeddings, rank and alpha patterns, trained biases and a saved head: factor norms equal peft's merged
    model's, and the LoRA student's adapter loads with peft and merges to the student distac reports.
    """
    import copy

    model = _tiny_bert()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pc = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value", "word_embeddings", "intermediate.dense"],
        rank_pattern={"value": 3},
        alpha_pattern={"query": 8},
        bias="lora_only",
        task_type="SEQ_CLS",
    )
    pm = peft.get_peft_model(copy.deepcopy(model), pc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "ad"))
    src = _source(tmp_path / "ad", base)
    fv = as_factored(src)
    assert any(lr.transposed for lr in fv.low_rank.values())  # the embedding's ΔW = (BA)ᵀ
    tau = TaskVector.from_models(base, copy.deepcopy(pm).merge_and_unload().state_dict())
    assert tau.without(fv.keys()).norm() == 0
    for k, n in fv.norms().items():
        assert n == pytest.approx(tau.norms()[k], rel=1e-5, abs=1e-7), k

    ids = torch.randint(0, 40, (64, 6), generator=g)
    data = Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    kw = dict(mode="norm", kappa=0.5, steps=10, batch_size=32, device="cpu", progress=False)
    res = distac.condition(model, base, src, data, **kw)
    assert res.report.config.student == "lora"
    assert res.report.norm_init == pytest.approx(0.5 * res.report.norm_before, rel=1e-5)
    write_adapter(res.adapter, base, tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "out"))
    merged = loaded.merge_and_unload().state_dict()
    for k, v in res.state.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5)
    assert not torch.equal(res.state["classifier.weight"], base["classifier.weight"])  # the adapter's head, kept
    torch.testing.assert_close(res.state["classifier.weight"], src.get("classifier.weight"), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------


def test_cli_condition_and_diagnose_an_adapter(tmp_path, monkeypatch):
    from distac.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    z = zoo()
    save_file(z["base"], "base.safetensors")
    save_file(z["short_a"], "a.safetensors")
    np.save("x.npy", digits()[0].numpy())
    _save(_mlp_adapter(), tmp_path / "lora")

    def cli(args):
        try:
            main(args)
        except SystemExit as e:
            assert e.code in (0, None), f"distac {' '.join(args)} exited with {e.code}"

    common = ["--base", "base.safetensors", "--arch", "distac_tiny:make_mlp"]
    models = ["--model", "t=lora", "--model", "a=a.safetensors", "--data", "t=x.npy", "--data", "a=x.npy"]
    cli(["diagnose", *common, *models, "--out", "diag"])
    rep = json.loads((tmp_path / "diag" / "diagnose.json").read_text())
    fv = as_factored(_source(tmp_path / "lora", z["base"])).without_heads(["2.*"])
    assert rep["tasks"]["t"]["norm"] == pytest.approx(fv.norm(), rel=1e-6)

    cond = ["condition", *common, *models, "--task", "t", "--mode", "norm", "--kappa", "0.5", "--steps", "30", "-q"]
    cli([*cond, "--out", "cond"])
    report = json.loads((tmp_path / "cond" / "t.report.json").read_text())
    assert report["student"] == "lora" and report["norm_init"] == pytest.approx(0.5 * report["norm_before"])
    out = tmp_path / "cond" / "t"
    assert sorted(p.name for p in out.iterdir()) == [".distac-output", *ADAPTER_FILES]
    reloaded = _peft_load(out, z["base"])
    again = as_factored(_source(out, z["base"])).without_heads(["2.*"])
    assert again.norm() == pytest.approx(report["norm_after"], rel=1e-5)
    tau = TaskVector.from_models(z["base"], reloaded).without(["2.weight", "2.bias"])
    assert tau.norm() == pytest.approx(report["norm_after"], rel=1e-4)
    # BASE+ADAPTER names the same fine-tune; --student full writes a checkpoint
    models_plus = ["--model", "t=base.safetensors+lora", "--data", "t=x.npy", "--mode", "norm"]
    cli(
        [
            "condition",
            *common,
            *models_plus,
            "--kappa",
            "0.5",
            "--steps",
            "5",
            "--student",
            "full",
            "-q",
            "--out",
            "full",
        ]
    )
    assert (tmp_path / "full" / "t.safetensors").is_file()
    assert json.loads((tmp_path / "full" / "t.report.json").read_text())["student"] == "full"
    assert math.isfinite(report["norm_after"])


def test_two_processes_train_the_lora_student_like_one(tmp_path):
    """torchrun + DDP (gloo): the factors are the DDP module's parameters; two ranks match one process."""
    from test_multiprocess import TOLERANCE, _run

    z = zoo()
    save_file(z["base"], str(tmp_path / "base.safetensors"))
    np.save(tmp_path / "x.npy", digits()[0].numpy())
    _save(_mlp_adapter(), tmp_path / "lora")
    args = ["condition", "--base", "base.safetensors", "--arch", "distac_tiny:make_mlp", "--model", "t=lora"]
    args += ["--data", "t=x.npy", "--mode", "norm", "--kappa", "0.5", "--steps", "20", "--batch-size", "64"]
    args += ["--device", "cpu", "-q"]
    _run([sys.executable, "-m", "distac", *args, "--out", "one"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, "-m", "distac", *args, "--out", "two"], tmp_path)
    one = load_file(str(tmp_path / "one" / "t" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "t" / "adapter_model.safetensors"))
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=TOLERANCE, rtol=0)
    r1 = json.loads((tmp_path / "one" / "t.report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "t.report.json").read_text())
    assert (r1["world_size"], r2["world_size"], r2["student"]) == (1, 2, "lora")
    assert r1["norm_after"] != pytest.approx(r1["norm_init"], rel=1e-3)

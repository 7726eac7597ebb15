"""Statistics: per-example Fisher estimators, Adam proxy, Gram hooks, sidecars, and the CLI."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from distac.errors import DistacError
from distac.stats import (
    adam_fisher,
    check_stats,
    fisher_diagonal,
    gram_layouts,
    gram_matrices,
    load_stats,
    model_fingerprint,
    read_stats_metadata,
    save_stats,
)

torch.set_num_threads(1)


def softmax_regression(d: int = 4, c: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c)


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Plain autograd, one example at a time: the reference for the vmapped estimators."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        out.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return out


# ---------------------------------------------------------------------------------------------
# Fisher estimators
# ---------------------------------------------------------------------------------------------
def test_exact_fisher_of_softmax_regression_equals_closed_form():
    # logits = W x + b: ∂ log p_y/∂W_cj = (δ_yc − p_c) x_j, and Σ_y p_y (δ_yc − p_c)² = p_c (1 − p_c),
    # so F_W[c, j] = Σ_n p_nc (1 − p_nc) x_nj² and F_b[c] = Σ_n p_nc (1 − p_nc).
    model = softmax_regression()
    x = torch.randn(13, 4)
    f = fisher_diagonal(model, [x[:5], x[5:]], estimator="exact", progress=False)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    v = p * (1 - p)
    torch.testing.assert_close(f["weight"], v.T @ x.pow(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f["bias"], v.sum(0), rtol=1e-5, atol=1e-6)
    fm = fisher_diagonal(model, [x], estimator="exact", scale="mean", progress=False)
    torch.testing.assert_close(fm["weight"], f["weight"] / 13)


def test_per_example_fisher_differs_from_squared_batch_gradient_by_the_cross_terms():
    # Squaring a batch gradient gives (Σ_n g_n)² = Σ_n g_n² + Σ_{n≠m} g_n g_m; distac sums g_n².
    model = softmax_regression(seed=1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    f = fisher_diagonal(model, [(x, y)], estimator="empirical", progress=False)
    g = per_example_grads(model, x, y)
    per_ex = {k: sum(gi[k].pow(2) for gi in g) for k in f}
    batch_sq = {k: sum(gi[k] for gi in g).pow(2) for k in f}
    cross = {k: sum(g[n][k] * g[m][k] for n in range(6) for m in range(6) if n != m) for k in f}
    for k in f:
        torch.testing.assert_close(f[k], per_ex[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch_sq[k], per_ex[k] + cross[k], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(f[k], batch_sq[k], rtol=1e-2)
    # with batches of one example the two coincide
    one = [(x[i : i + 1], y[i : i + 1]) for i in range(6)]
    torch.testing.assert_close(
        fisher_diagonal(model, one, estimator="empirical", progress=False)["weight"],
        per_ex["weight"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_sampled_fisher_is_seeded_and_unbiased_for_the_exact_one():
    model = softmax_regression(seed=2)
    x = torch.randn(400, 4)
    a = fisher_diagonal(model, [x], estimator="sampled", seed=3, progress=False)
    b = fisher_diagonal(model, [x[:150], x[150:]], estimator="sampled", seed=3, progress=False)
    c = fisher_diagonal(model, [x], estimator="sampled", seed=4, progress=False)
    exact = fisher_diagonal(model, [x], estimator="exact", progress=False)
    torch.testing.assert_close(a["weight"], b["weight"])  # same draws whatever the batching
    assert not torch.equal(a["weight"], c["weight"])
    rel = (a["weight"].sum() - exact["weight"].sum()).abs() / exact["weight"].sum()
    assert rel < 0.1, rel


def test_exact_fisher_of_an_mlp_matches_a_per_class_autograd_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(5, 3)
    f = fisher_diagonal(model, [x], estimator="exact", progress=False)
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(5):
        logp = torch.log_softmax(model(x[i : i + 1])[0], -1)
        for cls in range(4):
            model.zero_grad()
            logp[cls].backward(retain_graph=True)
            for k, p in model.named_parameters():
                ref[k] += logp[cls].exp().detach() * p.grad.pow(2)
    for k in ref:
        torch.testing.assert_close(f[k], ref[k], rtol=1e-5, atol=1e-7)


def test_fisher_on_hf_bert_with_padding_matches_plain_autograd():
    model = tiny_bert()
    torch.manual_seed(1)
    ids = torch.randint(5, 40, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    y = torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    f = fisher_diagonal(model, [batch], estimator="empirical", params=None, progress=False)
    ref = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        out = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        nn.functional.cross_entropy(out, y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                ref[k] += p.grad.pow(2)
    assert set(f) == set(ref)
    for k in ref:
        torch.testing.assert_close(f[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)
    assert not model.training  # restored to eval, as given


def test_fisher_options_and_errors():
    model = softmax_regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4)
    info: dict = {}
    f = fisher_diagonal(model, [x[:4], x[4:]], params=["weight"], n_examples=6, progress=False, info=info)
    assert set(f) == {"weight"} and info["n_examples"] == 6 and len(info["data_fingerprint"]) == 32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # inputs never modified
    assert all(p.grad is None for p in model.parameters()) and model.training
    with pytest.raises(DistacError, match="at least 2 classes"):
        fisher_diagonal(nn.Linear(4, 1), [x], progress=False)
    with pytest.raises(DistacError, match="needs true labels"):
        fisher_diagonal(model, [x], estimator="empirical", progress=False)
    with pytest.raises(DistacError, match="did you mean"):
        fisher_diagonal(model, [x], params=["weigth"], progress=False)
    with pytest.raises(DistacError, match="no examples"):
        fisher_diagonal(model, [], progress=False)
    # labels given separately, in data order
    y = torch.randint(0, 3, (10,))
    a = fisher_diagonal(model, [x[:4], x[4:]], estimator="empirical", labels=y, progress=False)
    b = fisher_diagonal(model, [(x, y)], estimator="empirical", progress=False)
    torch.testing.assert_close(a["weight"], b["weight"])


def test_tied_parameters_get_the_fisher_under_both_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(3, 3, bias=False)
            self.out = nn.Linear(3, 3, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    m = Tied()
    f = fisher_diagonal(m, [torch.randn(4, 3)], estimator="exact", progress=False)
    assert set(f) == {"emb.weight", "out.weight"}
    torch.testing.assert_close(f["emb.weight"], f["out.weight"])


# ---------------------------------------------------------------------------------------------
# Adam second moments
# ---------------------------------------------------------------------------------------------
def test_adam_second_moments_rescaled_to_sum_fisher(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 3)), torch.randint(0, 2, (8,))).backward()
        opt.step()
    path = tmp_path / "optim.pt"
    torch.save(opt.state_dict(), path)
    f = adam_fisher(str(path), model, n_examples=100, batch_size=8)
    v = opt.state[model[0].weight]["exp_avg_sq"]
    torch.testing.assert_close(f["0.weight"], v / (1 - 0.99**3) * 100 * 8)
    raw = adam_fisher(
        str(path), [k for k, _ in model.named_parameters()], n_examples=100, batch_size=8, bias_correction=False
    )
    torch.testing.assert_close(raw["2.bias"], opt.state[model[2].bias]["exp_avg_sq"] * 800)
    with pytest.raises(DistacError, match="holds 4 parameters but 3 names"):
        adam_fisher(str(path), ["a", "b", "c"], n_examples=1, batch_size=1)
    torch.save({"foo": 1}, tmp_path / "bad.pt")
    with pytest.raises(DistacError, match="not a torch optimizer"):
        adam_fisher(str(tmp_path / "bad.pt"), model, n_examples=1, batch_size=1)


# ---------------------------------------------------------------------------------------------
# Gram matrices
# ---------------------------------------------------------------------------------------------
class DictModel(nn.Module):
    """Token model taking tokenizer-style dict batches: embedding -> Linear -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def test_gram_leaves_padding_out_and_counts_rows():
    torch.manual_seed(0)
    model = DictModel()
    ids = torch.randint(0, 20, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    info: dict = {}
    g = gram_matrices(model, [{"input_ids": ids, "attention_mask": mask}], progress=False, info=info)
    with torch.no_grad():
        x = model.emb(ids)[mask.bool()]
    assert info["rows"]["proj.weight"] == 10 and info["rows"]["head.weight"] == 3
    torch.testing.assert_close(g["proj.weight"], x.T @ x / 10)
    s = gram_matrices(model, [{"input_ids": ids, "attention_mask": mask}], scale="sum", progress=False)
    torch.testing.assert_close(s["proj.weight"], x.T @ x)
    assert info["layout"] == {"proj.weight": "out_in", "head.weight": "out_in"}


def test_gram_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3), nn.ReLU(), nn.Linear(5, 2))
    assert gram_layouts(model) == {"0.weight": "in_out", "2.weight": "out_in"}
    x = torch.randn(7, 3)
    g = gram_matrices(model, [x], progress=False)
    assert g["0.weight"].shape == (3, 3)
    torch.testing.assert_close(g["0.weight"], x.T @ x / 7)


# ---------------------------------------------------------------------------------------------
# sidecars
# ---------------------------------------------------------------------------------------------
def test_sidecar_round_trip_metadata_and_scale(tmp_path):
    model = softmax_regression()
    info: dict = {}
    f = fisher_diagonal(model, [torch.randn(9, 4)], estimator="exact", progress=False, info=info)
    path = save_stats(
        tmp_path / "m.fisher.safetensors",
        f,
        kind="fisher",
        model=model,
        n_examples=info["n_examples"],
        scale="sum",
        estimator="exact",
        data_fingerprint=info["data_fingerprint"],
    )
    meta = read_stats_metadata(path)
    assert meta["kind"] == "fisher" and meta["estimator"] == "exact" and meta["scale"] == "sum"
    assert meta["n_examples"] == 9 and meta["model_fingerprint"] == model_fingerprint(model, sorted(f))
    back = load_stats(path, model=model)
    for k in f:
        torch.testing.assert_close(back[k], f[k])
    torch.testing.assert_close(load_stats(path, scale="mean")["weight"], f["weight"] / 9)
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed


def test_gram_sidecar_keeps_rows_and_layout(tmp_path):
    torch.manual_seed(0)
    model = DictModel()
    info: dict = {}
    batch = {"input_ids": torch.randint(0, 20, (2, 3)), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    g = gram_matrices(model, [batch], progress=False, info=info)
    path = save_stats(
        tmp_path / "g.safetensors",
        g,
        kind="gram",
        model=model,
        n_examples=2,
        scale="mean",
        estimator="forward",
        rows=info["rows"],
        layout=info["layout"],
    )
    meta = read_stats_metadata(path)
    assert meta["rows"] == {"head.weight": 2, "proj.weight": 6} and meta["layout"]["proj.weight"] == "out_in"
    torch.testing.assert_close(load_stats(path, model=model, scale="sum")["proj.weight"], g["proj.weight"] * 6)


def test_sidecar_errors(tmp_path):
    model = softmax_regression()
    f = fisher_diagonal(model, [torch.randn(4, 4)], progress=False)
    path = save_stats(
        tmp_path / "f.safetensors", f, kind="fisher", model=model, n_examples=4, scale="sum", estimator="sampled"
    )
    other = softmax_regression(seed=5)
    with pytest.raises(DistacError, match="computed on a different model"):
        load_stats(path, model=other)
    with pytest.raises(DistacError, match="'wieght' is not in the model"):
        check_stats({"wieght": f["weight"]}, model)
    with pytest.raises(DistacError, match=r"has shape \(4, 3\), the model has \(3, 4\)"):
        check_stats({"weight": f["weight"].T.contiguous()}, model)
    with pytest.raises(DistacError, match="negative curvature"):
        check_stats({"weight": -f["weight"]}, model)
    bad = f["weight"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DistacError, match="NaN"):
        save_stats(
            tmp_path / "nan.safetensors",
            {"weight": bad},
            kind="fisher",
            model=model,
            n_examples=1,
            scale="sum",
            estimator="sampled",
        )
    assert not (tmp_path / "nan.safetensors").exists()
    with pytest.raises(DistacError, match="Gram 'weight' has shape"):
        check_stats({"weight": torch.eye(2)}, model, kind="gram")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DistacError, match=r"junk\.safetensors"):
        load_stats(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# CLI end to end
# ---------------------------------------------------------------------------------------------
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp(d_in=4, n_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, n_classes))
    """
)


def test_cli_fisher_and_gram_on_a_torch_model(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from distac.cli import main

    (tmp_path / "stats_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import stats_factory_mod

    model = stats_factory_mod.mlp()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(10, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=10))
    common = [str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"), "--arch", "stats_factory_mod:mlp"]
    main(
        [
            "stats",
            "fisher",
            *common,
            "--out",
            str(tmp_path / "f.safetensors"),
            "--estimator",
            "exact",
            "--batch-size",
            "4",
            "--n-examples",
            "9",
        ]
    )
    f = load_stats(tmp_path / "f.safetensors", model=model)
    ref = fisher_diagonal(model, [torch.from_numpy(np.load(tmp_path / "x.npy"))[:9]], estimator="exact", progress=False)
    torch.testing.assert_close(f["0.weight"], ref["0.weight"], rtol=1e-5, atol=1e-7)
    assert read_stats_metadata(tmp_path / "f.safetensors")["n_examples"] == 9
    main(
        [
            "stats",
            "fisher",
            *common,
            "--out",
            str(tmp_path / "fe.safetensors"),
            "--estimator",
            "empirical",
            "--labels",
            str(tmp_path / "y.npy"),
        ]
    )
    assert read_stats_metadata(tmp_path / "fe.safetensors")["estimator"] == "empirical"
    main(["stats", "gram", *common, "--out", str(tmp_path / "g.safetensors")])
    g = load_stats(tmp_path / "g.safetensors", model=model)
    assert set(g) == {"0.weight", "2.weight"} and g["0.weight"].shape == (4, 4)
    with pytest.raises(SystemExit) as e:
        main(["stats", "fisher", *common, "--out", str(tmp_path / "x.safetensors"), "--estimator", "empirical"])
    assert e.value.code == 2


def test_cli_fisher_on_a_tiny_hf_text_classifier(tmp_path):
    from transformers import BertTokenizerFast

    from distac.cli import main

    words = ["good", "bad", "movie", "great", "awful", "plot", "the", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    model = tiny_bert(num_labels=2)
    hf = tmp_path / "bert"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    (tmp_path / "data.jsonl").write_text(
        "\n".join(
            json.dumps({"text": t, "label": lab})
            for t, lab in [("good movie", 1), ("the plot was awful awful", 0), ("great", 1), ("a bad movie", 0)]
        )
        + "\n"
    )
    out = tmp_path / "bert.fisher.safetensors"
    main(["stats", "fisher", str(hf), str(tmp_path / "data.jsonl"), "--out", str(out), "--batch-size", "3"])
    meta = read_stats_metadata(out)
    assert meta["estimator"] == "sampled" and meta["n_examples"] == 4 and meta["scale"] == "sum"
    f = load_stats(out, model=model)
    assert "classifier.weight" in f and all(bool((v >= 0).all()) for v in f.values())
    main(["stats", "gram", str(hf), str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "g.safetensors")])
    assert read_stats_metadata(tmp_path / "g.safetensors")["layout"]["classifier.weight"] == "out_in"


def test_verify_sidecar_streams_against_a_checkpoint_file(tmp_path):
    from safetensors.torch import save_file

    from distac.io import open_checkpoint
    from distac.stats import verify_sidecar

    model = softmax_regression()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    f = fisher_diagonal(model, [torch.randn(4, 4)], scale="mean", progress=False)
    path = save_stats(
        tmp_path / "f.safetensors", f, kind="fisher", model=model, n_examples=4, scale="mean", estimator="sampled"
    )
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert verify_sidecar(path, ckpt, kind="fisher")["scale"] == "mean"
    with pytest.raises(DistacError, match="on the mean scale but sum is needed"):
        verify_sidecar(path, ckpt, kind="fisher", scale="sum")
    with pytest.raises(DistacError, match="expected gram"):
        verify_sidecar(path, ckpt, kind="gram")
    other = softmax_regression(seed=9)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "o.safetensors"))
    with pytest.raises(DistacError, match="different model"):
        verify_sidecar(path, open_checkpoint(tmp_path / "o.safetensors"))


def test_linear_shortcut_matches_autograd_on_token_inputs_and_falls_back_when_weights_are_reused():
    class TokenMLP(nn.Module):
        """Linear layers on (B, T, d) inputs: per-example gradients sum over positions first."""

        def __init__(self, reuse: bool = False) -> None:
            super().__init__()
            self.a, self.b, self.reuse = nn.Linear(3, 5), nn.Linear(5, 4), reuse

        def forward(self, x):
            h = torch.tanh(self.a(x))
            if self.reuse:  # the weight used outside its module: hooks alone would miss this term
                h = h + x @ self.a.weight.T
            return self.b(h).mean(1)

    torch.manual_seed(0)
    x, y = torch.randn(6, 7, 3), torch.randint(0, 4, (6,))
    for reuse in (False, True):
        model = TokenMLP(reuse)
        f = fisher_diagonal(model, [(x, y)], estimator="empirical", progress=False)
        ref = {k: sum(g[k].pow(2) for g in per_example_grads(model, x, y)) for k in f}
        for k in f:
            torch.testing.assert_close(f[k], ref[k], rtol=1e-4, atol=1e-7, msg=f"{k} reuse={reuse}")


def test_open_sidecar_reads_the_header_once_and_keeps_a_lazy_reader(tmp_path):
    from safetensors.torch import save_file

    from distac.io import open_checkpoint
    from distac.stats import open_sidecar

    model = softmax_regression()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    f = fisher_diagonal(model, [torch.randn(4, 4)], progress=False)
    path = save_stats(
        tmp_path / "f.safetensors", f, kind="fisher", model=model, n_examples=4, scale="sum", estimator="sampled"
    )
    with (
        open_checkpoint(tmp_path / "m.safetensors") as ck,
        open_sidecar(path, use="fisher", model=ck, scale="sum") as sc,
    ):
        assert (sc.kind, sc.scale, sc.metadata["n_examples"]) == ("fisher", "sum", 4)
        assert torch.equal(sc.source.get("weight"), f["weight"])
        assert sc.source.file_of("weight") == path
    with pytest.raises(DistacError, match="but the config uses it as 'gram'"):
        open_sidecar(path, use="gram", role="the config")
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.ones(3, 4)}, str(plain))
    with open_sidecar(plain, use="fisher") as sc:
        assert sc.kind is None and sc.scale is None
    with pytest.raises(DistacError, match="not a distac statistics sidecar"):
        open_sidecar(plain, plain_ok=False)

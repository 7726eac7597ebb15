"""Input sources, batching, fit checks; HF classifier / encoder+head / torch factory loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distac_tiny import make_mlp

from distac.errors import DistacError
from distac.nn.data import Inputs, check_fits, load_inputs, load_labels
from distac.nn.models import EncoderClassifier, default_head_patterns, load_model, load_state_like, save_state_like

transformers = pytest.importorskip("transformers")

WORDS = ["good", "bad", "movie", "plot", "great", "awful", "the", "a", "was"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT sequence classifier with its own word-piece tokenizer, saved like a hub model."""
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    cfg = transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_text_formats_with_the_models_tokenizer(bert_dir, tmp_path):
    m = load_model(bert_dir)
    assert m.kind == "hf" and m.tokenizer is not None and m.head_patterns == ["classifier.*"]
    rows = [("good movie", 0), ("awful plot was bad", 1), ("a great movie", 2)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in rows))
    (tmp_path / "d.txt").write_text("".join(f"{t}\n\n" for t, _ in rows))
    (tmp_path / "y.txt").write_text("0\n1\n2\n")
    for name, kw in [
        ("d.csv", {}),
        ("d.tsv", {}),
        ("d.jsonl", {"column": "review", "label_column": "y"}),
        ("d.txt", {"labels": tmp_path / "y.txt"}),
    ]:
        x = load_inputs(tmp_path / name, tokenizer=m.tokenizer, need_labels=True, **kw)
        assert len(x) == 3 and x.labels.tolist() == [0, 1, 2]
        assert set(x.x) >= {"input_ids", "attention_mask"}
        assert x.x["input_ids"][0, 1] == m.tokenizer.convert_tokens_to_ids("good")
        assert check_fits(m.module, x) == 3
    with pytest.raises(DistacError, match="no tokenizer"):
        load_inputs(tmp_path / "d.csv")
    with pytest.raises(DistacError, match="no column 'body'"):
        load_inputs(tmp_path / "d.csv", tokenizer=m.tokenizer, column="body")


def test_hf_state_round_trip_and_encoder_head(bert_dir, tmp_path):
    m = load_model(bert_dir)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in m.state.items()}
    out = save_state_like(other, tmp_path / "ft", m)
    assert (out / "config.json").is_file() and load_model(out).tokenizer is not None
    back = load_state_like(out, m)
    assert all(torch.allclose(back[k].float(), other[k].float()) for k in other)
    # a bare encoder (no classification architecture) becomes encoder + linear head
    enc_dir = tmp_path / "enc"
    transformers.BertModel(m.module.config).save_pretrained(enc_dir)
    e = load_model(enc_dir, num_labels=4)
    assert e.kind == "hf-encoder" and isinstance(e.module, EncoderClassifier) and e.head_patterns == ["head.*"]
    x = Inputs({"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert check_fits(e.module, x) == 4


def test_image_classifier_and_image_folders(tmp_path):
    from PIL import Image

    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    d = tmp_path / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(d)
    m = load_model(d)
    assert m.kind == "hf" and m.image_processor is not None and m.head_patterns == ["classifier.*"]
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    x = load_inputs(tmp_path / "img", image_processor=m.image_processor, need_labels=True)
    assert tuple(x.x.shape) == (6, 3, 8, 8) and x.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert check_fits(m.module, x) == 2
    # without a processor: raw [0, 1] tensors, and one size required
    raw = load_inputs(tmp_path / "img")
    assert tuple(raw.x.shape) == (6, 3, 12, 10) and float(raw.x.max()) <= 1.0
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "img" / "dog" / "odd.png")
    with pytest.raises(DistacError, match=r"odd\.png"):
        load_inputs(tmp_path / "img")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistacError, match="empty"):
        load_inputs(tmp_path / "empty")


def test_numpy_formats_and_fit_errors(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(20) % 10)
    np.savez(tmp_path / "d.npz", inputs=x, labels=np.arange(20) % 10)
    a = load_inputs(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    b = load_inputs(tmp_path / "d.npz", need_labels=True)
    assert a.x.dtype == torch.float32 and torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert check_fits(make_mlp(), a) == 10
    np.save(tmp_path / "wide.npy", np.zeros((4, 65), dtype=np.float32))
    with pytest.raises(DistacError, match=r"wide\.npy' does not fit the model"):
        check_fits(make_mlp(), load_inputs(tmp_path / "wide.npy"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), dtype=np.float32))
    with pytest.raises(DistacError, match="empty"):
        load_inputs(tmp_path / "empty.npy")
    np.save(tmp_path / "y_bad.npy", np.full(20, 12))
    with pytest.raises(DistacError, match="out of range"):
        check_fits(make_mlp(), load_inputs(tmp_path / "x.npy", labels=tmp_path / "y_bad.npy"))
    with pytest.raises(DistacError, match="labels for"):
        load_inputs(tmp_path / "x.npy", labels=_short_labels(tmp_path))
    with pytest.raises(DistacError, match="unknown format"):
        (tmp_path / "d.parquet").write_text("")
        load_inputs(tmp_path / "d.parquet")
    with pytest.raises(DistacError, match="does not exist"):
        load_inputs(tmp_path / "nope.npy")


def _short_labels(tmp_path):
    np.save(tmp_path / "y5.npy", np.arange(5))
    return tmp_path / "y5.npy"


def test_saved_dataset_needs_the_extra(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DistacError, match="pip install datasets"):
            load_inputs(tmp_path / "ds")
    else:
        pytest.skip("datasets is installed; the error path does not apply")


def test_batching_is_deterministic_and_covers_epochs():
    x = Inputs(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    assert [b.shape[0] for b in x.batches(4)] == [4, 4, 2]
    assert [b.shape[0] for b in x.batches(4, drop_last=True)] == [4, 4]
    s1 = x.batches(4, shuffle=True, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(s1, x.batches(4, shuffle=True, seed=3), strict=True))
    assert torch.equal(
        torch.cat([lb for lb in x.label_batches(4, shuffle=True, seed=3)]), torch.cat(s1).squeeze(1).long()
    )
    # training stream: every step has exactly B examples; each epoch is a permutation
    stream = torch.cat([x.step_indices(k, 4, seed=0) for k in range(5)])
    assert stream.numel() == 20
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert x.step_indices(3, 16).numel() == 16  # batch larger than the dataset
    with pytest.raises(DistacError, match="empty"):
        Inputs(torch.zeros(0, 3))


def test_default_heads_for_plain_modules():
    assert default_head_patterns(make_mlp()) == ["2.*"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(3, 3)
            self.fc = torch.nn.Linear(3, 2)

    assert default_head_patterns(Net()) == ["fc.*"]


def test_labels_files(tmp_path):
    (tmp_path / "y.txt").write_text("1\n0\n\n2\n")
    assert load_labels(tmp_path / "y.txt").tolist() == [1, 0, 2]
    (tmp_path / "bad.txt").write_text("cat\n")
    with pytest.raises(DistacError, match="integer class ids"):
        load_labels(tmp_path / "bad.txt")


def test_condition_cli_on_a_hugging_face_classifier(bert_dir, tmp_path, monkeypatch):
    """Text through the model's own tokenizer; the conditioned model comes back as an HF directory."""
    from distac.cli import main

    monkeypatch.chdir(tmp_path)
    m = load_model(bert_dir)
    g = torch.Generator().manual_seed(0)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in m.state.items()}
    save_state_like(ft, tmp_path / "ft", m)
    (tmp_path / "train.csv").write_text(
        "text\n"
        + "".join(f"{a} {b} was {c}\n" for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[::-1], strict=True))
    )
    try:
        main(
            [
                "condition",
                "--base",
                str(bert_dir),
                "--model",
                "sst=ft",
                "--data",
                "sst=train.csv",
                "--mode",
                "norm",
                "--kappa",
                "0.5",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--out",
                "cond",
                "-q",
                "--device",
                "cpu",
            ]
        )
    except SystemExit as e:
        assert e.code in (0, None)
    out = load_model(tmp_path / "cond" / "sst")
    assert out.kind == "hf" and out.tokenizer is not None
    report = json.loads((tmp_path / "cond" / "sst.report.json").read_text())
    assert report["kappa"] == 0.5 and report["steps_done"] == 3
    # the head (classifier.*) is frozen; the body moved towards θ_0 + κτ
    assert torch.allclose(out.state["classifier.weight"], ft["classifier.weight"])
    assert report["norm_after"] < 0.75 * report["norm_before"]

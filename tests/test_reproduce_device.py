"""distac reproduce off this machine: the device option, the data/weights overrides, the GPU pack.

The pack round trip runs on a small fake MiniLM folder and a small Orange ``.tab`` file; the
device tests run on the CPU here and also on CUDA where there is one.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

from distac.errors import DistacError
from distac.reproduce import text_tasks
from distac.reproduce.text import MINILM_ENV, minilm_path
from distac.reproduce.text_tasks import COLUMNS_SUFFIX, TEXT_DATA_ENV, TextSpec, data_file, read_columns, read_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_pack

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

# an Orange .tab file: header, types row, flags row, then rows (one with a missing text, one
# whose text pandas reads as missing: "NA", one with quotes and padding)
TAB = (
    "Category\tText\tOther\n"
    "d\tstring\tcontinuous\n"
    "class\t\t\n"
    "a\t  first text  \t1\n"
    "b\t\t2\n"
    "b\tNA\t3\n"
    'a\tsaid "hi" there\t4\n'
    "c\tsecond\t5\n"
    "x.y\tgrouped\t6\n"
)


def _spec(file: str) -> TextSpec:
    return TextSpec(
        "toy",
        "orangecontrib.text",
        (f"datasets/{file}",),
        "Text",
        "Category",
        (("a", "class a"), ("b", "class b"), ("z", "class z")),
        groups=(("x.y", "z"),),
    )


def test_text_data_env_reads_tab_files_and_their_pre_read_columns_alike(tmp_path, monkeypatch):
    tab, pre = tmp_path / "tab", tmp_path / "pre"
    tab.mkdir()
    pre.mkdir()
    (tab / "toy.tab").write_text(TAB)
    monkeypatch.setenv(TEXT_DATA_ENV, str(tab))
    assert data_file("orangecontrib.text", "datasets/toy.tab") == tab / "toy.tab"
    from_tab = read_task(_spec("toy.tab"))
    # "c" is no class of the task, the empty and the "NA" texts are missing; groups map x.y to z
    assert from_tab == (["first text", 'said "hi" there', "grouped"], ["a", "a", "z"])

    gpu_pack.write_columns(tab / "toy.tab", ("Category", "Text"), pre / ("toy.tab" + COLUMNS_SUFFIX))
    monkeypatch.setenv(TEXT_DATA_ENV, str(pre))
    read_columns.cache_clear()
    assert read_task(_spec("toy.tab")) == from_tab
    with gzip.open(pre / ("toy.tab" + COLUMNS_SUFFIX), "rt") as f:
        assert set(json.load(f)) == {"Category", "Text"}  # only the columns the tasks read
    with pytest.raises(DistacError, match="lacks the columns"):
        read_columns(pre / "toy.tab", ("Other",))
    with pytest.raises(DistacError, match=TEXT_DATA_ENV):
        read_task(_spec("absent.tab"))


def test_minilm_env_names_the_folder_and_must_hold_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv(MINILM_ENV, str(tmp_path))
    with pytest.raises(DistacError, match=r"config\.json"):
        minilm_path()
    (tmp_path / "config.json").write_text("{}")
    assert minilm_path() == str(tmp_path)


def _fake_minilm(root: Path) -> Path:
    model = root / "model"
    (model / "1_Pooling").mkdir(parents=True)
    for name in gpu_pack.SMALL_FILES:
        (model / name).write_text(f"content of {name}")
    g = torch.Generator().manual_seed(0)
    (model / gpu_pack.WEIGHTS).write_bytes(torch.randint(0, 256, (300_000,), generator=g, dtype=torch.uint8).numpy())
    return model


def test_gpu_pack_splits_and_reassembles_minilm_byte_for_byte(tmp_path, monkeypatch):
    model = _fake_minilm(tmp_path)
    (tmp_path / "toy.tab").write_text(TAB)
    monkeypatch.setattr(gpu_pack, "task_columns", lambda: {"datasets/toy.tab": ("Category", "Text")})
    a, b = gpu_pack.pack(model, {"datasets/toy.tab": tmp_path / "toy.tab"}, tmp_path / "gpu")
    sizes = gpu_pack.piece_bytes(a), gpu_pack.piece_bytes(b)
    assert abs(sizes[0] - sizes[1]) < 0.01 * sum(sizes)  # the weights are cut to balance the pieces
    assert (a / gpu_pack.DATA_DIR / ("toy.tab" + COLUMNS_SUFFIX)).is_file()

    dest, data = gpu_pack.unpack(a, b, tmp_path / "gpu" / "minilm")
    assert (dest / gpu_pack.WEIGHTS).read_bytes() == (model / gpu_pack.WEIGHTS).read_bytes()
    for name in gpu_pack.SMALL_FILES:
        assert (dest / name).read_bytes() == (model / name).read_bytes()
    assert data == a / gpu_pack.DATA_DIR

    # a corrupted piece is refused, and so is a pack that does not fit the device call
    part = b / f"{gpu_pack.WEIGHTS}.part1"
    raw = bytearray(part.read_bytes())
    raw[10] ^= 1
    part.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="corrupted"):
        gpu_pack.unpack(a, b, tmp_path / "gpu" / "minilm")
    with pytest.raises(SystemExit, match="MiB"):
        gpu_pack.pack(model, {"datasets/toy.tab": tmp_path / "toy.tab"}, tmp_path / "gpu2", limit=1000)


def test_task_columns_cover_every_file_the_text_tasks_read():
    cols = gpu_pack.task_columns()
    for spec in text_tasks.TEXT_TASKS:
        for f in spec.files:
            assert {spec.text, spec.label} <= set(cols[f])


@pytest.mark.parametrize("device", DEVICES)
def test_text_training_and_logits_follow_the_model_device(device):
    from transformers import BertConfig, BertModel

    from distac.reproduce.tasks import Split, TaskData, TaskSpec
    from distac.reproduce.text import TextClassifier
    from distac.reproduce.train import Recipe, finetune, predict_logits

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = TextClassifier(BertModel(cfg), 0, {"t": 3}).to(device)
    x = torch.randint(1, 50, (24, 6))
    split = Split(x, torch.arange(24) % 3)
    td = TaskData(TaskSpec("t", lambda v: v, lambda v: v, 3, "toy"), split, split, split)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = finetune(model, td, Recipe(lr=1e-2, steps=3, batch=8, warmup=1), seed=0)
    assert all(v.device.type == device for v in state.values())
    assert not torch.equal(
        state["encoder.embeddings.word_embeddings.weight"].cpu(),
        before["encoder.embeddings.word_embeddings.weight"].cpu(),
    )
    assert torch.equal(state["heads.t.weight"], before["heads.t.weight"])  # heads stay frozen
    z = predict_logits(model, "t", x)
    assert z.device.type == "cpu" and z.shape == (24, 3)


def test_zoo_trained_on_another_device_is_not_loaded_as_the_cpu_zoo(tmp_path):
    from distac.reproduce.zoo import load_cached, trained_on

    assert trained_on("cpu") is None and trained_on(torch.device("cuda", 0)) == "cuda"
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 3, "trained_on": "cuda"}))
    logs: list[str] = []
    assert load_cached(tmp_path, {"version": 3, "trained_on": None}, log=logs.append) is None
    assert "stale" in logs[0]
    # a manifest written before the entry existed is a CPU zoo
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 3}))
    logs.clear()
    load_cached(tmp_path, {"version": 3, "trained_on": None}, log=logs.append)
    assert "stale" not in " ".join(logs)


def test_the_report_is_written_after_every_seed_so_a_stopped_run_keeps_its_finished_seeds(tmp_path):
    from distac.reproduce.profile import QUICK
    from distac.reproduce.vision import run_suite
    from distac.reproduce.zoo import build_or_load_zoo

    def zoo_for(seed):
        if seed == 1:
            raise KeyboardInterrupt  # the run is stopped while building its second zoo
        return build_or_load_zoo(QUICK, cache=tmp_path / "cache", seed=seed, progress=lambda it, _d: it, log=print)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_suite(
            QUICK,
            zoo_for,
            suite="vision",
            out=out,
            seeds=2,
            progress=False,
            log=print,
            command="test",
            prior_data=None,
            device="cpu",
        )
    run = json.loads((out / "run.json").read_text())
    assert run["seeds"] == 1 and run["machine"]["device"] == "cpu"
    assert set(run["timings"]) == {f"seed0_{k}_s" for k in ("zoo", "distac", "fisher", "grid", "sweep")}
    assert "seeds: 1" in (out / "results.md").read_text()

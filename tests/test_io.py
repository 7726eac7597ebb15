"""Checkpoint readers (every form), the streaming shard writer and the atomic output folder."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from conftest import tiny_state, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distac import DistacError, open_checkpoint
from distac.io import ShardWriter, atomic_dir, atomic_file, copy_model_files, parse_size, read_header
from distac.io.atomic import MARKER, clean_stale


def _assert_same(ck, state):
    assert set(ck.keys()) == set(state)
    for k, v in state.items():
        assert ck.shape(k) == tuple(v.shape)
        assert ck.dtype(k) == v.dtype
        assert torch.equal(ck.get(k), v), k


@pytest.mark.parametrize("form", ["file", "sharded", "hf", "hf_bin", "pt"])
def test_every_form_reads_lazily_and_exactly(tmp_path, form):
    state = tiny_state(3, dtype=torch.bfloat16)
    path = write_checkpoint(state, tmp_path / ("m.safetensors" if form == "file" else "m"), form=form)
    ck = open_checkpoint(path)
    _assert_same(ck, state)
    emb = state["embed.weight"]
    assert torch.equal(ck.get_rows("embed.weight", 5, 9), emb[5:9])
    if form == "sharded":
        assert len(ck.files) == 3
        assert ck.file_of("classifier.bias").name.startswith("model-0000")


def test_sharded_index_path_and_folder_are_the_same_checkpoint(tmp_path):
    folder = write_checkpoint(tiny_state(1), tmp_path / "m", form="sharded")
    a, b = open_checkpoint(folder), open_checkpoint(folder / "model.safetensors.index.json")
    assert a.keys() == b.keys()


def test_torch_file_nested_state_dict_is_unwrapped(tmp_path):
    state = tiny_state(2)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    _assert_same(open_checkpoint(tmp_path / "ckpt.pt"), state)


class _Custom:  # a class that weights_only=True must refuse to unpickle
    def __init__(self):
        self.w = torch.ones(2)


def test_pickle_with_code_is_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"model": _Custom()}, path)
    with pytest.raises(DistacError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "arbitrary code" in msg and "save_file" in msg


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DistacError, match=r"nope\.safetensors"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    path = write_checkpoint(tiny_state(0), tmp_path / "t.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(DistacError, match=r"t\.safetensors.*truncated"):
        open_checkpoint(path)


@pytest.mark.parametrize("payload", [b"\xff" * 64, struct.pack("<Q", 10) + b"{not json}", struct.pack("<Q", 10**12)])
def test_corrupt_header_names_file(tmp_path, payload):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(DistacError, match=r"bad\.safetensors.*(corrupt|truncated)"):
        open_checkpoint(path)


def test_header_offsets_that_do_not_fit_the_shape_are_corrupt(tmp_path):
    path = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(DistacError, match="does not fit shape"):
        read_header(path)


def test_shard_writer_streams_row_chunks_into_byte_sized_shards(tmp_path):
    state = tiny_state(5)
    layout = [(k, tuple(v.shape), torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in state.items()]
    w = ShardWriter(tmp_path, layout, max_shard_bytes=300)
    for k, v in state.items():
        if v.dim() and v.shape[0] > 4:  # the engine's row-chunked path
            for s in range(0, v.shape[0], 4):
                w.write(k, v[s : s + 4])
        else:
            w.write(k, v)
    files = w.close()
    assert len(files) > 2
    for f in files:  # each shard's data fits the budget unless one tensor alone is larger
        with safe_open(str(f), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()]
        assert sum(sizes) <= 300 or len(sizes) == 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    back = {}
    for f in files:
        back.update(load_file(f))
    for k, v in state.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), k


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    state = tiny_state(1)
    w = ShardWriter(tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in state.items()])
    for k, v in state.items():
        w.write(k, v)
    assert [f.name for f in w.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert load_file(tmp_path / "model.safetensors").keys() == state.keys()


def test_shard_writer_refuses_out_of_order_and_incomplete(tmp_path):
    w = ShardWriter(tmp_path, [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="'b' was complete"):
        w.close()


def test_atomic_dir_renames_on_success_and_cleans_on_error(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
        assert not target.exists()
    assert (target / "f").read_text() == "x"
    with pytest.raises(DistacError, match="already exists"):
        with atomic_dir(target):
            pass
    with pytest.raises(DistacError, match="disk full"):
        with atomic_dir(target, overwrite=True) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "f").read_text() == "x"  # the old output survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "g").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "g"]


def test_overwrite_replaces_only_distacs_own_folders(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(DistacError, match="not written by distac"):
        with atomic_dir(foreign, overwrite=True):
            pass
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
def test_output_never_touches_an_input(tmp_path, where):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.safetensors").write_bytes(b"x")
    out = {"equal": model, "inside": model / "merged", "contains": tmp_path}[where]
    with pytest.raises(DistacError, match="input"):
        with atomic_dir(out, overwrite=True, inputs=[model / "w.safetensors"] if where != "inside" else [model]):
            pass
    assert (model / "w.safetensors").read_bytes() == b"x"


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path):
    (tmp_path / "cfg.yml").write_text("merge_method: ties")
    (tmp_path / "link").symlink_to(tmp_path / "cfg.yml")
    with pytest.raises(DistacError, match="is an input"):
        with atomic_file(tmp_path / "link", overwrite=True, inputs=[tmp_path / "cfg.yml"]):
            pass
    assert (tmp_path / "cfg.yml").read_text() == "merge_method: ties"


def test_the_current_folder_is_never_an_output(tmp_path, monkeypatch):
    (tmp_path / MARKER).write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistacError, match="current folder"):
        with atomic_dir(".", overwrite=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]


def test_a_folder_that_appears_during_the_run_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(DistacError, match="already exists"):
        with atomic_dir(target) as tmp:
            (tmp / "ours").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
        with pytest.raises(DistacError, match="another distac run"):
            with atomic_dir(target):
                pass
    assert (target / "f").read_text() == "x"


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess

    dead = subprocess.run(["true"]).returncode or 0
    pid = subprocess.Popen(["true"])
    pid.wait()
    stale = tmp_path / f".out.tmp-{pid.pid}-0123abcd"
    stale.mkdir()
    (stale / "big").write_bytes(b"0" * 100)
    alive = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    alive.mkdir()
    assert clean_stale(tmp_path / "out") == [stale]
    assert not stale.exists() and alive.exists() and dead == 0


def test_atomic_file_on_a_full_disk_leaves_nothing(tmp_path):
    target = tmp_path / "temperatures.json"
    with pytest.raises(DistacError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_copy_model_files_skips_weights_and_card(tmp_path):
    src = write_checkpoint(tiny_state(0), tmp_path / "src", form="hf")
    (src / "model.safetensors.index.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(src / "extra.safetensors"))
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_model_files(src, dst) == ["config.json", "tokenizer.json"]


@pytest.mark.parametrize(
    ("text", "n"),
    [("1GB", 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1e6", 10**6), (4096, 4096), ("64 kib", 65536)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(DistacError):
        parse_size(text)


@pytest.mark.parametrize("form", ["sharded", "hf", "pt"])
def test_tiny_checkpoints_fixture_reads_back(tiny_checkpoints, form):
    base_path, paths, base, models = tiny_checkpoints(3, form=form)
    _assert_same(open_checkpoint(base_path), base)
    for p, m in zip(paths, models, strict=True):
        _assert_same(open_checkpoint(p), m)


def test_trainer_folder_pickles_are_not_taken_for_weights(tmp_path):
    state = tiny_state(1)
    folder = write_checkpoint(state, tmp_path / "run", form="hf_bin")
    torch.save({"lr": 1.0, "obj": _Custom()}, folder / "training_args.bin")
    torch.save({"state": {}}, folder / "optimizer.pt")
    _assert_same(open_checkpoint(folder), state)


@pytest.mark.parametrize("form", ["file", "sharded", "pt"])
def test_every_reader_implements_the_whole_tensor_source_protocol(tmp_path, form):
    from distac.io.readers import SafetensorsFile, TorchFile

    state = tiny_state(2)
    path = write_checkpoint(state, tmp_path / ("m.safetensors" if form == "file" else "m"), form=form)
    with open_checkpoint(path) as ck:
        readers = [ck, *ck.files]
        assert {type(f) for f in ck.files} <= {SafetensorsFile, TorchFile}
        for r in readers:
            for k in r.keys():
                want = state[k]
                assert r.shape(k) == tuple(want.shape) and r.dtype(k) == want.dtype
                assert torch.equal(r.get(k), want)
                assert r.file_of(k).name in {p.name for p in tmp_path.rglob("*")}
                if want.dim():
                    assert torch.equal(r.get_rows(k, 1, 3), want[1:3])
                    out = torch.empty((2, *want.shape[1:]), dtype=torch.float32)
                    assert r.read_into(k, (1, 3), out) == want[1:3].numel() * want.element_size()
                    assert torch.equal(out, want[1:3].float())
            assert isinstance(r.label, str)


def test_checkpoint_is_a_context_manager_and_keeps_working_without_with(tmp_path):
    path = write_checkpoint(tiny_state(1), tmp_path / "m.safetensors")
    with open_checkpoint(path) as ck:
        ck.get("scalar")
        fds = [f._fd for f in ck.files]
        assert all(fd is not None for fd in fds)
    assert all(f._fd is None for f in ck.files)  # closed by the with block
    ck2 = open_checkpoint(path)
    assert torch.equal(ck2.get("scalar"), tiny_state(1)["scalar"])
    ck2.close()
    assert torch.equal(ck2.get("scalar"), tiny_state(1)["scalar"])  # reopens on demand


def test_background_writer_is_a_context_manager_with_the_same_bytes(tmp_path):
    from distac.io import BackgroundWriter

    state = tiny_state(4)
    layout = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = ShardWriter(tmp_path / "a", layout, max_shard_bytes=300)
    for k, v in state.items():
        plain.write(k, v)
    plain.close()
    with BackgroundWriter(ShardWriter(tmp_path / "b", layout, max_shard_bytes=300), depth=1) as bg:
        for k, v in state.items():
            bg.write(k, v)
    assert [f.name for f in bg.files] == sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    for f in bg.files:
        assert f.read_bytes() == (tmp_path / "a" / f.name).read_bytes()


def test_background_writer_reraises_a_disk_error_and_aborts_in_a_with_block(tmp_path, monkeypatch):
    from distac.io import BackgroundWriter

    state = tiny_state(4)
    layout = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_write_bytes", full)
    with pytest.raises(OSError, match="No space"):
        with BackgroundWriter(ShardWriter(tmp_path, layout)) as bg:
            for k, v in state.items():
                bg.write(k, v)
    assert bg.writer._fh is None


def test_write_safetensors_is_read_back_by_safetensors_itself(tmp_path):
    from distac.io import write_safetensors

    state = tiny_state(6)
    state["tied"] = state["embed.weight"]  # shared storage: written as a copy
    path = write_safetensors(tmp_path / "s.safetensors", state, {"kind": "fisher"})
    back = load_file(path)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"kind": "fisher"}


def test_copy_model_files_copies_subfolders_like_sentence_transformers_pooling(tmp_path):
    src = write_checkpoint(tiny_state(0), tmp_path / "src", form="hf")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (src / "1_Pooling" / "extra.safetensors").write_bytes(b"weights are never copied")
    (src / "modules.json").write_text("[]")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_model_files(src, dst)
    assert "1_Pooling/config.json" in copied and "modules.json" in copied
    assert (dst / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert not (dst / "1_Pooling" / "extra.safetensors").exists()

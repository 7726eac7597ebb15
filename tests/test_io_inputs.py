"""The input policy: every path a checkpoint names stays inside its folder, only regular files are
opened or copied, safetensors headers are validated as the format requires, and every broken
input is one line naming the file (exit 2 through the CLI)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import finetuned, tiny_state, write_checkpoint
from conftest import run_cli as run
from safetensors.torch import save_file

from distac import DistacError, open_checkpoint
from distac.io import copy_model_files, parse_size, read_header


def _sharded(tmp_path: Path, weight_map: object) -> Path:
    folder = write_checkpoint(tiny_state(0), tmp_path / "m", form="sharded")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _stranger(tmp_path: Path) -> Path:
    """Another file's tensors, outside the model folder, with the same names as the model's."""
    outside = tmp_path / "private" / "x.safetensors"
    outside.parent.mkdir()
    save_file({k: v.contiguous() for k, v in tiny_state(7).items()}, str(outside))
    return outside


# ---------------------------------------------------------------------------------------------
# paths a checkpoint names stay inside its folder
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../private/x.safetensors", "ABSOLUTE", "link.safetensors"])
def test_index_entries_leading_outside_the_model_folder_are_refused(tmp_path, entry):
    outside = _stranger(tmp_path)
    folder = write_checkpoint(tiny_state(0), tmp_path / "m", form="sharded")
    (folder / "link.safetensors").symlink_to(outside)
    name = str(outside) if entry == "ABSOLUTE" else entry
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["embed.weight"] = name
    index.write_text(json.dumps(data))
    for path in (folder, index):
        with pytest.raises(DistacError) as e:
            open_checkpoint(path)
        msg = str(e.value)
        assert "model.safetensors.index.json" in msg and name in msg and "\n" not in msg


def test_weight_files_of_a_folder_linking_outside_are_refused(tmp_path):
    outside = _stranger(tmp_path)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(DistacError, match="outside the model folder"):
        open_checkpoint(folder)


def test_links_inside_the_folder_and_the_hub_cache_layout_are_followed(tmp_path):
    state = tiny_state(3)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "blobs" / "0f3e"))
    (snap / "model.safetensors").symlink_to("../../blobs/0f3e")
    (snap / "config.json").write_text("{}")
    with open_checkpoint(snap) as ck:
        assert torch.equal(ck.get("embed.weight"), state["embed.weight"])
    local = tmp_path / "local"
    local.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(local / "real.bin.safetensors"))
    (local / "model.safetensors").symlink_to("real.bin.safetensors")
    assert set(open_checkpoint(local / "model.safetensors").keys()) == set(state)


@pytest.mark.parametrize(
    ("weight_map", "match"),
    [
        (["model-00001-of-00003.safetensors"], "weight_map"),
        ({"embed.weight": 3}, "not a file name"),
        ({"embed.weight": "missing.safetensors"}, "missing.safetensors.*does not exist"),
        ({}, "weight_map"),
    ],
)
def test_malformed_weight_map_is_one_line_naming_the_index(tmp_path, weight_map, match):
    folder = _sharded(tmp_path, weight_map)
    with pytest.raises(DistacError, match=match) as e:
        open_checkpoint(folder)
    assert "model.safetensors.index.json" in str(e.value)


def test_a_non_object_index_is_refused(tmp_path):
    folder = write_checkpoint(tiny_state(0), tmp_path / "m", form="sharded")
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(DistacError, match="not a valid shard index"):
        open_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# copying the base's files
# ---------------------------------------------------------------------------------------------
def test_copy_model_files_never_copies_a_link_leading_outside(tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    src = write_checkpoint(tiny_state(0), tmp_path / "src", form="hf")
    (src / "tokenizer_config.json").symlink_to(secret)
    (src / "special_tokens_map.json").symlink_to("tokenizer.json")  # inside: copied by content
    os.mkfifo(src / "vocab.txt")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_model_files(src, dst)
    assert copied == ["config.json", "special_tokens_map.json", "tokenizer.json"]
    assert not (dst / "tokenizer_config.json").exists()
    assert not (dst / "special_tokens_map.json").is_symlink()
    assert (dst / "special_tokens_map.json").read_text() == (src / "tokenizer.json").read_text()
    assert "PRIVATE KEY" not in "".join(p.read_text() for p in dst.iterdir())
    err = capsys.readouterr().err
    assert "not copying tokenizer_config.json" in err and "vocab.txt" in err


def test_merge_output_never_holds_a_linked_secret(tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    base = tiny_state(0)
    write_checkpoint(base, tmp_path / "base", form="hf")
    (tmp_path / "base" / "tokenizer_config.json").symlink_to(secret)
    write_checkpoint(finetuned(base, 1), tmp_path / "ft.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "ft.safetensors"}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(["merge", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "out"), "-q"], capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert all(
        "PRIVATE KEY" not in p.read_bytes().decode("latin-1") for p in (tmp_path / "out").rglob("*") if p.is_file()
    )


# ---------------------------------------------------------------------------------------------
# only regular files are opened
# ---------------------------------------------------------------------------------------------
def _returns_within(fn, seconds: float, fifo: Path):
    """Run ``fn`` on a thread; if it blocks (opening a FIFO waits for a writer), unblock it and fail."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # release the blocked reader
        os.close(fd)
        th.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return box


@pytest.mark.parametrize("name", ["model.safetensors", "weights.pt"])
@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_fifo_named_like_weights_is_refused_at_once(tmp_path, name, given):
    folder = tmp_path / "m"
    folder.mkdir()
    fifo = folder / name
    os.mkfifo(fifo)
    box = _returns_within(lambda: open_checkpoint(folder if given == "folder" else fifo), 10, fifo)
    assert isinstance(box.get("error"), DistacError), box
    assert "FIFO" in str(box["error"]) and name in str(box["error"])


def test_a_fifo_as_shard_index_entry_is_refused(tmp_path):
    folder = write_checkpoint(tiny_state(0), tmp_path / "m", form="sharded")
    first = folder / "model-00001-of-00003.safetensors"
    first.unlink()
    os.mkfifo(first)
    box = _returns_within(lambda: open_checkpoint(folder), 10, first)
    assert isinstance(box.get("error"), DistacError) and "FIFO" in str(box["error"])


# ---------------------------------------------------------------------------------------------
# safetensors headers validated as the format requires
# ---------------------------------------------------------------------------------------------
def _raw(header: dict | str, data: bytes, *, pad: int = 0, declared: int | None = None) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode() + b" " * pad
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def _two(a=(0, 16), b=(16, 32), shape_b=(2, 2)) -> dict:
    return {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": list(a)},
        "b": {"dtype": "F32", "shape": list(shape_b), "data_offsets": list(b)},
    }


def test_a_header_length_a_few_bytes_short_is_refused(tmp_path):
    """With padding the JSON still parses, and every tensor would shift by 4 bytes (values ~1e36)."""
    good = _raw(_two(), np.arange(8, dtype=np.float32).tobytes(), pad=6)
    (tmp_path / "ok.safetensors").write_bytes(good)
    assert read_header(tmp_path / "ok.safetensors")[0]["b"].shape == (2, 2)
    n = struct.unpack("<Q", good[:8])[0]
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", n - 4) + good[8:])
    with pytest.raises(DistacError, match=r"short\.safetensors.*(after the last tensor|corrupt)"):
        open_checkpoint(tmp_path / "short.safetensors")


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (_two(b=(8, 24)), 32, "overlaps"),
        (_two(b=(20, 36)), 36, "gap"),
        (_two(), 40, "8 bytes after the last tensor"),
        (_two(), 24, "truncated"),
        (
            '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            8,
            "duplicate key 'a'",
        ),
        ({"__metadata__": {"k": 1}, **_two()}, 32, "__metadata__"),
        ({"__metadata__": "x", **_two()}, 32, "__metadata__"),
        (_two(shape_b=(-2, -2)), 32, "non-negative"),
        (_two(shape_b=(2.0, 2)), 32, "non-negative integers"),
        (_two(shape_b=(True, 4)), 32, "non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}}, 4, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 4, "data_offsets"),
        ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, 8, "unsupported safetensors dtype"),
        ({"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}}, 4, "dtype"),
        ({"a": [1, 2]}, 0, "not an object"),
        ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', 4, "NaN"),
        ("[1, 2]", 0, "does not start with"),
        (" " + json.dumps(_two()), 32, "does not start with"),
    ],
)
def test_headers_the_format_forbids_are_refused_naming_the_file(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_raw(header, bytes(data)))
    with pytest.raises(DistacError, match=match) as e:
        open_checkpoint(path)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# torch files: one line for every broken or exotic file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (os.urandom(64) + b"\x80\x02", "not a torch checkpoint|cannot load"),
        (b"hello world", "cannot load|not a torch checkpoint"),
        (b"", "cannot load|not a torch checkpoint"),
        (b"PK\x03\x04" + bytes(100), "cannot load"),
        ({"w": torch.zeros(2, dtype=torch.complex64)}, "complex"),
        ({"w": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}, "quantized"),
        ({"w": torch.zeros(2, dtype=torch.uint16)}, "dtype"),
        ({"w": torch.zeros(2, 2).to_sparse()}, "sparse"),
        ({(1, 2): torch.zeros(2)}, "not a string"),
        ({"w": 3}, "not tensors"),
        ([torch.zeros(2)], "holds a list"),
    ],
)
def test_broken_or_exotic_torch_files_are_one_line(tmp_path, content, match):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DistacError, match=match) as e:
        open_checkpoint(path)
    assert "weights.pt" in str(e.value) and "\n" not in str(e.value)


def test_a_corrupt_pt_model_exits_2_through_the_cli(tmp_path, capsys):
    base = tiny_state(0)
    write_checkpoint(base, tmp_path / "base.safetensors")
    (tmp_path / "ft.pt").write_bytes(b"definitely not a pickle")
    cfg = {"merge_method": "task_arithmetic", "base_model": "base.safetensors", "models": [{"model": "ft.pt"}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(["merge", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "ft.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1e400", "-1", "abc", "inf", "-inf", "nan", "0.5", 10**30])
def test_parse_size_refuses_absurd_values_in_one_line(text):
    with pytest.raises(DistacError, match=r"--shard-size: .*" + str(text)[:3].replace("+", r"\+")):
        parse_size(text, what="--shard-size")


@pytest.mark.parametrize(
    ("flag", "value"), [("--shard-size", "1e400"), ("--shard-size", "-1"), ("--chunk-size", "abc")]
)
def test_bad_sizes_exit_2_naming_the_value(tmp_path, capsys, flag, value):
    base = tiny_state(0)
    write_checkpoint(base, tmp_path / "base.safetensors")
    write_checkpoint(finetuned(base, 1), tmp_path / "ft.safetensors")
    cfg = {"merge_method": "task_arithmetic", "base_model": "base.safetensors", "models": [{"model": "ft.safetensors"}]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    code, _, err = run(["merge", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "out"), flag, value], capsys)
    assert code == 2 and value in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

"""Property-based fuzzing of safetensors headers: whatever the bytes, distac either reads exactly
what the reference loader reads, or refuses with one line naming the file (exit 2, no output)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import distac
from distac import DistacError, open_checkpoint
from distac.cli import main

BASE = {
    "w": torch.linspace(-1, 1, 6).reshape(2, 3),
    "b": torch.full((4,), 0.5, dtype=torch.bfloat16),
    "n": torch.arange(2),
}
FT = {k: v + 0.25 if v.is_floating_point() else v.clone() for k, v in BASE.items()}
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "U16", "C64", "F4", "f32", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 60) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _split(raw: bytes) -> tuple[dict, bytes] | None:
    """Header and data of a file whose header still parses (else None: stop mutating it)."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
    except (struct.error, ValueError):
        return None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        return None
    return header, raw[8 + n :]


def _join(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file for FT with one or two mutations of its header, length prefix or data."""
    raw = save({k: v.contiguous() for k, v in FT.items()}, metadata={"format": "pt"})
    for _ in range(draw(st.integers(1, 2))):
        parts = _split(raw)
        if parts is None:
            break
        header, data = parts
        kind = draw(st.sampled_from(["entry", "metadata", "length", "data", "bytes", "duplicate", "swap"]))
        names = [k for k in header if k != "__metadata__"]
        if not names:
            break
        if kind == "entry":
            entry = header[draw(st.sampled_from(names))]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra"]))
            if field == "dtype":
                entry["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
            elif field == "shape":
                entry["shape"] = draw(st.lists(st.integers(-2, 8), max_size=3) | json_values)
            elif field == "data_offsets":
                entry["data_offsets"] = draw(st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values)
            elif field == "drop":
                entry.pop(draw(st.sampled_from(sorted(entry))))
            else:
                entry[draw(st.text(max_size=4))] = draw(json_values)
            raw = _join(header, data)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
            raw = _join(header, data)
        elif kind == "length":
            (n,) = struct.unpack("<Q", raw[:8])
            raw = struct.pack("<Q", max(0, n + draw(st.integers(-16, 16)))) + raw[8:]
        elif kind == "data":
            cut = draw(st.integers(-12, 12))
            raw = raw[:cut] if cut < 0 else raw + bytes(cut)
        elif kind == "bytes":
            buf = bytearray(raw)
            for _ in range(draw(st.integers(1, 4))):
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
            raw = bytes(buf)
        elif kind == "duplicate":
            a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
            text = json.dumps(header)
            raw = _join(text[:-1] + f", {json.dumps(a)}: {json.dumps(header[b])}" + "}", data)
        else:  # two tensors exchange their byte ranges: still a valid file, other values
            a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
            oa, ob = header[a].get("data_offsets"), header[b].get("data_offsets")
            header[a]["data_offsets"], header[b]["data_offsets"] = ob, oa
            raw = _join(header, data)
    return raw


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OSError):
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=mutated())
def test_open_checkpoint_reads_exactly_what_the_reference_reads_or_refuses_in_one_line(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(raw)
        try:
            with open_checkpoint(path) as ck:
                got = {k: ck.get(k) for k in ck.keys()}
        except DistacError as e:
            assert "fuzz.safetensors" in str(e) and "\n" not in str(e)
            return
        ref = _reference(path)
        assert ref is not None, "distac read a file the reference loader refuses"
        assert set(got) == set(ref)
        for k in got:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
            assert _bytes(got[k]) == _bytes(ref[k]), k


def _run(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(raw=mutated())
def test_merge_of_a_fuzzed_model_is_exact_or_exits_2_without_output(raw, capsys):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "base.safetensors").write_bytes(save({k: v.contiguous() for k, v in BASE.items()}))
        (root / "ft.safetensors").write_bytes(raw)
        cfg = {
            "merge_method": "task_arithmetic",
            "base_model": "base.safetensors",
            "models": [{"model": "ft.safetensors"}],
        }
        (root / "merge.yml").write_text(yaml.safe_dump(cfg))
        code, err = _run(["merge", str(root / "merge.yml"), "--out", str(root / "out"), "-q"], capsys)
        assert code in (0, 2), err
        if code == 2:
            assert not (root / "out").exists()
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert sorted(p.name for p in root.iterdir()) == ["base.safetensors", "ft.safetensors", "merge.yml"]
            return
        ref = _reference(root / "ft.safetensors")
        assert ref is not None, "distac merged a file the reference loader refuses"
        want = distac.merge(BASE, [ref], "task_arithmetic", device="cpu")
        got = load_file(str(root / "out" / "model.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert _bytes(got[k]) == _bytes(want[k]), k

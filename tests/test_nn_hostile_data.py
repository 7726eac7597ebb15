"""Broken and hostile data files: each is one error line naming the file (and line/row), exit 2, never a traceback.

Every case runs through the Python loader and through both commands that read data (``distac diagnose``
and ``distac calibrate``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from distac_tiny import digits, zoo
from safetensors.torch import save_file

from distac.errors import DistacError
from distac.nn.data import load_inputs, load_labels


def _non_utf8(d: Path) -> Path:
    p = d / "bad.txt"
    p.write_bytes(b"a fine line\n\xff\xfe latin-1 \xe9t\xe9\n")
    return p


def _long_csv_field(d: Path) -> Path:
    p = d / "long.csv"
    p.write_text("text,label\n" + '"' + "x" * 200_000 + '",1\n')
    return p


def _bad_jsonl(d: Path) -> Path:
    p = d / "bad.jsonl"
    p.write_text('{"text": "ok", "label": 0}\n{"text": "broken\n')
    return p


def _jsonl_not_object(d: Path) -> Path:
    p = d / "list.jsonl"
    p.write_text('{"text": "ok", "label": 0}\n[1, 2]\n')
    return p


def _zero_d_npy(d: Path) -> Path:
    p = d / "scalar.npy"
    np.save(p, np.float32(3.0))
    return p


def _corrupt_npy(d: Path) -> Path:
    p = d / "corrupt.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00garbage that is no header" + bytes(range(50)))
    return p


def _empty_npy(d: Path) -> Path:
    p = d / "empty.npy"
    p.write_bytes(b"")
    return p


def _pickled_npy(d: Path) -> Path:
    p = d / "objects.npy"
    np.save(p, np.array([{"a": 1}, [2]], dtype=object), allow_pickle=True)
    return p


def _string_npy(d: Path) -> Path:
    p = d / "strings.npy"
    np.save(p, np.array(["a", "b"]))
    return p


def _bad_npz(d: Path) -> Path:
    p = d / "bad.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    return p


CASES = {
    "non-utf8": (_non_utf8, "line 2 is not UTF-8"),
    "long-csv-field": (_long_csv_field, "cannot be read as CSV"),
    "bad-jsonl": (_bad_jsonl, "line 2 is not valid JSON"),
    "jsonl-not-object": (_jsonl_not_object, "line 2 is a JSON list"),
    "0-d-npy": (_zero_d_npy, "0-d array"),
    "corrupt-npy": (_corrupt_npy, "not a valid .npy file"),
    "zero-byte-npy": (_empty_npy, "the file is empty"),
    "pickled-npy": (_pickled_npy, "never unpickles"),
    "string-npy": (_string_npy, "is not numeric"),
    "corrupt-npz": (_bad_npz, "not a valid .npz archive"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loader_names_the_file(tmp_path, case):
    make, message = CASES[case]
    p = make(tmp_path)
    with pytest.raises(DistacError, match=message) as e:
        load_inputs(p, need_labels=False)
    assert str(p) in str(e.value)


def _setup_models(d: Path) -> None:
    z = zoo()
    for k in ("base", "long", "short_a"):
        save_file(z[k], str(d / f"{k}.safetensors"))


def _run(args: list[str], capsys) -> tuple[int, str]:
    from distac.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0), capsys.readouterr().err


COMMON = ["--arch", "distac_tiny:make_mlp"]


def _diagnose(data: str, extra: list[str] = ()) -> list[str]:
    models = ["--model", "long=long.safetensors", "--model", "a=short_a.safetensors"]
    return ["diagnose", "--base", "base.safetensors", *COMMON, *models, "--data", f"long={data}", *extra, "--out", "d"]


def _calibrate(data: str, extra: list[str] = ()) -> list[str]:
    return ["calibrate", "--merged", "base.safetensors", *COMMON, "--data", f"t={data}", *extra]


@pytest.mark.parametrize("command", [_diagnose, _calibrate])
@pytest.mark.parametrize("case", list(CASES))
def test_commands_stop_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    _setup_models(tmp_path)
    make, message = CASES[case]
    p = make(tmp_path)
    code, err = _run(command(p.name), capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("distac: error:") and message in err and p.name in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "temperatures.json").exists()


# ------------------------------------------------------------------------------------------------
# labels: never truncated, always in range
# ------------------------------------------------------------------------------------------------


def test_float_labels_are_refused_with_their_row(tmp_path):
    np.save(tmp_path / "y.npy", np.array([0.0, 1.0, 1.9, 2.0]))
    with pytest.raises(DistacError, match=r"y.npy': row 2 holds .*1.9.*integer class ids"):
        load_labels(tmp_path / "y.npy")
    (tmp_path / "y.txt").write_text("0\n\n1\n2.5\n")
    with pytest.raises(DistacError, match=r"y.txt': line 4 holds '2.5'"):
        load_labels(tmp_path / "y.txt")
    (tmp_path / "d.csv").write_text("text,label\na,0\nb,1.5\n")
    with pytest.raises(DistacError, match=r"d.csv': line 3 holds '1.5'"):
        load_inputs(tmp_path / "d.csv", need_labels=True)
    np.save(tmp_path / "ok.npy", np.array([0.0, 1.0, 2.0]))  # whole floats are class ids
    assert load_labels(tmp_path / "ok.npy").tolist() == [0, 1, 2]
    np.save(tmp_path / "nan.npy", np.array([0.0, np.nan]))
    with pytest.raises(DistacError, match="row 1 holds"):
        load_labels(tmp_path / "nan.npy")


def test_float_and_out_of_range_labels_through_calibrate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    _setup_models(tmp_path)
    _, _, xte, yte = digits()
    np.save(tmp_path / "x.npy", xte.numpy())
    y = yte.numpy().astype(np.float64)
    y[5] = 1.9
    np.save(tmp_path / "yf.npy", y)
    code, err = _run(_calibrate("x.npy", ["--labels", "t=yf.npy"]), capsys)
    assert code == 2 and "yf.npy': row 5 holds" in err, err
    y = yte.numpy().copy()
    y[7] = 10  # the head has 10 classes: 0..9
    np.save(tmp_path / "y10.npy", y)
    code, err = _run(_calibrate("x.npy", ["--labels", "t=y10.npy"]), capsys)
    assert code == 2 and "label 10 at row 7 is out of range for a 10-class model" in err, err
    assert not (tmp_path / "temperatures.json").exists()

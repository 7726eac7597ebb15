"""Fuzzed merge configs through `distac merge`: exit 0 with an output, or one line, exit 2 and no output."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from conftest import finetuned, tiny_state, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distac.cli import main

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
PARAMS = ["scale", "density", "weights", "weight", "k", "t", "merge_fn", "seed", "scope", "fisher"]
#: mergekit's spellings, which switch a config to mergekit's reading (and its filter lists)
PARAMS += ["lambda", "normalize", "rescale", "int8_mask", "filter", "value", "gamma"]
_counter = itertools.count()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny_state(0)
    paths = [str(write_checkpoint(base, root / "base.safetensors"))]
    paths += [str(write_checkpoint(finetuned(base, i), root / f"m{i}.safetensors")) for i in range(2)]
    return root, paths


def _scalars(paths: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from(["ties", "task_arithmetic", "slerp", "float16", "bf16", "classifier.*", "re:(", "re:.*"]),
        st.sampled_from(paths),
    )


def _values(paths: list[str]) -> st.SearchStrategy:
    return st.recursive(
        _scalars(paths),
        lambda c: (
            st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4) | st.sampled_from(PARAMS), c, max_size=3)
        ),
        max_leaves=6,
    )


def _configs(paths: list[str]) -> st.SearchStrategy:
    base, models = paths[0], paths[1:]
    values = _values(paths)
    model = st.one_of(
        st.sampled_from(models),
        st.fixed_dictionaries(
            {"model": st.sampled_from(models) | values},
            optional={"parameters": st.dictionaries(st.sampled_from(PARAMS), values, max_size=2), "name": values},
        ),
        values,
    )
    return st.fixed_dictionaries(
        {
            "merge_method": st.sampled_from(
                ["task_arithmetic", "ties", "average", "slerp", "fisher", "linear", "dare_ties", "model_stock"]
            )
            | values,
            "base_model": st.just(base) | values | st.none(),
            "models": st.lists(model, max_size=3) | values,
        },
        optional={
            "parameters": st.dictionaries(st.sampled_from(PARAMS), values, max_size=3) | values,
            "dtype": values,
            "out_dtype": st.sampled_from(["float16", "bfloat16"]) | values,
            "heads": values,
            "allow_nonfinite": values,
            "unknown": values,
        },
    )


def _run(root: Path, text: bytes, capsys) -> None:
    case = root / f"case{next(_counter)}"
    case.mkdir()
    (case / "c.yml").write_bytes(text)
    out = case / "out"
    try:
        main(["merge", str(case / "c.yml"), "--out", str(out), "-q"])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 0:
        assert out.is_dir() and (out / "distac_config.yml").exists()
    else:
        assert err.startswith("distac: error: ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and [p.name for p in case.iterdir()] == ["c.yml"]


@st.composite
def _yaml_texts(draw, paths: list[str]) -> bytes:
    return yaml.safe_dump(draw(_configs(paths)), sort_keys=False, allow_unicode=True).encode()


def test_fuzzed_configs_never_give_a_traceback(checkpoints, capsys):
    root, paths = checkpoints

    @SETTINGS
    @given(_yaml_texts(paths))
    def check(text: bytes) -> None:
        _run(root, text, capsys)

    check()


def test_fuzzed_yaml_bytes_never_give_a_traceback(checkpoints, capsys):
    root, paths = checkpoints
    valid = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": paths[0], "models": paths[1:]}).encode()

    @SETTINGS
    @given(
        st.binary(max_size=200)
        | st.builds(lambda i, b: valid[:i] + b + valid[i:], st.integers(0, len(valid)), st.binary(max_size=8))
    )
    def check(text: bytes) -> None:
        _run(root, text, capsys)

    check()


def _mergekit_settings(paths: list[str]) -> st.SearchStrategy:
    """mergekit's parameter values: scalars, layer gradients, filter lists (and near misses of each)."""
    num = st.floats(-0.5, 1.5, allow_nan=False) | st.integers(-1, 2)
    gradient = st.lists(num, min_size=0, max_size=4)
    cond = st.fixed_dictionaries(
        {"value": num | gradient | _scalars(paths)},
        optional={"filter": st.sampled_from(["mlp", "attn", "*", "embed", "layers.0"]) | _scalars(paths)},
    )
    return num | st.booleans() | gradient | st.lists(cond, max_size=3) | _scalars(paths)


def _mergekit_configs(paths: list[str]) -> st.SearchStrategy:
    base, models = paths[0], paths[1:]
    keys = st.sampled_from(["weight", "density", "t", "lambda", "normalize", "rescale", "int8_mask", "gamma"])
    settings = st.dictionaries(keys, _mergekit_settings(paths), max_size=3)
    model = st.fixed_dictionaries({"model": st.sampled_from(paths)}, optional={"parameters": settings})
    return st.fixed_dictionaries(
        {
            "merge_method": st.sampled_from(
                ["linear", "ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs", "slerp", "model_stock"]
            ),
            "models": st.lists(model, min_size=1, max_size=3),
        },
        optional={
            "base_model": st.sampled_from([base, *models]),
            "parameters": settings,
            "dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
        },
    )


def test_fuzzed_mergekit_configs_never_give_a_traceback(checkpoints, capsys):
    root, paths = checkpoints

    @SETTINGS
    @given(_mergekit_configs(paths))
    def check(cfg: dict) -> None:
        _run(root, yaml.safe_dump(cfg, sort_keys=False).encode(), capsys)

    check()

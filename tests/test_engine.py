"""The streaming engine: streamed merges equal in-memory ones exactly, with chunking and prefetch."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import finetuned, tiny_state, write_checkpoint
from safetensors.torch import load_file

import distac
from distac import METHODS, DistacError, merge_checkpoints, open_checkpoint
from distac.merging.engine import run_merge
from distac.merging.pieces import Work, split_rows
from distac.merging.pieces import stream as _stream
from distac.nn.models import default_device
from distac.tensors import DictSource

N_MODELS = 2  # every registered method accepts two models (SLERP needs exactly two), but passthrough (one)

#: valid, non-default parameters per method, so that the comparison exercises them. A method not
#: listed runs with its defaults (plus any statistics it needs); none is skipped.
PARAMS: dict[str, dict] = {
    "average": {"weights": [0.3, 0.7]},
    "task_arithmetic": {"scale": 0.4, "weights": [1.0, -0.5]},
    "ties": {"density": 0.3, "scope": "global", "scale": 0.8},
    "dare_linear": {"density": 0.6, "seed": 3},
    "dare_ties": {"density": 0.7, "trim_density": 0.4, "seed": 1},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "consensus_ta": {"k": 1, "tall_lambda": 0.5},
    "consensus_ties": {"k": 2, "density": 0.4},
    "slerp": {"t": 0.3},
}
#: extra cases beyond one per method
EXTRA = [
    ("ties", {"density": 0.3, "scope": "tensor", "merge_fn": "sum"}),
    ("ties", {"density": [0.2, 1.0], "scope": "tensor"}),  # one model keeps everything
    ("ties", {"density": 1.0, "scope": "tensor"}),  # no threshold passes at all
    ("ties", {"density": [0.2, 0.5], "weights": [0.6, 1.0]}),
    ("dare_ties", {"density": 0.7, "trim_density": 0.4, "seed": 1, "scope": "tensor"}),
    ("consensus_ties", {"k": 1, "density": 0.4, "scope": "tensor"}),
]


def _stats_for(method: str, base: dict, models: list[dict]) -> dict:
    """Random sidecars for the statistics a method declares (Fisher diagonals, Grams of 2-D weights)."""
    wanted = {s.rstrip("?") for s in METHODS[method].stats}
    g = torch.Generator().manual_seed(7)
    out: dict = {}
    if "fisher" in wanted:
        out["fishers"] = [
            {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items() if v.is_floating_point()}
            for _ in models
        ]
    if "base_fisher" in wanted:
        out["base_fisher"] = {
            k: torch.rand(v.shape, generator=g) + 0.1 for k, v in base.items() if v.is_floating_point()
        }
    if "gram" in wanted:

        def gram(d: int) -> torch.Tensor:
            x = torch.randn(2 * d, d, generator=g)
            return x.T @ x / (2 * d)

        out["grams"] = [{k: gram(v.shape[1]) for k, v in base.items() if v.dim() == 2} for _ in models]
    return out


def _cases():
    for name in METHODS:
        yield pytest.param(name, PARAMS.get(name, {}), id=name)
    for name, params in EXTRA:
        yield pytest.param(name, params, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items())}")


def _read_out(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(("method", "params"), list(_cases()))
def test_streamed_equals_in_memory_exactly(tmp_path, method, params):
    """Sharded inputs, a 256-byte chunk budget (row chunks of 1-2 rows), tiny shards, prefetch on."""
    base = tiny_state(0)
    models = [finetuned(base, i) for i in range(min(N_MODELS, METHODS[method].max_models or N_MODELS))]
    stats = _stats_for(method, base, models)
    want = distac.merge(base, models, method, device="cpu", **stats, **params)

    bpath = write_checkpoint(base, tmp_path / "base", form="sharded")
    cfg_models = []
    for i, m in enumerate(models):
        entry: dict = {"model": str(write_checkpoint(m, tmp_path / f"m{i}", form="sharded"))}
        for key, sub in (("fisher", "fishers"), ("gram", "grams")):
            if sub in stats:
                entry.setdefault("parameters", {})[key] = str(
                    write_checkpoint(stats[sub][i], tmp_path / f"{key}{i}.safetensors")
                )
        cfg_models.append(entry)
    base_entry: dict = {"model": str(bpath)}
    if "base_fisher" in stats:
        base_entry["parameters"] = {"fisher": str(write_checkpoint(stats["base_fisher"], tmp_path / "bf.safetensors"))}
    cfg = {"merge_method": method, "base_model": base_entry, "models": cfg_models, "parameters": params}
    out = merge_checkpoints(cfg, tmp_path / "out", device="cpu", chunk_bytes=256, max_shard_bytes=600, quiet=True)
    got = _read_out(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert list(got) != [] and set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{method}: tensor {k} differs"


def test_chunking_happens_only_for_chunkable_methods_and_keeps_offsets():
    base = tiny_state(0)
    models = [finetuned(base, i) for i in range(2)]
    seen: dict[str, list] = {"task_arithmetic": [], "slerp": []}
    for method in seen:
        run_merge(
            DictSource(base, "base"),
            [DictSource(m) for m in models],
            method,
            {},
            lambda n, t, method=method: seen[method].append((n, tuple(t.shape))),
            chunk_bytes=256,
        )
    emb = [s for n, s in seen["task_arithmetic"] if n == "embed.weight"]
    assert len(emb) > 1 and sum(s[0] for s in emb) == base["embed.weight"].shape[0]
    assert [s for n, s in seen["slerp"] if n == "embed.weight"] == [tuple(base["embed.weight"].shape)]


def test_per_tensor_ties_is_chunked_with_two_threshold_passes_per_split_tensor():
    """scope=tensor: a split tensor's pieces are read three times (two radix passes, then the merge),
    a whole one once; only merge pieces reach the sink, and the result is the in-memory one."""
    base = tiny_state(0)
    models = [finetuned(base, i) for i in range(2)]
    params = {"density": 0.3, "scope": "tensor"}
    want = distac.merge(base, models, "ties", device="cpu", **params)
    reads: dict[str, int] = {}

    class Counting(DictSource):
        def get_rows(self, name, start, stop):
            reads[name] = reads.get(name, 0) + 1
            return super().get_rows(name, start, stop)

    got: dict[str, list] = {}
    run_merge(
        Counting(base, "base"),
        [DictSource(m) for m in models],
        "ties",
        params,
        lambda n, t: got.setdefault(n, []).append(t),
        chunk_bytes=256,
        prefetch=True,
    )
    assert len(got["embed.weight"]) > 1
    pieces = len(got["embed.weight"])
    assert reads["embed.weight"] == 3 * pieces
    for k, v in want.items():
        assert torch.equal(torch.cat(got[k]).to(v.dtype) if len(got[k]) > 1 else got[k][0].to(v.dtype), v), k


def test_split_rows():
    assert split_rows((10, 4), 3, None) is None
    assert split_rows((10, 4), 3, 10**6) is None
    assert split_rows((), 3, 1) is None
    assert split_rows((10, 4), 3, 3 * 4 * 4 * 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split_rows((5, 4), 3, 1) == [(i, i + 1) for i in range(5)]  # one row is the smallest piece


def test_prefetch_overlaps_but_holds_at_most_two_pieces():
    alive = []
    lock = threading.Lock()
    max_alive = [0]

    def load(w):
        with lock:
            alive.append(w)
            max_alive[0] = max(max_alive[0], len(alive))
        return w

    consumer_threads = set()
    for w in _stream((Work(str(i)) for i in range(8)), load, prefetch=True):
        consumer_threads.add(threading.get_ident())
        time.sleep(0.01)  # the reader runs ahead while we "merge"
        with lock:
            alive.remove(w)
    assert max_alive[0] == 2


def test_reader_error_reaches_the_caller():
    def load(w):
        if w.name == "3":
            raise DistacError("bad tensor 3")
        return w

    with pytest.raises(DistacError, match="bad tensor 3"):
        for _ in _stream((Work(str(i)) for i in range(8)), load, prefetch=True):
            pass


def test_nan_in_input_names_tensor_and_shard(tmp_path):
    base = tiny_state(0)
    bad = finetuned(base, 1)
    bad["layers.0.mlp.up.weight"][5, 1] = float("nan")
    bpath = write_checkpoint(base, tmp_path / "base", form="sharded")
    mpath = write_checkpoint(bad, tmp_path / "bad", form="sharded")
    src = open_checkpoint(mpath)
    shard = src.file_of("layers.0.mlp.up.weight")
    with pytest.raises(DistacError) as e:
        run_merge(
            open_checkpoint(bpath), [src], "task_arithmetic", {}, lambda n, t: None, chunk_bytes=64, prefetch=True
        )
    msg = str(e.value)
    assert str(shard) in msg and "layers.0.mlp.up.weight" in msg and "NaN or Inf" in msg and "rows" in msg


def _bf16_case(tmp_path, method: str, params: dict):
    base = tiny_state(0, dtype=torch.bfloat16)
    models = [finetuned(base, i) for i in range(3)]
    want = distac.merge(base, models, method, device="cpu", **params)
    cfg = {
        "merge_method": method,
        "base_model": str(write_checkpoint(base, tmp_path / "b.safetensors")),
        "models": [str(write_checkpoint(m, tmp_path / f"m{i}.safetensors")) for i, m in enumerate(models)],
        "parameters": params,
    }
    got = _read_out(merge_checkpoints(cfg, tmp_path / "out", chunk_bytes=200, quiet=True))
    return {k: got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items()}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"scale": 0.3}),
        ("dare_linear", {"density": 0.5}),
        # bf16 task vectors cancel exactly often enough to exercise TIES's zero-sign rule across row chunks
        ("ties", {"density": 0.4}),
    ],
)
def test_bf16_inputs_compute_in_fp32_and_write_base_dtype(tmp_path, method, params):
    same = _bf16_case(tmp_path, method, params)
    assert all(same.values()), [k for k, ok in same.items() if not ok]


def test_out_dtype_casts_only_float_tensors(tmp_path):
    base = tiny_state(0)
    models = [finetuned(base, 1)]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(write_checkpoint(base, tmp_path / "b.safetensors")),
        "models": [str(write_checkpoint(models[0], tmp_path / "m.safetensors"))],
        "out_dtype": "bfloat16",
    }
    got = _read_out(merge_checkpoints(cfg, tmp_path / "out", quiet=True))
    want = distac.merge(base, models, "task_arithmetic", device="cpu")
    for k, v in want.items():
        w = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


def test_default_device_and_override():
    assert default_device("cpu") == torch.device("cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_progress_helpers_count_and_stay_silent_off_a_terminal(capsys):
    from distac.progress import Progress, track

    assert list(track(range(5), desc="x")) == [0, 1, 2, 3, 4]
    with Progress(total_bytes=100, total_items=2, desc="merge") as bar:
        bar.update(nbytes=60, items=1)
        bar.update(nbytes=40, items=1)
        assert bar.items == 2
    assert capsys.readouterr().err == ""  # pytest's stderr is not a TTY: no bar


def test_in_memory_result_never_aliases_the_inputs():
    base = tiny_state(0)
    models = [finetuned(base, 1)]
    out = distac.merge(base, models, "task_arithmetic", heads=["classifier.*"], device="cpu")
    for k, v in out.items():
        assert v.data_ptr() != base[k].data_ptr() and all(v.data_ptr() != m[k].data_ptr() for m in models), k
    before = {k: v.clone() for k, v in base.items()}
    for v in out.values():
        v.zero_()
    assert all(torch.equal(base[k], before[k]) for k in base)


def test_regmean_reads_each_gram_once_and_still_refuses_a_merge_without_grams():
    """RegMean has no pre-pass: the Grams are read only when their tensor is merged."""
    base = tiny_state(0)
    models = [finetuned(base, i) for i in range(2)]
    grams = _stats_for("regmean", base, models)["grams"]
    reads: dict[str, int] = {}

    class Counting(DictSource):
        def get(self, name):
            reads[name] = reads.get(name, 0) + 1
            return super().get(name)

    run_merge(
        DictSource(base, "base"),
        [DictSource(m) for m in models],
        "regmean",
        {},
        lambda n, t: None,
        stats={"gram": [Counting(g) for g in grams]},
    )
    assert reads and max(reads.values()) == len(models), reads  # each model's Gram once per tensor
    with pytest.raises(DistacError, match=r"'gram' statistics.*distac stats gram"):
        run_merge(DictSource(base, "base"), [DictSource(m) for m in models], "regmean", {}, lambda n, t: None)


def test_a_bug_in_a_method_keeps_its_own_exception():
    """Only DistacError is a user error; a ValueError raised inside a method is a bug and stays one."""
    from distac.methods import Method

    def broken(base, deltas, *, ctx):
        raise ValueError("index out of range inside the method")

    m = Method("broken", broken, summary="", paper="")
    base = tiny_state(0)
    with pytest.raises(ValueError, match="index out of range"):
        run_merge(DictSource(base, "base"), [DictSource(finetuned(base, 1))], m, {}, lambda n, t: None)


def test_non_float_buffers_come_from_the_base_whichever_model_has_them():
    # older transformers saved embeddings.position_ids, newer ones do not: such checkpoints must merge
    from conftest import finetuned, tiny_state

    base = tiny_state(0)
    a = finetuned(base, 1)
    del a["position_ids"]
    b = finetuned(base, 2)
    b["step"] = torch.tensor(7)
    out = distac.merge(base, [a, b], "task_arithmetic", scale=0.5)
    assert set(out) == set(base) and torch.equal(out["position_ids"], base["position_ids"])
    a["embed.weight2"] = a["embed.weight"].clone()  # a *float* tensor the base lacks is still an error
    with pytest.raises(DistacError, match="the base lacks"):
        distac.merge(base, [a, b], "task_arithmetic")

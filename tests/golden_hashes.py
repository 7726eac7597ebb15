"""SHA-256 of every merge method's output on a fixed set of checkpoints: refactors must not move a bit.

Run ``python tests/golden_hashes.py --write`` to record ``tests/golden_hashes.json`` (only when a
change of results is intended and explained in its commit), and ``python tests/golden_hashes.py``
to compare. ``tests/test_golden_hashes.py`` runs the comparison in the suite.

Each method runs twice on the same inputs: in memory (``distac.merge``) and streamed from
safetensors files with a 4 KiB piece budget, so row-chunking, prefetch and the exact pre-passes are
covered too. Both must give the recorded bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import distac

HERE = Path(__file__).parent
RECORD = HERE / "golden_hashes.json"

#: parameters that make every method do real work on the small inputs (defaults elsewhere)
PARAMS: dict[str, dict] = {
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.7, "trim_density": 0.4},
    "consensus_ties": {"density": 0.5},
    "slerp": {"t": 0.3},
    "gradient_matching": {"scale": 0.7},
    "fisher": {},
    "regmean": {"reduce_nondiag": 0.5},
    "ties_tensor": {"density": 0.3, "scope": "tensor"},
    "della": {"density": 0.5, "epsilon": 0.2, "weights": [1.0, 0.5, 2.0]},
    "della_linear": {"density": 0.6, "epsilon": 0.1},
    "nuslerp": {"weights": [0.3, 0.7]},
    "multislerp": {"weights": [0.2, 0.3, 0.5]},
}
ALIASES = {"ties_tensor": "ties"}
N_MODELS = {"slerp": 2, "nuslerp": 2, "passthrough": 1}  # methods that take a fixed number of models


def inputs(n: int = 3) -> tuple[dict, list[dict], list[dict], dict, list[dict]]:
    """(base, models, fishers, base_fisher, grams): fixed seeds, shapes like a tiny transformer."""
    g = torch.Generator().manual_seed(1234)

    def r(*shape: int, s: float = 1.0) -> torch.Tensor:
        return s * torch.randn(shape, generator=g)

    base = {
        "embed.weight": r(64, 16),
        "layers.0.attn.q.weight": r(16, 16),
        "layers.0.mlp.up.weight": r(48, 16),
        "layers.0.mlp.up.bias": r(48),
        "layers.0.norm.weight": 1 + 0.1 * r(16),
        "position_ids": torch.arange(8),
        "classifier.weight": r(4, 16),
    }
    models = [
        {k: v + r(*v.shape, s=0.05 * (i + 1)) if v.is_floating_point() else v.clone() for k, v in base.items()}
        for i in range(n)
    ]
    floats = [k for k, v in base.items() if v.is_floating_point()]
    fishers = [{k: r(*base[k].shape).square() * 10 for k in floats} for _ in range(n)]
    base_fisher = {k: r(*base[k].shape).square() for k in floats}
    grams = []
    for _ in range(n):
        x16, x48 = r(32, 16), r(32, 48)
        grams.append(
            {
                "layers.0.attn.q.weight": x16.T @ x16,
                "layers.0.mlp.up.weight": x16.T @ x16,
                "embed.weight": x16.T @ x16,
                "classifier.weight": x16.T @ x16,
                "unused": x48.T @ x48,
            }
        )
    for gm in grams:
        del gm["unused"]
    return base, models, fishers, base_fisher, grams


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stats_kwargs(method: str, fishers, base_fisher, grams) -> dict:
    stats = distac.get_method(method).stats
    kw: dict = {}
    if "fisher" in stats:
        kw["fishers"] = fishers
    if "base_fisher?" in stats:
        kw["base_fisher"] = base_fisher
    if "gram" in stats:
        kw["grams"] = grams
    return kw


def in_memory() -> dict[str, str]:
    base, models, fishers, base_fisher, grams = inputs()
    out = {}
    for key in [*distac.METHODS, "ties_tensor"]:
        method = ALIASES.get(key, key)
        kw = _stats_kwargs(method, fishers, base_fisher, grams)
        n = N_MODELS.get(method, len(models))
        kw = {k: v[:n] if isinstance(v, list) else v for k, v in kw.items()}
        out[key] = digest(
            distac.merge(base, models[:n], method, heads=["classifier.*"], device="cpu", **kw, **PARAMS.get(key, {}))
        )
    return out


def streamed(folder: Path) -> dict[str, str]:
    """The same merges through ``merge_checkpoints`` on files, with row-chunking forced."""
    from safetensors.torch import load_file

    base, models, fishers, base_fisher, grams = inputs()
    save_file(base, str(folder / "base.safetensors"))
    for i, m in enumerate(models):
        save_file(m, str(folder / f"m{i}.safetensors"))
        save_file(fishers[i], str(folder / f"m{i}.fisher.safetensors"))
        save_file(grams[i], str(folder / f"m{i}.gram.safetensors"))
    save_file(base_fisher, str(folder / "base.fisher.safetensors"))
    out = {}
    for key in [*distac.METHODS, "ties_tensor"]:
        method = ALIASES.get(key, key)
        stats = distac.get_method(method).stats
        entries = []
        for i in range(N_MODELS.get(method, len(models))):
            sidecars = {s: str(folder / f"m{i}.{s}.safetensors") for s in ("fisher", "gram") if s in stats}
            entries.append({"model": str(folder / f"m{i}.safetensors"), "parameters": sidecars})
        base_entry: dict = {"model": str(folder / "base.safetensors")}
        if "base_fisher?" in stats:
            base_entry["parameters"] = {"fisher": str(folder / "base.fisher.safetensors")}
        cfg = {
            "merge_method": method,
            "base_model": base_entry,
            "models": entries,
            "parameters": PARAMS.get(key, {}),
            "heads": ["classifier.*"],
        }
        dest = folder / f"out-{key}"
        distac.merge_checkpoints(cfg, dest, device="cpu", chunk_bytes=4096, quiet=True)
        files = sorted(dest.glob("*.safetensors"))
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        out[key] = digest(state)
    return out


def compute() -> dict[str, dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"in_memory": in_memory(), "streamed": streamed(Path(tmp))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="record the current hashes")
    args = ap.parse_args()
    now = compute()
    if args.write:
        RECORD.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")
        return 0
    want = json.loads(RECORD.read_text())
    bad = [(kind, k) for kind in want for k in want[kind] if now[kind].get(k) != want[kind][k]]
    for kind, k in bad:
        print(f"changed: {kind} {k}")
    print(f"{len(bad)} changed of {sum(len(v) for v in want.values())}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

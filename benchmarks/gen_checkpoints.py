"""Synthetic decoder checkpoints for the merge benchmarks: one base and N fine-tunes on disk.

The layout is a Llama-style decoder (``LlamaForCausalLM`` tensor names and ``config.json``), so
distac, mergekit (which maps tensors through its architecture table) and FusionBench read the same
directories. Each checkpoint is a Hugging Face directory with sharded safetensors and an index json.

Values are shaped like real checkpoints where it matters for the benchmarks:

* base matrices ~ N(0, 0.02²), norms ~ 1 + N(0, 0.02²);
* fine-tune deltas are low rank plus noise, ``Δ = U diag(s) Vᵀ + ε`` with a decaying spectrum
  (``s_j ∝ 1/(1+j)``, rank 32) and ``ε ~ N(0, (0.1·σ)²)``: real task vectors have a few large
  singular values (TSV-M, Iso-C papers), which matters for the randomized-SVD error study; an
  i.i.d. Gaussian delta would have a flat spectrum and make every low-rank method look bad.

Generation streams: one shard of base tensors in memory at a time, and each fine-tune's shard is
written before the next one is built, so memory stays ≈ 3 shards whatever N is. Every tensor has
its own generator seeded from (seed, model index, tensor name), so the files do not depend on the
shard size or generation order.

Example::

    python benchmarks/gen_checkpoints.py --out /tmp/distac-bench/bf16-1g --params 0.5e9 --n 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Arch:
    """Sizes of a Llama-style decoder."""

    vocab: int = 32000
    hidden: int = 1536
    intermediate: int = 4096
    layers: int = 14
    heads: int = 12
    kv_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order HF writes them: embedding, layers, final norm, lm_head."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for l in range(self.layers):
            p = f"model.layers.{l}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def hf_config(self, dtype: str) -> dict:
        """A complete ``LlamaConfig`` dict: mergekit and transformers both parse it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def arch_for_params(target: float) -> Arch:
    """Scale the number of layers of the default widths to get close to ``target`` parameters."""
    base = Arch(layers=0)
    per_layer = Arch(layers=1).numel() - base.numel()
    layers = max(1, round((target - base.numel()) / per_layer))
    if target < base.numel() + per_layer:
        # Small test sizes: shrink the widths instead (keeps every tensor kind present).
        f = max(target / (base.numel() + per_layer), 1e-3) ** 0.5
        return Arch(
            vocab=max(256, int(32000 * f) // 64 * 64),
            hidden=max(64, int(1536 * f) // 64 * 64),
            intermediate=max(128, int(4096 * f) // 64 * 64),
            layers=2,
            heads=4,
            kv_heads=2,
        )
    return Arch(layers=layers)


def _gen(seed: int, model: int, name: str) -> torch.Generator:
    """Per-tensor generator from a stable hash, so files do not depend on order or shard size."""
    h = hashlib.blake2b(f"{seed}/{model}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen(seed, 0, name)
    if len(shape) == 1:  # RMSNorm weights sit around 1
        return 1 + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def delta_tensor(name: str, shape: tuple[int, ...], seed: int, model: int, scale: float) -> torch.Tensor:
    """Low-rank-plus-noise task vector of relative size ``scale`` (see the module docstring)."""
    g = _gen(seed, model, name)
    if len(shape) == 1:
        return scale * 0.02 * torch.randn(shape, generator=g)
    m, n = shape
    r = min(32, m, n)
    s = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32))
    u = torch.randn(m, r, generator=g) / math.sqrt(m)
    v = torch.randn(r, n, generator=g) / math.sqrt(n)
    low = (u * s) @ v
    # normalise the low-rank part to RMS 1, then add 10% i.i.d. noise
    low *= math.sqrt(m * n) / float(low.norm())
    low += 0.1 * torch.randn(m, n, generator=g)
    return (scale * 0.02) * low


def _shards(arch: Arch, shard_bytes: int, itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in arch.tensors():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def generate(
    out: Path,
    *,
    params: float,
    n: int,
    dtype: str,
    seed: int = 0,
    delta_scale: float = 0.1,
    shard_bytes: int = 512 << 20,
    fisher: int = 0,
) -> dict:
    """Write ``out/base``, ``out/ft1..ftN`` (and ``out/fisher1..fisherK`` fp32 sidecars, K=fisher).

    Returns a manifest (also written to ``out/manifest.json``). Refuses to overwrite ``out``.
    """
    if out.exists():
        raise SystemExit(f"{out} exists; delete it or choose another --out")
    arch = arch_for_params(params)
    dt = DTYPES[dtype]
    itemsize = torch.empty(0, dtype=dt).element_size()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = {"base": 0, **{f"ft{i}": i for i in range(1, n + 1)}}
    sidecars = {f"fisher{i}": i for i in range(1, fisher + 1)}
    for d in [*dirs, *sidecars]:
        (tmp / d).mkdir(parents=True)
    t0 = time.perf_counter()
    shards = _shards(arch, shard_bytes, itemsize)
    weight_map: dict[str, str] = {}
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        base = {k: base_tensor(k, s, seed) for k, s in shard}
        _write_shard({k: v.to(dt) for k, v in base.items()}, tmp / "base" / fname)
        for d, i in dirs.items():
            if i == 0:
                continue
            ft = {k: (base[k] + delta_tensor(k, s, seed, i, delta_scale)).to(dt) for k, s in shard}
            _write_shard(ft, tmp / d / fname)
            del ft
        for d, i in sidecars.items():
            # Positive diagonal-Fisher-like values (squared gradients): |N(0,1)|² · 1e-4 + 1e-8.
            fi = {
                k: torch.randn(s, generator=_gen(seed, 1000 + i, k)).square_().mul_(1e-4).add_(1e-8) for k, s in shard
            }
            _write_shard(fi, tmp / d / fname)
            del fi
        weight_map.update({k: fname for k, _ in shard})
        del base
    total = arch.numel() * itemsize
    for d in dirs:
        (tmp / d / "config.json").write_text(json.dumps(arch.hf_config(dtype), indent=2))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for d in sidecars:
        index = {"metadata": {"total_size": arch.numel() * 4}, "weight_map": weight_map}
        (tmp / d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    largest = max(math.prod(s) for _, s in arch.tensors())
    manifest = {
        "arch": arch.__dict__,
        "params": arch.numel(),
        "dtype": dtype,
        "n": n,
        "seed": seed,
        "delta_scale": delta_scale,
        "bytes_per_checkpoint": total,
        "largest_tensor_numel": largest,
        "shards": len(shards),
        "fisher_sidecars": fisher,
        "gen_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out)
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="new directory (e.g. under /tmp/distac-bench)")
    ap.add_argument("--params", type=float, default=0.5e9, help="approximate parameter count (default 0.5e9)")
    ap.add_argument("--n", type=int, default=2, help="number of fine-tuned models (default 2)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta-scale", type=float, default=0.1, help="task-vector RMS relative to the base (0.1)")
    ap.add_argument("--shard-mb", type=int, default=512)
    ap.add_argument("--fisher", type=int, default=0, help="write fp32 Fisher sidecars for the first K models")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    m = generate(
        a.out,
        params=a.params,
        n=a.n,
        dtype=a.dtype,
        seed=a.seed,
        delta_scale=a.delta_scale,
        shard_bytes=a.shard_mb << 20,
        fisher=a.fisher,
    )
    print(json.dumps(m))


if __name__ == "__main__":
    main()

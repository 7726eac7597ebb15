"""A merge written as a LoRA adapter: the truncated SVD of each merged ΔW, as a PEFT adapter folder.

When the models are LoRA adapters, the merged model differs from the base only in the adapters'
target modules (and the whole tensors they save: ``modules_to_save`` heads, trained biases). This
sink of the merge engine takes each merged tensor, and for a target module factors
ΔW = θ_merged - θ_0 (fp32) at rank R: ΔW ≈ B A with B = U_R √S_R, A = √S_R V_Rᵀ, the best rank-R
approximation in Frobenius norm (Eckart-Young). The folder holds ``adapter_config.json``
(r = lora_alpha = R, so peft's scaling is 1) and ``adapter_model.safetensors``, which
``PeftModel.from_pretrained(base, folder)`` loads. The relative error ‖ΔW - B A‖_F / ‖ΔW‖_F of
each module (B and A as written) goes into the model card; ``max_error`` stops the merge naming
the worst module.

Why not merge the factors themselves: Σ_i B_i A_i ≠ (Σ_i B_i)(Σ_i A_i), whose cross terms B_i A_j
are updates no model made, and TIES/DARE masks on A and B are not masks on ΔW. distac merges ΔW
exactly and factors only the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DistacError
from ..io.lora import ADAPTER_CONFIG, AdapterSource, LoraModule
from ..tensors import TensorSource

__all__ = ["LoraWriter", "low_rank", "relative_error"]

#: full SVD up to this many rows/columns; above it, randomized SVD (torch.svd_lowrank)
FULL_SVD_MAX = 2048
_PREFIX = "base_model.model."


def low_rank(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors (B, A) of ``m`` (fp32): ``B @ A`` ≈ ``m``, singular values split evenly.

    Exact SVD for small matrices; a randomized SVD (6 power iterations, fixed seed, so a merge is
    reproducible) when both sides exceed ``FULL_SVD_MAX`` and the rank is small against them.

    Example:
        >>> b, a = low_rank(torch.ones(4, 3), 1)
        >>> torch.allclose(b @ a, torch.ones(4, 3))
        True
    """
    k = min(rank, *m.shape)
    if min(m.shape) > FULL_SVD_MAX and 4 * k < min(m.shape):
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(m, q=min(k + 10, *m.shape), niter=6)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def relative_error(m: Tensor, b: Tensor, a: Tensor) -> float:
    """‖m - b a‖_F / ‖m‖_F in fp32 (0 when m is zero).

    Example:
        >>> relative_error(torch.eye(2), torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0.0]]))
        0.7071067690849304
    """
    norm = torch.linalg.vector_norm(m.float())
    if norm == 0:
        return 0.0
    return float(torch.linalg.vector_norm(m.float() - b.float() @ a.float()) / norm)


@dataclass
class _Target:
    module: LoraModule  # from one of the input adapters (kind, fan_in_fan_out)
    name: str  # the module's name in the adapters' naming


@dataclass
class LoraWriter:
    """A sink for the merge engine that writes a PEFT LoRA adapter of rank ``rank`` into ``folder``.

    ``write(name, piece)`` takes merged tensors whole or as consecutive row ranges; ``close()``
    writes the files and returns the per-module relative errors; ``abort()`` drops everything.
    """

    folder: Path
    base: TensorSource
    adapters: Sequence[AdapterSource]
    rank: int
    out_dtype: torch.dtype | None = None
    max_error: float | None = None
    errors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise DistacError(
                "LoRA output (lora_rank, --lora-rank) needs LoRA adapters among the models: it writes their target "
                "modules; merge full models into a full checkpoint"
            )
        if self.rank < 1:
            raise DistacError(f"lora_rank must be a positive integer, got {self.rank}")
        self.targets: dict[str, _Target] = {}
        self.whole: dict[str, str] = {}  # base tensor name -> name in the adapters' naming
        self.saved_modules: list[str] = []
        for src in self.adapters:
            for base_name, m in src.modules.items():
                if len(self.base.shape(base_name)) != 2:
                    raise DistacError(f"{src.adapter.path}: LoRA output supports Linear, Conv1D and Embedding modules")
                self.targets.setdefault(base_name, _Target(m, m.name))
            for base_name in [*src.replaced, *src.lora_biases]:
                self.whole.setdefault(base_name, src.adapter_names[base_name])
            self.saved_modules += [s for s in src.adapter.modules_to_save if s not in self.saved_modules]
        for name in self.targets:
            self.whole.pop(name, None)  # a saved base_layer weight: ΔW is what the adapter carries
        fifo = {t.module.fan_in_fan_out for t in self.targets.values() if t.module.kind == "layer"}
        if len(fifo) > 1:
            raise DistacError("LoRA output: the adapters disagree on fan_in_fan_out; write a full checkpoint")
        self.fan_in_fan_out = bool(fifo and fifo.pop())
        self._rows: dict[str, list[Tensor]] = {}
        self._tensors: dict[str, Tensor] = {}
        self._ranks: dict[str, int] = {}
        self._offsets: dict[str, int] = {}  # next row of a row-chunked tensor no adapter touches

    def write(self, name: str, piece: Tensor) -> None:
        """Take one merged piece (rows of ``name`` in order); act when the tensor is complete."""
        if name not in self.targets and name not in self.whole:
            self._check_unchanged(name, piece)
            return
        parts = self._rows.setdefault(name, [])
        parts.append(piece.detach().float())
        shape = self.base.shape(name)
        if (sum(p.shape[0] for p in parts) if shape else 1) < (shape[0] if shape else 1):
            return
        merged = torch.cat(parts) if len(parts) > 1 else parts[0]
        del self._rows[name]
        if name in self.whole:
            dtype = self.out_dtype or self.base.dtype(name)
            self._tensors[_PREFIX + self._whole_key(name)] = merged.to("cpu", dtype).contiguous()
            return
        self._factor(name, merged)

    def _check_unchanged(self, name: str, piece: Tensor) -> None:
        # a tensor no adapter touches must come back as the base's: an adapter cannot carry it
        shape = self.base.shape(name)
        if piece.ndim and shape and tuple(piece.shape) != tuple(shape):  # one row range of it
            start = self._offsets.pop(name, 0)
            if start + piece.shape[0] < shape[0]:
                self._offsets[name] = start + piece.shape[0]
            base = self.base.get_rows(name, start, start + piece.shape[0])
        else:
            base = self.base.get(name)
        if not torch.equal(piece.to("cpu", base.dtype), base):
            raise DistacError(
                f"LoRA output: the merge changed tensor '{name}', which no adapter trains, so an adapter cannot "
                "hold it (the method moves tensors whose task vectors are all zero); write a full checkpoint"
            )

    def _whole_key(self, name: str) -> str:
        adapter_name = self.whole[name]
        module = adapter_name.rsplit(".", 1)[0]
        wrapped = any(t.name == module for t in self.targets.values())
        return f"{module}.base_layer.{adapter_name.rsplit('.', 1)[1]}" if wrapped else adapter_name

    def _factor(self, name: str, merged: Tensor) -> None:
        t = self.targets[name]
        dw = merged - self.base.get(name).to(merged.device, torch.float32)
        # peft's layouts: Linear ΔW = B A; Conv1D (fan_in_fan_out) and Embedding ΔW = (B A)ᵀ
        m = dw.T if t.module.kind == "embedding" or self.fan_in_fan_out else dw
        b, a = low_rank(m, self.rank)
        dtype = self.out_dtype or torch.float32
        b, a = b.to("cpu", dtype).contiguous(), a.to("cpu", dtype).contiguous()
        self.errors[t.name] = relative_error(m.cpu(), b, a)
        self._ranks[t.name] = a.shape[0]
        key = _PREFIX + t.name
        if t.module.kind == "embedding":
            self._tensors[f"{key}.lora_embedding_A"], self._tensors[f"{key}.lora_embedding_B"] = a, b
        else:
            self._tensors[f"{key}.lora_A.weight"], self._tensors[f"{key}.lora_B.weight"] = a, b

    def close(self) -> dict[str, float]:
        """Check ``max_error``, write ``adapter_config.json`` and ``adapter_model.safetensors``; return the errors."""
        if self._rows:
            raise DistacError(f"LoRA output: tensors {sorted(self._rows)[:3]} ended early (a merge engine error)")
        if self.max_error is not None and self.errors:
            worst = max(self.errors, key=lambda k: self.errors[k])
            if self.errors[worst] > self.max_error:
                raise DistacError(
                    f"LoRA output: module '{worst}' has relative error {self.errors[worst]:.4g} > max_error "
                    f"{self.max_error:g} at rank {self.rank}; raise the rank or write a full checkpoint"
                )
        save_file(self._tensors, str(self.folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(self._config(), indent=2, sort_keys=True) + "\n")
        return dict(self.errors)

    def abort(self) -> None:
        self._rows.clear()
        self._tensors.clear()

    def _config(self) -> dict[str, object]:
        first = self.adapters[0].adapter.config
        lower = {n: k for n, k in self._ranks.items() if k != self.rank}
        has_bias = any(n.endswith(".bias") for n in self.whole.values())
        return {
            "peft_type": "LORA",
            "task_type": first.get("task_type"),
            "base_model_name_or_path": first.get("base_model_name_or_path"),
            "r": self.rank,
            "lora_alpha": self.rank,  # scaling α / r = 1: the factors hold ΔW as is
            "rank_pattern": {_exact(n): k for n, k in lower.items()},
            "alpha_pattern": {_exact(n): k for n, k in lower.items()},
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": self.fan_in_fan_out,
            "target_modules": sorted(t.name for t in self.targets.values()),
            "modules_to_save": self.saved_modules or None,
            "bias": "all" if has_bias else "none",
            "lora_dropout": 0.0,
            "inference_mode": True,
            "init_lora_weights": True,
        }

    def card(self) -> str:
        """The model card's section: the rank and each module's relative Frobenius error."""
        errs = sorted(self.errors.items(), key=lambda kv: -kv[1])
        mean = sum(self.errors.values()) / max(len(self.errors), 1)
        lines = [
            "## LoRA output",
            "",
            f"Written as a PEFT LoRA adapter of rank {self.rank} (lora_alpha = r: scaling 1): each target module's",
            "merged ΔW = θ_merged - θ_0 factored by truncated SVD, ΔW ≈ B A. Load it with",
            "`PeftModel.from_pretrained(base, folder)`.",
            "",
            f"Relative Frobenius error ‖ΔW - B A‖_F / ‖ΔW‖_F over {len(errs)} modules: max "
            f"{errs[0][1] if errs else 0.0:.4g}, mean {mean:.4g}.",
            "",
            "| module | rank | relative error |",
            "|---|---|---|",
            *(f"| {n} | {self._ranks[n]} | {e:.4g} |" for n, e in errs),
        ]
        return "\n".join(lines) + "\n"


def _exact(name: str) -> str:
    # peft matches pattern keys as regexes against a dotted suffix: escape the dots
    return name.replace(".", r"\.")

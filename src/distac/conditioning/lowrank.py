"""DisTaC on LoRA adapters: task vectors kept as factors, and a student that trains the factors.

A LoRA adapter changes a weight W0 (m × n) by ΔW = s·B A, A (r × n), B (m × r), s = α/r (α/√r for
rsLoRA); Conv1D (``fan_in_fan_out``) and embedding adapters store ΔW transposed. Its task vector is
ΔW on the adapted weights, the full difference on the tensors it saves whole (``modules_to_save``,
biases), and 0 everywhere else.

**Measures from the factors, never the dense ΔW** (:class:`FactoredVector`):

* ‖s·B A‖²_F = s²·tr((BᵀB)(AAᵀ)): two r × r Gram matrices, O(r²(m + n)) instead of O(mnr) and no m × n buffer;
* ⟨s₁B₁A₁, s₂B₂A₂⟩ = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)), so the cosine between two adapters' task vectors is
  factor-only too; against a dense τ it is ⟨BᵀD, A⟩ (one r × n product).

**The student in LoRA form** (:class:`LoraStudent`): the trainable parameters are the adapter's factors
(A, B) of the same rank (plus the non-head tensors the adapter saves whole); the base weights stay
frozen, and every forward computes W = W0 + s·B A for the adapted weights and calls the model
functionally (``torch.func.functional_call``), as :class:`~distac.nn.models.BoundModule` does. The
DisTaC loop itself is :mod:`distac.conditioning.distill`'s, unchanged: only what "θ" is differs.

* **κ-scaling**: the student starts at ΔW = κ·s·B A by scaling **B** by κ (A unchanged). Scaling both
  by √κ gives the same product but a different start for the optimiser; B is the factor that carries
  the learned magnitude (peft initialises B = 0 and A at its random scale, and training grows B), so
  scaling B shrinks exactly what the fine-tune learned, keeps A's row space (the input directions
  the teacher reads) and keeps A at the scale Adam's step was tuned for. It is also what changing
  ``lora_alpha`` by κ would do, so the κ-scaled adapter is the teacher's with a smaller α.
* **Anchor**: β‖θ − θ_init‖² over the trainable parameters, as in the paper, where those parameters
  are now (A, B): β(‖A − A_init‖² + ‖B − κB_init‖²). It keeps the factors (hence ΔW's norm) near
  the κ-scaled start at a cost of O(r(m + n)) per step.
* **Output**: an adapter of the input's rank and config (same ``adapter_config.json``, same tensor
  names), so ``PeftModel.from_pretrained`` loads it and merging tools see an ordinary adapter.
"""

from __future__ import annotations

import copy
import json
import math
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DistacError
from ..io.lora import ADAPTER_CONFIG, AdapterSource
from ..taskvector import TaskVector, match_heads
from ..tensors import DictSource

__all__ = ["FactoredVector", "LoraStudent", "LowRank", "as_factored", "vector_cosine", "write_adapter"]

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class LowRank:
    """ΔW = ``scale``·B A of one weight tensor of shape ``shape`` (``transposed``: ΔW = (s·B A)ᵀ).

    ``a`` has the rank first (r × n, or r × in × k × k for a convolution), ``b`` the rank second
    (m × r, or m × r × 1 × 1).

    Example:
        >>> lr = LowRank(torch.ones(2, 3), torch.ones(4, 2), 0.5, (4, 3))
        >>> round(lr.sq_norm(), 6) == round(float(lr.delta().pow(2).sum()), 6)
        True
    """

    a: Tensor
    b: Tensor
    scale: float
    shape: tuple[int, ...]
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def _a(self) -> Tensor:
        return self.a.reshape(self.a.shape[0], -1).double()

    def _b(self) -> Tensor:
        return self.b.reshape(self.b.shape[0], -1).double()

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ΔW in the weight's own layout (fp32 by default; computed in ``dtype`` when wider)."""
        work = torch.promote_types(dtype, torch.float32)
        d = self.scale * (self.b.reshape(self.b.shape[0], -1).to(work) @ self.a.reshape(self.a.shape[0], -1).to(work))
        return (d.T if self.transposed else d).reshape(self.shape).to(dtype)

    def sq_norm(self) -> float:
        """‖ΔW‖²_F = s²·tr((BᵀB)(AAᵀ)) (both Gram matrices are symmetric, so the trace is an elementwise sum)."""
        a, b = self._a(), self._b()
        return max(0.0, self.scale**2 * float(((b.T @ b) * (a @ a.T)).sum()))

    def dot(self, other: LowRank) -> float:
        """⟨ΔW, ΔW'⟩ = s·s'·tr((BᵀB')(A'Aᵀ)) for two adapters of the same weight."""
        if other.transposed != self.transposed:
            return float((self.delta(torch.float64) * other.delta(torch.float64)).sum())
        a1, b1, a2, b2 = self._a(), self._b(), other._a(), other._b()
        return self.scale * other.scale * float(((b1.T @ b2) * (a1 @ a2.T)).sum())

    def dot_dense(self, d: Tensor) -> float:
        """⟨ΔW, D⟩ = s·⟨BᵀD, A⟩ for a dense D of the weight's shape (O(mnr), no m × n product)."""
        m = self.b.shape[0]
        d2 = d.reshape(-1, m).T if self.transposed else d.reshape(m, -1)
        return self.scale * float(((self._b().T @ d2.double()) * self._a()).sum())


class FactoredVector:
    """A task vector whose adapted weights stay in LoRA form: ``low_rank`` (name -> :class:`LowRank`) plus
    ``dense`` (name -> Δ of the tensors an adapter stores whole). Names in neither have τ = 0.

    Its measures match :class:`~distac.taskvector.TaskVector`'s (``norm``, ``norms``, ``dot``, ``cosine``)
    and never form a dense ΔW.

    Example:
        >>> fv = FactoredVector({"w": LowRank(torch.ones(1, 3), torch.ones(2, 1), 1.0, (2, 3))}, {})
        >>> round(fv.norm() ** 2, 6)
        6.0
    """

    def __init__(
        self,
        low_rank: Mapping[str, LowRank],
        dense: Mapping[str, Tensor] | None = None,
        *,
        source: AdapterSource | None = None,
        origin: AdapterSource | None = None,
    ):
        self.low_rank: dict[str, LowRank] = dict(low_rank)
        self.dense: dict[str, Tensor] = {k: v.float() for k, v in (dense or {}).items()}
        #: the :class:`~distac.io.lora.AdapterSource` whose task vector this is, exactly (its weights are read from it)
        self.source = source
        #: the adapter whose file layout (tensor names, config) it follows: its source, or what a student started from
        self.origin = origin if origin is not None else source
        both = sorted(set(self.low_rank) & set(self.dense))
        if both:
            raise DistacError(f"tensor '{both[0]}' is given both in LoRA form and whole; an adapter sets it one way")

    def __repr__(self) -> str:
        return f"FactoredVector({len(self.low_rank)} low-rank, {len(self.dense)} dense, norm={self.norm():.4g})"

    @classmethod
    def from_adapter(cls, src: AdapterSource) -> FactoredVector:
        """The task vector of a LoRA adapter on its base (:class:`~distac.io.lora.AdapterSource`), read as factors.

        Adapted weights become :class:`LowRank` (A and B as stored, peft's scale and layout); whole
        tensors (``modules_to_save``, trained biases) and ``lora_B.bias`` terms become dense Δ.
        """
        low: dict[str, LowRank] = {}
        dense: dict[str, Tensor] = {}
        for name, m in src.modules.items():
            a, b = src.adapter.factors(m.name)
            if name in src.replaced or (a.ndim == 4 and tuple(b.shape[2:]) != (1, 1)):
                # a saved whole weight plus ΔW (peft saves resized embeddings so), or a convolution whose
                # B is not 1×1: no pure B A form, so the exact Δ is kept whole
                dense[name] = _exact_delta(src, name)
                continue
            transposed = m.kind == "embedding" or m.fan_in_fan_out
            low[name] = LowRank(a.float(), b.float(), float(m.scaling), tuple(src.shape(name)), transposed)
        for name in [*src.lora_biases, *src.replaced]:
            if name not in low and name not in dense:  # modules_to_save, trained biases, lora_B.bias terms
                dense[name] = _exact_delta(src, name)
        return cls(low, dense, source=src)

    def keys(self) -> list[str]:
        return [*self.low_rank, *self.dense]

    def __contains__(self, name: object) -> bool:
        return name in self.low_rank or name in self.dense

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense Δ of one tensor."""
        if name in self.low_rank:
            return self.low_rank[name].delta(dtype)
        return self.dense[name].to(dtype)

    def without(self, names: Iterable[str]) -> FactoredVector:
        drop = set(names)
        return FactoredVector(
            {k: v for k, v in self.low_rank.items() if k not in drop},
            {k: v for k, v in self.dense.items() if k not in drop},
            source=self.source,
            origin=self.origin,
        )

    def without_heads(self, patterns: Iterable[str] | None) -> FactoredVector:
        """The shared part: every tensor except those the head patterns match."""
        return self.without(match_heads(self.keys(), list(patterns or ())))

    def norms(self) -> dict[str, float]:
        """Per-tensor L2 norms (from the factors for the low-rank ones)."""
        out = {k: math.sqrt(v.sq_norm()) for k, v in self.low_rank.items()}
        return {**out, **{k: float(v.double().norm()) for k, v in self.dense.items()}}

    def norm(self) -> float:
        """Global L2 norm, the DisTaC paper's ‖τ‖."""
        sq = sum(v.sq_norm() for v in self.low_rank.values())
        return math.sqrt(sq + sum(float(v.double().pow(2).sum()) for v in self.dense.values()))

    def dot(self, other: FactoredVector | TaskVector) -> float:
        """⟨τ, τ'⟩ with another factored or dense task vector (names missing on either side contribute 0)."""
        if isinstance(other, TaskVector):
            total = sum(lr.dot_dense(other[k]) for k, lr in self.low_rank.items() if k in other)
            return total + sum(
                float((v.double() * other[k].double()).sum()) for k, v in self.dense.items() if k in other
            )
        total = 0.0
        for k, lr in self.low_rank.items():
            if k in other.low_rank:
                total += lr.dot(other.low_rank[k])
            elif k in other.dense:
                total += lr.dot_dense(other.dense[k])
        for k, v in self.dense.items():
            if k in other.low_rank:
                total += other.low_rank[k].dot_dense(v)
            elif k in other.dense:
                total += float((v.double() * other.dense[k].double()).sum())
        return total

    def cosine(self, other: FactoredVector | TaskVector) -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def check_against(self, base: Mapping[str, Tensor], what: str = "the adapter") -> None:
        """Every tensor it changes exists in ``base`` with the same shape (names ``what`` otherwise)."""
        for k in self.keys():
            if k not in base:
                raise DistacError(f"{what} changes '{k}', which the base model does not have; use the adapter's base")
            shape = self.low_rank[k].shape if k in self.low_rank else tuple(self.dense[k].shape)
            if tuple(base[k].shape) != tuple(shape):
                raise DistacError(
                    f"{what}: tensor '{k}' has shape {tuple(shape)}, the base model {tuple(base[k].shape)}; "
                    "use the adapter's base model"
                )

    def apply_to(self, base: Mapping[str, Tensor]) -> StateDict:
        """θ = base + τ, materialised (the teacher's weights); untouched entries are the base's, cloned."""
        changed = self.changed(base)
        return {k: changed[k] if k in changed else b.clone() for k, b in base.items()}

    def changed(self, base: Mapping[str, Tensor]) -> StateDict:
        """base + τ for the changed tensors only: what a functional call needs on top of the base.

        Read from the adapter source when there is one, so the weights are the bits peft's
        ``merge_and_unload`` gives (ΔW added in the weight's dtype).
        """
        self.check_against(base)
        if self.source is not None:
            return {k: self.source.get(k).clone() for k in self.keys()}
        return {k: (base[k].float() + self.delta(k)).to(base[k].dtype) for k in self.keys()}


def _exact_delta(src: AdapterSource, name: str) -> Tensor:
    """θ_ft − θ_0 of one tensor, as the adapter source materialises it (peft's bits)."""
    return src.get(name).float() - src.base.get(name).float()


_FROM_SOURCE: weakref.WeakKeyDictionary[AdapterSource, FactoredVector] = weakref.WeakKeyDictionary()


def as_factored(x: Any, base: Mapping[str, Tensor] | None = None, what: str = "the adapter") -> FactoredVector | None:
    """``x`` as a factored task vector when it is a LoRA adapter (a :class:`FactoredVector`, or an
    :class:`~distac.io.lora.AdapterSource` read once), else None (a state dict, say).

    With ``base``, an adapter source must apply to that base: one on another model (a fine-tune plus an
    adapter) has a task vector that is not its B A alone, so it is refused (naming ``what``).
    """
    if isinstance(x, FactoredVector):
        return x
    if not isinstance(x, AdapterSource):
        return None
    if x not in _FROM_SOURCE:
        _FROM_SOURCE[x] = FactoredVector.from_adapter(x)
    if base is not None and not _on_base(x, base):
        raise DistacError(
            f"{what} ({x.label}) is an adapter on another model than the base: its task vector is not the adapter's "
            "alone. Apply it to the base itself, or pass the merged model as a state dict"
        )
    return _FROM_SOURCE[x]


#: source -> the base it was found equal to (held, so that an identity test later is sound)
_CHECKED: weakref.WeakKeyDictionary[AdapterSource, Mapping[str, Tensor]] = weakref.WeakKeyDictionary()


def _on_base(src: AdapterSource, base: Mapping[str, Tensor]) -> bool:
    """Whether ``src`` applies to ``base``: the very same dict, or equal tensors under every name."""
    if (isinstance(src.base, DictSource) and src.base.state is base) or _CHECKED.get(src) is base:
        return True
    keys = src.base.keys()
    same = set(keys) == set(base) and all(torch.equal(src.base.get(k), base[k]) for k in keys)
    if same:
        _CHECKED[src] = base
    return same


def vector_cosine(u: FactoredVector | TaskVector, v: FactoredVector | TaskVector) -> float:
    """The cosine of two task vectors, each dense or factored (factors are never expanded)."""
    if isinstance(u, FactoredVector):
        return u.cosine(v)
    if isinstance(v, FactoredVector):
        return v.cosine(u)
    return u.cosine(v)


# ------------------------------------------------------------------------------------------------
# the student in LoRA form
# ------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One adapted weight of the student: its name in the model and its LoRA scale and layout."""

    name: str
    scale: float
    shape: tuple[int, ...]
    transposed: bool


class LoraStudent(nn.Module):
    """``model`` with frozen base weights whose adapted weights are W0 + s·B A, A and B trainable.

    Built at θ_0 + κτ: B ← κ·B for each low-rank tensor, base + κΔ for the dense non-head tensors the
    adapter saves (trainable as whole tensors, like peft's ``modules_to_save``), and the teacher's own
    values for head tensors (frozen). Parameter names: ``lora_A.<i>`` / ``lora_B.<i>`` for the i-th adapted
    weight, ``model.<name>`` for the dense ones.

    Example:
        >>> student = LoraStudent(model, base, teacher_state, adapter.without_heads(heads), kappa=0.5)  # doctest: +SKIP
        >>> logits = student(batch)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        base: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        shared: FactoredVector,
        kappa: float,
    ):
        super().__init__()
        init = dict(teacher)
        for k in shared.low_rank:
            init[k] = base[k].clone()  # the product lives in the factors, the weight itself stays W0
        for k in shared.dense:
            init[k] = (base[k].float() + kappa * shared.dense[k]).to(base[k].dtype)
        self.model = copy.deepcopy(model)
        self.model.load_state_dict(init, strict=True)
        self.model.requires_grad_(False)
        own = dict(self.model.named_parameters())
        for k in shared.dense:
            if k in own:
                own[k].requires_grad_(True)
        self.slots = [_Slot(k, lr.scale, lr.shape, lr.transposed) for k, lr in shared.low_rank.items()]
        missing = [s.name for s in self.slots if s.name not in own]
        if missing:
            raise DistacError(f"the adapter adapts '{missing[0]}', which is not a parameter of the model")
        self.origin = shared.origin
        if shared.origin is not None:
            whole = [k for k in shared.dense if k in shared.origin.modules]
            if whole:
                raise DistacError(
                    f"the adapter's tensor '{whole[0]}' has no pure B A form (a saved whole weight plus LoRA, or a "
                    "convolution with a non-1×1 B), so its factors cannot be trained alone; use student 'full'"
                )
        factors = list(shared.low_rank.values())
        self.lora_A = nn.ParameterList([nn.Parameter(f.a.detach().float().clone()) for f in factors])
        # κ on B (see the module docstring): ΔW_init = s·(κB)A = κ·ΔW
        self.lora_B = nn.ParameterList([nn.Parameter(kappa * f.b.detach().float().clone()) for f in factors])
        self.dense_names = [k for k in shared.dense if k in own]
        self.fixed = {k: (init[k].float() - base[k].float()) for k in shared.dense if k not in own}

    def trainable(self) -> tuple[list[str], list[nn.Parameter]]:
        """(names, parameters) that train, in a fixed order: the factors, then the dense tensors."""
        named = dict(self.named_parameters())
        names = [f"lora_A.{i}" for i in range(len(self.slots))] + [f"lora_B.{i}" for i in range(len(self.slots))]
        names += [f"model.{k}" for k in self.dense_names]
        return names, [named[n] for n in names]

    def factor(self, i: int) -> LowRank:
        s = self.slots[i]
        return LowRank(self.lora_A[i], self.lora_B[i], s.scale, s.shape, s.transposed)

    def weights(self) -> dict[str, Tensor]:
        """{adapted weight: W0 + s·B A} in the weight's dtype, differentiable in A and B."""
        own = dict(self.model.named_parameters())
        out = {}
        for i, s in enumerate(self.slots):
            w0 = own[s.name]
            d = s.scale * (
                self.lora_B[i].reshape(self.lora_B[i].shape[0], -1)
                @ self.lora_A[i].reshape(self.lora_A[i].shape[0], -1)
            )
            # added in fp32 and rounded once to the weight's dtype, as peft's merge does
            out[s.name] = (w0.float() + (d.T if s.transposed else d).reshape(s.shape)).to(w0.dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.weights(), args, kwargs, tie_weights=True, strict=False)

    @torch.no_grad()
    def vector(self, base: Mapping[str, Tensor]) -> FactoredVector:
        """τ' of the student in factored form (detached, on the CPU)."""
        low = {}
        for i, s in enumerate(self.slots):
            f = self.factor(i)
            low[s.name] = LowRank(f.a.detach().cpu(), f.b.detach().cpu(), s.scale, s.shape, s.transposed)
        own = dict(self.model.named_parameters())
        dense = {k: own[k].detach().cpu().float() - base[k].float() for k in self.dense_names}
        return FactoredVector(low, {**dense, **self.fixed}, origin=self.origin)

    @torch.no_grad()
    def state(self, like: Mapping[str, Tensor]) -> StateDict:
        """The materialised student (θ_0 + τ'), with the keys and dtypes of ``like``."""
        sd = self.model.state_dict()
        merged = {k: v.detach() for k, v in self.weights().items()}
        return {k: merged.get(k, sd[k]).detach().to("cpu", like[k].dtype).clone() for k in like}


def write_adapter(
    vector: FactoredVector,
    base: Mapping[str, Tensor],
    out: str | Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a task vector in LoRA form as a PEFT adapter folder laid out as the adapter it started from.

    The folder holds the origin's ``adapter_config.json`` (same rank, α, targets) and an
    ``adapter_model.safetensors`` with the origin's tensor names: trained factors replace its A and B,
    trained whole tensors its saved modules, and everything the vector does not hold (the frozen head)
    is copied. ``PeftModel.from_pretrained`` loads it. Written through :mod:`distac.io.atomic`.

    Args:
        vector: τ' with an ``origin`` adapter (a :class:`ConditionResult`'s ``.adapter`` from a LoRA student).
        base: θ_0 (whole saved tensors are written as base + Δ).
        out: the folder to write.
        overwrite / inputs: as :func:`distac.io.atomic_dir`.
        metadata: extra strings for the safetensors header (the conditioning card).

    Returns:
        ``out``.

    Example:
        >>> write_adapter(result.adapter, base, "conditioned-lora")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from ..io import atomic_dir

    src = vector.origin
    if src is None:
        raise DistacError(f"cannot write '{out}' as an adapter: the task vector comes from no LoRA adapter")
    stored = src.adapter.tensors
    tensors = {k: stored.get(k).detach().clone() for k in stored.keys()}

    def put(key: str, value: Tensor) -> None:
        tensors[key] = value.detach().reshape(tensors[key].shape).to("cpu", tensors[key].dtype).contiguous()

    for name, m in src.modules.items():
        if name in vector.low_rank:
            put(m.a, vector.low_rank[name].a)
            put(m.b, vector.low_rank[name].b)
    for name, key in src.replaced.items():
        if name in vector.dense:
            value = base[name].float() + vector.dense[name]
            bias = src.lora_biases.get(name)
            if bias is not None and bias.bias is not None:  # the lora_B.bias term stays as stored
                value = value - stored.get(bias.bias).float() * bias.scaling
            put(key, value)
    for name, m in src.lora_biases.items():
        if name in vector.dense and name not in src.replaced and m.bias is not None:
            put(m.bias, vector.dense[name] / m.scaling)
    config = json.dumps(src.adapter.config, indent=2, sort_keys=True)
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(config + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", **dict(metadata or {})})
    return Path(out)

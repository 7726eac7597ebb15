"""Gram matrices G = XᵀX of every linear layer's inputs, for RegMean (Jin et al., ICLR 2023).

Keys are the layer's *weight* name (``encoder.layer.0.attention.self.query.weight``), values are
(d_in, d_in) fp32. Each Gram is stored as a **running mean** XᵀX / #rows (official RegMean), and
the row count per layer goes into the sidecar metadata, so ``scale="sum"`` can be recovered
(``gram_matrices(..., scale="sum")`` returns sums directly).

distac differs from the official code in one respect: padding positions are left out (rows whose
``attention_mask`` is 0), since they bias G towards the pad embedding; the official
``compute_grams`` flattens every position, padding included.

Orientation: ``nn.Linear`` stores W as (out, in) ("out_in"), Hugging Face ``Conv1D`` (GPT-2) as
(in, out) ("in_out"). :func:`gram_layouts` reports each layer's layout; the RegMean method takes
it as its ``layout`` parameter for square weights (non-square ones are oriented by the Gram size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import DistacError, closest
from ..nn.models import batch_to, forward_logits
from ..progress import Counter
from .examples import take_examples
from .fisher import BoundModule

__all__ = ["gram_layouts", "gram_matrices", "linear_layers"]


def _conv1d_type() -> type[nn.Module] | None:
    try:  # transformers is optional; without it there is no Conv1D to handle
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{weight name: (module, layout)}`` for every ``nn.Linear`` ("out_in") and HF ``Conv1D`` ("in_out")."""
    conv1d = _conv1d_type()
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}.weight" if name else "weight"
        if isinstance(mod, nn.Linear):
            out[prefix] = (mod, "out_in")
        elif conv1d is not None and isinstance(mod, conv1d):
            out[prefix] = (mod, "in_out")
    return out


def gram_layouts(model: nn.Module) -> dict[str, str]:
    """``{weight name: "out_in" | "in_out"}`` for the layers :func:`gram_matrices` covers."""
    return {k: lay for k, (_, lay) in linear_layers(model).items()}


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Input rows (…, d) -> (rows, d); positions where the padding mask is 0 are dropped."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _select_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, tuple[nn.Module, str]]:
    """The linear layers to cover: all of them, or the named ones (each must be a linear layer's weight)."""
    found = linear_layers(model)
    if layers is not None:
        bad = [k for k in layers if k not in found]
        if bad:
            raise DistacError(f"gram_matrices: '{bad[0]}' is not a linear layer's weight{closest(bad[0], found)}")
        found = {k: found[k] for k in layers}
    if not found:
        raise DistacError("gram_matrices: the model has no nn.Linear or Conv1D layer")
    return found


def _padding_mask(x: Any) -> Tensor | None:
    """The batch's 2-D ``attention_mask`` (padding rows are left out of the Grams), if it has one."""
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Sequence[str] | None = None,
    n_examples: int | None = None,
    scale: Literal["mean", "sum"] = "mean",
    device: torch.device | str | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Collect G = XᵀX of each linear layer's inputs with forward hooks (no gradients).

    Args:
        model: a torch module or HF model; every ``nn.Linear`` and HF ``Conv1D`` is covered.
        batches: tensors, dicts of tensors (a 2-D ``attention_mask`` leaves padding rows out), or
            ``(x, y)`` pairs (labels are ignored).
        layers: weight names to cover (default: all linear layers).
        n_examples: stop after this many examples (the official configs count 1000 *batches*).
        scale: ``"mean"`` (default, official RegMean: XᵀX / #rows) or ``"sum"``.
        info: if given, filled with ``n_examples``, ``rows`` (per layer), ``layout`` (per layer) and
            ``data_fingerprint``.

    Returns:
        ``{weight name: (d_in, d_in) fp32}`` on the CPU.

    Example:
        >>> grams = gram_matrices(model, loader, n_examples=256)  # doctest: +SKIP
    """
    if scale not in ("mean", "sum"):
        raise DistacError(f"gram_matrices: scale '{scale}' must be 'mean' or 'sum'")
    found = _select_layers(model, layers)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(found, 0)
    current: dict[str, Tensor | None] = {"mask": None}

    def hook(key: str) -> Callable[..., None]:
        def fn(_mod: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = _rows(inputs[0].detach().float(), current["mask"])
            g = x.T @ x
            sums[key] = sums[key] + g if key in sums else g
            rows[key] += x.shape[0]

        return fn

    # the model is not moved: its weights are copied to ``dev`` and used through functional_call
    # (module hooks still fire there)
    state = {k: v.detach().to(dev) for k, v in model.named_parameters()}
    state.update({k: v.to(dev) for k, v in model.named_buffers()})
    bound = BoundModule(model, (state, {}))
    handles = [mod.register_forward_pre_hook(hook(k)) for k, (mod, _) in found.items()]
    was_training = model.training
    model.eval()
    h = hashlib.blake2b(digest_size=16)
    seen = 0
    try:
        with torch.no_grad(), Counter(n_examples, desc="gram", unit="ex", quiet=not progress) as bar:
            for x, _, b in take_examples(batches, n_examples, h):
                x = batch_to(dict(x) if isinstance(x, Mapping) else x, dev)
                current["mask"] = _padding_mask(x)
                forward_logits(bound, x)
                seen += b
                bar.update(b)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    if seen == 0:
        raise DistacError("gram_matrices: the data yielded no examples")
    # layers that never ran (an unused LM head, say) get no Gram: RegMean averages them
    out = {k: (v / max(rows[k], 1) if scale == "mean" else v).cpu() for k, v in sums.items()}
    if info is not None:
        info.update(
            n_examples=seen,
            rows={k: r for k, r in rows.items() if k in sums},
            layout={k: lay for k, (_, lay) in found.items() if k in sums},
            data_fingerprint=h.hexdigest(),
            scale=scale,
        )
    return out

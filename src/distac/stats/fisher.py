"""Diagonal Fisher information from per-example gradients, and Adam's second moments as a proxy.

Scale convention (used by every curvature method in distac): a Fisher is stored on the **sum**
scale, H = Σ_n E_y[(∂ log p(y|x_n)/∂θ)²] = N × (mean Fisher), as in Daheim et al. (ICLR 2024),
where H_t must be comparable to the prior precision H_0. ``scale="mean"`` divides by N (the
convention of Matena & Raffel's code and of FusionBench). The scale is written into the sidecar
metadata so it can never be guessed.

Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap(grad)``): every
example is its own backward pass, so no cross-example terms enter the square. Squaring the
gradient of a whole-batch loss, as MergeLM/FusionBench do, gives (Σ_n g_n)² instead of Σ_n g_n²
(see ``tests/test_stats.py`` for the relation).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..errors import DistacError, closest
from ..nn.models import Batch, BoundModule, batch_size, batch_to, forward_logits

__all__ = ["ESTIMATORS", "BoundModule", "adam_fisher", "data_fingerprint_update", "fisher_diagonal", "split_labels"]

Estimator = Literal["sampled", "exact", "empirical"]
#: "sampled": one label y ~ p_θ(y|x) per example (official UBGM); "exact": Σ_y p_θ(y|x)·g_y²
#: (official Matena & Raffel); "empirical": the true label (the empirical Fisher).
ESTIMATORS: tuple[str, ...] = ("sampled", "exact", "empirical")

#: per-chunk memory budget for the vmapped per-example gradients (bytes); bounds B×P (×2 for exact).
_CHUNK_BYTES = 256 * 2**20


def split_labels(item: Any) -> tuple[Batch, Tensor | None]:
    """Separate inputs from labels: ``(x, y)`` tuples and dicts with a ``labels`` key carry labels."""
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], torch.as_tensor(item[1])
    if isinstance(item, Mapping) and "labels" in item:
        x = {k: v for k, v in item.items() if k != "labels"}
        return x, torch.as_tensor(item["labels"])
    return item, None


def take_examples(batches: Iterable[Any], n_examples: int | None, h: Any) -> Iterator[tuple[Batch, Tensor | None, int]]:
    """Yield ``(x, y, b)`` per batch until ``n_examples`` examples (the last batch cut to fit).

    ``y`` is the batch's labels or None (:func:`split_labels`); each ``x`` also feeds the data
    fingerprint ``h``. Shared by the Fisher and Gram collectors.
    """
    seen = 0
    for item in batches:
        if n_examples is not None and seen >= n_examples:
            return
        x, y = split_labels(item)
        b = batch_size(x)
        if n_examples is not None and seen + b > n_examples:
            b = n_examples - seen
            x = {k: v[:b] for k, v in x.items()} if isinstance(x, Mapping) else x[:b]
            y = None if y is None else y[:b]
        data_fingerprint_update(h, x)
        yield x, y, b
        seen += b


def data_fingerprint_update(h: Any, batch: Batch) -> None:
    """Feed a strided sample of a batch's values (at most 256 per tensor) into a blake2b hash."""
    tensors = [batch[k] for k in sorted(batch)] if isinstance(batch, Mapping) else [batch]
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(str(tuple(t.shape)).encode())
        h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())


def _selected_params(model: nn.Module, params: Sequence[str] | None) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        sel = {k: p for k, p in named.items() if p.requires_grad}
    else:
        unknown = [k for k in params if k not in named]
        if unknown:
            hint = closest(unknown[0], named)
            raise DistacError(f"fisher_diagonal: parameter '{unknown[0]}' is not in the model{hint}")
        sel = {k: named[k] for k in params}
    if not sel:
        raise DistacError("fisher_diagonal: no parameters selected (all frozen? pass params=[names])")
    return {k: p.detach() for k, p in sel.items()}


def _tied_aliases(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """state_dict names that share storage with a selected parameter (tied embeddings/heads)."""
    wanted = set(names)
    by_id: dict[int, str] = {}
    for k, p in model.named_parameters():
        if k in wanted:
            by_id[id(p)] = k
    out = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        if k not in wanted and id(p) in by_id:
            out[k] = by_id[id(p)]
    return out


def _per_example_sq_grads(
    model: nn.Module,
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    estimator: str,
) -> Callable[..., dict[str, Tensor]]:
    """Build f(x, y, u) -> per-example squared gradients (or Σ_y p_y g_y² for ``exact``)."""

    def logits_one(p: dict[str, Tensor], x: Any) -> Tensor:
        xb = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        return forward_logits(BoundModule(model, (p, frozen)), xb)[0].float()

    def logp_one(p: dict[str, Tensor], x: Any) -> Tensor:
        return torch.log_softmax(logits_one(p, x), dim=-1)

    if estimator == "exact":

        def one(x: Any, y: Tensor, u: Tensor) -> dict[str, Tensor]:
            # With g_y = J_zᵀ(e_y − p) (J_z: Jacobian of the logits), Σ_y p_y g_y² is the diagonal of
            # J_zᵀ M J_z, M = diag(p) − ppᵀ. M has rank C−1 (M·1 = 0), so M = L Lᵀ with C−1 columns
            # from its eigendecomposition: C−1 vjps instead of C (half the work for C=2). The vjps
            # share one forward pass and run as a loop: a nested vmap over classes measured ~2×
            # slower on CPU and needs C−1 gradient copies in memory.
            z, pull = vjp(lambda p: logits_one(p, x), params)
            prob = torch.softmax(z.detach(), -1)
            evals, evecs = torch.linalg.eigh(torch.diag(prob) - prob[:, None] * prob[None, :])
            factor = evecs[:, 1:] * evals[1:].clamp(min=0).sqrt()  # drop the null direction (eigh: ascending)
            out: dict[str, Tensor] = {}
            for j in range(factor.shape[1]):
                for k, g in pull(factor[:, j])[0].items():
                    out[k] = out[k] + g.pow(2) if k in out else g.pow(2)
            return out

        return one

    def nll(p: dict[str, Tensor], x: Any, y: Tensor, u: Tensor) -> Tensor:
        logp = logp_one(p, x)
        if estimator == "sampled":
            # inverse-CDF sampling from the model's own (detached) predictive distribution, as in
            # the official UBGM trainer; u ~ U(0,1) is drawn outside vmap from a seeded generator.
            cdf = logp.detach().exp().cumsum(-1)
            y = (cdf < u * cdf[-1]).sum().clamp(max=logp.shape[-1] - 1)
        return -logp.gather(0, y.reshape(1)).squeeze(0)

    g = grad(nll)

    def one(x: Any, y: Tensor, u: Tensor) -> dict[str, Tensor]:
        return {k: v.pow(2) for k, v in g(params, x, y, u).items()}

    return one


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    estimator: Estimator = "sampled",
    labels: Tensor | Sequence[int] | None = None,
    params: Sequence[str] | None = None,
    n_examples: int | None = None,
    scale: Literal["sum", "mean"] = "sum",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher of a classifier on data, from per-example gradients.

    ``F = Σ_n E_{y}[(∂ log p_θ(y|x_n)/∂θ)²]`` on the **sum** scale (``scale="sum"``, default;
    H_t of Daheim et al., ICLR 2024) or divided by N (``scale="mean"``, Matena & Raffel / FusionBench).

    Args:
        model: any ``nn.Module`` returning logits (B, C), or a Hugging Face classifier (``.logits``).
            It is run in ``eval()`` mode (dropout off, as the official code) and left unchanged.
        batches: an iterable of batches: tensors, dicts of tensors (tokenizer output), ``(x, y)``
            pairs, or dicts with a ``labels`` entry.
        estimator: ``"sampled"`` (default; one label drawn from the model per example, seeded:
            official UBGM), ``"exact"`` (expectation over all C classes, as C−1 vjps through a
            factor of diag(p) − ppᵀ after one forward pass: official Matena & Raffel) or
            ``"empirical"`` (true labels).
        labels: true labels in data order, for ``"empirical"`` when the batches carry none.
        params: parameter names to include (default: every parameter with ``requires_grad``).
            Tied aliases (e.g. a tied LM head) get the same values under their own names.
        n_examples: stop after this many examples (default: all).
        scale: ``"sum"`` or ``"mean"``.
        seed: seed of the label sampler (``"sampled"``).
        device: where to compute (default: the model's device). The model itself is not moved:
            its weights are copied to ``device`` and called through ``functional_call``.
        progress: show a tqdm progress bar.
        info: if given, filled with ``n_examples`` and ``data_fingerprint`` (for the sidecar).

    Returns:
        ``{name: fp32 tensor}`` on the CPU, same shapes as the parameters.

    Differs from MergeLM/FusionBench, which square the gradient of a whole-batch loss Σ_b √p·log p
    (cross-example terms included) and divide by N; use ``estimator="exact", scale="mean"`` for the
    official Fisher-merging quantity.
    """
    if estimator not in ESTIMATORS:
        raise DistacError(f"fisher_diagonal: estimator '{estimator}' is not one of {list(ESTIMATORS)}")
    if scale not in ("sum", "mean"):
        raise DistacError(f"fisher_diagonal: scale '{scale}' must be 'sum' or 'mean'")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    sel = _selected_params(model, params)
    sel = {k: v.to(dev) for k, v in sel.items()}
    frozen = {k: v.detach().to(dev) for k, v in model.named_parameters() if k not in sel}
    frozen.update({k: v.to(dev) for k, v in model.named_buffers()})
    n_classes = 0
    mode = "vmap"
    one = _per_example_sq_grads(model, sel, frozen, estimator)
    # models whose selected parameters are all plain nn.Linear layers take a matmul shortcut
    linear = _linear_owners(model, sel)
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in sel.items()}
    n_params = sum(v.numel() for v in sel.values())
    gen = torch.Generator().manual_seed(seed)
    label_list = None if labels is None else torch.as_tensor(labels).reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    seen = 0
    show = progress and sys.stderr.isatty()  # same rule as distac.progress: bars on terminals only
    bar = tqdm(total=n_examples, unit="ex", desc=f"fisher ({estimator})", disable=not show, leave=False)
    try:
        for x, y, b in take_examples(batches, n_examples, h):
            if y is None and label_list is not None:
                if seen + b > label_list.numel():
                    raise DistacError(f"fisher_diagonal: labels has {label_list.numel()} entries, data has more")
                y = label_list[seen : seen + b]
            if estimator == "empirical" and y is None:
                raise DistacError(
                    "fisher_diagonal: estimator 'empirical' needs true labels: (x, y) batches, a 'labels' "
                    "entry in dict batches, or labels=[...]"
                )
            x = batch_to(dict(x) if isinstance(x, Mapping) else x, dev)
            yy = (y if y is not None else torch.zeros(b, dtype=torch.long)).to(dev, torch.long)
            u = torch.rand(b, generator=gen, dtype=torch.float32).to(dev)
            if n_classes == 0:
                with torch.no_grad():
                    n_classes = int(forward_logits(BoundModule(model, (sel, frozen)), _first(x)).shape[-1])
                if n_classes < 2:
                    raise DistacError(
                        f"fisher_diagonal: the model returns {n_classes} logit(s) per example; the Fisher of a "
                        "classifier needs at least 2 classes"
                    )
            per_example = n_params * (2 if estimator == "exact" else 1)  # exact: gradient + running sum
            chunk = max(1, _CHUNK_BYTES // (4 * per_example))
            # the math SDPA kernel is built from ops vmap batches natively (the fused CPU kernel's
            # backward has no batching rule and would fall back to a slow per-example loop)
            sq = None
            if linear is not None and seen == 0 and not _agrees(model, linear, sel, frozen, one, x, yy, u, estimator):
                linear = None  # the layers are used some other way: per-example vmap
            if linear is not None:
                sq = _linear_batch(model, linear, sel, frozen, x, yy, u, estimator)
            if sq is None:
                with sdpa_kernel(SDPBackend.MATH):
                    sq, mode = _run_batch(one, x, yy, u, min(chunk, b), mode)
            for k, v in sq.items():
                total[k] += v
            seen += b
            bar.update(b)
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise DistacError("fisher_diagonal: the data yielded no examples")
    out = {k: (v / seen if scale == "mean" else v).cpu() for k, v in total.items()}
    for alias, src in _tied_aliases(model, sel).items():
        out[alias] = out[src]
    if info is not None:
        info.update(n_examples=seen, data_fingerprint=h.hexdigest(), estimator=estimator, scale=scale)
    return out


def _agrees(
    model: nn.Module,
    linear: Mapping[str, nn.Linear],
    sel: dict[str, Tensor],
    frozen: dict[str, Tensor],
    one: Callable[..., dict[str, Tensor]],
    x: Batch,
    y: Tensor,
    u: Tensor,
    estimator: str,
) -> bool:
    """Check the Linear shortcut against vmap on the first few examples (a model that uses a Linear's
    weight outside its forward, or mixes examples, would differ)."""
    n = min(4, y.shape[0])
    xs = {k: v[:n] for k, v in x.items()} if isinstance(x, Mapping) else x[:n]
    fast = _linear_batch(model, linear, sel, frozen, xs, y[:n], u[:n], estimator)
    with sdpa_kernel(SDPBackend.MATH):
        ref, _ = _run_batch(one, xs, y[:n], u[:n], n, "vmap")
    return fast is not None and all(
        torch.allclose(fast[k], ref[k], rtol=1e-3, atol=1e-5 * float(ref[k].abs().max()) + 1e-12) for k in ref
    )


_MODES = ("vmap", "vmap-4d-mask", "loop")


def _additive_mask(x: Batch) -> Batch:
    """Turn a 2-D padding mask (B, L) into the 4-D additive mask (B, 1, L, L) HF models accept as-is.

    HF's own mask builder inspects the mask's values (``mask.all()``), which vmap cannot trace;
    a prepared 4-D mask skips it and gives the same attention.
    """
    if not isinstance(x, Mapping) or not isinstance(x.get("attention_mask"), Tensor) or x["attention_mask"].dim() != 2:
        raise _Unsupported
    m = x["attention_mask"]
    neg = torch.finfo(torch.float32).min
    add = (1.0 - m.to(torch.float32))[:, None, None, :] * neg
    return {**x, "attention_mask": add.expand(m.shape[0], 1, m.shape[1], m.shape[1]).contiguous()}


class _Unsupported(Exception):
    pass


def _run_batch(
    one: Callable[..., dict[str, Tensor]], x: Batch, y: Tensor, u: Tensor, chunk: int, mode: str
) -> tuple[dict[str, Tensor], str]:
    """Σ over the batch of per-example squared gradients; returns the mode that worked.

    ``vmap`` first; models whose forward branches on tensor values (HF mask builders) get a
    prepared 4-D mask, and as a last resort a per-example loop (same numbers, slower).
    """
    for m in _MODES[_MODES.index(mode) :]:
        try:
            if m == "loop":
                out: dict[str, Tensor] = {}
                for i in range(y.shape[0]):
                    xi = {k: v[i] for k, v in x.items()} if isinstance(x, Mapping) else x[i]
                    for k, v in one(xi, y[i], u[i]).items():
                        out[k] = out[k] + v if k in out else v
                return out, m
            xm = _additive_mask(x) if m == "vmap-4d-mask" else x
            # chunks summed as they come: vmap's own chunk_size would concatenate all (B, *S) outputs
            acc: dict[str, Tensor] = {}
            for i in range(0, y.shape[0], chunk):
                part = {k: v[i : i + chunk] for k, v in xm.items()} if isinstance(xm, Mapping) else xm[i : i + chunk]
                for k, v in vmap(one)(part, y[i : i + chunk], u[i : i + chunk]).items():
                    acc[k] = acc[k] + v.sum(0) if k in acc else v.sum(0)
            return acc, m
        except _Unsupported:
            continue
        except RuntimeError as e:
            if "vmap" not in str(e) or m == "loop":
                raise
    raise AssertionError("unreachable: the loop mode always returns or raises")


def _linear_owners(model: nn.Module, sel: Mapping[str, Tensor]) -> dict[str, nn.Linear] | None:
    """``{module name: nn.Linear}`` when every selected parameter is the weight or bias of a plain
    ``nn.Linear`` used by no other module (no ties); None otherwise."""
    owner: dict[str, str] = {}
    mods: dict[str, nn.Linear] = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:  # exact type: subclasses may bypass forward (MultiheadAttention.out_proj)
            mods[name] = m
            for pn in ("weight", "bias"):
                if getattr(m, pn, None) is not None:
                    owner[f"{name}.{pn}" if name else pn] = name
    if not sel or any(k not in owner for k in sel):
        return None
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    if any(uses.get(id(p), 0) > 1 for k, p in model.named_parameters() if k in sel):
        return None
    return {owner[k]: mods[owner[k]] for k in sel}


def _linear_batch(
    model: nn.Module,
    owners: Mapping[str, nn.Linear],
    params: dict[str, Tensor],
    frozen: dict[str, Tensor],
    x: Batch,
    y: Tensor,
    u: Tensor,
    estimator: str,
) -> dict[str, Tensor] | None:
    """Σ over the batch of per-example squared gradients for models whose selected parameters are all
    ``nn.Linear`` weights/biases, from one batched forward and backward pass(es).

    A Linear layer's per-example gradient is δ_nᵀ X_n (δ: gradient at its output, X: its input,
    rows = positions), so with 2-D inputs Σ_n (δ_n x_nᵀ)² = (δ²)ᵀ(x²) is one matmul and no
    per-example gradient is ever materialised. δ_n of example n's loss equals the δ of the summed
    loss because examples do not interact in an eval-mode forward. Returns None when a hooked layer
    did not run (its weight is used some other way), so the caller falls back to vmap.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in owners.items()]
    try:
        with torch.enable_grad():
            req = {k: v.detach().requires_grad_() for k, v in params.items()}
            z = forward_logits(BoundModule(model, (req, frozen)), x).float()
    finally:
        for h in handles:
            h.remove()
    if set(outputs) != set(owners) or any(o.shape[0] != y.shape[0] for o in outputs.values()):
        return None
    prob = torch.softmax(z.detach(), -1)
    if estimator == "exact":
        evals, evecs = torch.linalg.eigh(torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :])
        cots = list((evecs[..., 1:] * evals[:, None, 1:].clamp(min=0).sqrt()).unbind(-1))  # C−1 × (B, C)
    else:
        if estimator == "sampled":  # the same inverse-CDF draw as the vmap path
            cdf = prob.cumsum(-1)
            y = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=prob.shape[-1] - 1)
        cots = [prob - nn.functional.one_hot(y, prob.shape[-1]).to(prob)]  # ∂(−log p_y)/∂z
    names = list(owners)
    out: dict[str, Tensor] = {}
    for j, cot in enumerate(cots):
        deltas = torch.autograd.grad(z, [outputs[n] for n in names], cot, retain_graph=j < len(cots) - 1)
        for n, d in zip(names, deltas, strict=True):
            a, d = inputs[n].float(), d.float()
            if a.dim() == 2:
                gw = (d * d).T @ (a * a)
                gb = (d * d).sum(0)
            else:  # (B, ..., features): sum over positions inside each example first
                a, d = a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
                gw = torch.einsum("bto,bti->boi", d, a).pow(2).sum(0)
                gb = d.sum(1).pow(2).sum(0)
            for key, val in ((f"{n}.weight" if n else "weight", gw), (f"{n}.bias" if n else "bias", gb)):
                if key in params:
                    out[key] = out[key] + val if key in out else val
    return out


def _first(x: Batch) -> Batch:
    return {k: v[:1] for k, v in x.items()} if isinstance(x, Mapping) else x[:1]


def adam_fisher(
    optimizer_state: str | Mapping[str, Any],
    param_names: Sequence[str] | nn.Module,
    *,
    n_examples: int,
    batch_size: int,
    bias_correction: bool = True,
) -> dict[str, Tensor]:
    """Adam/AdamW second moments as a free diagonal curvature proxy, on the sum-Fisher scale.

    Adam's ``exp_avg_sq`` v is an EMA of squared *mini-batch-mean* gradients, so
    E[v] ≈ F_per-example / B + ḡ² (ḡ the mean gradient, ≈ 0 near convergence). Hence
    F_per-example ≈ B·v and the sum Fisher over N examples is **H ≈ N·B·v** ("Squisher", Li, Dangel,
    Tam & Raffel 2025, arXiv 2507.18807; merge-methods.md §1.3).

    * ``bias_correction`` divides v by (1 − β₂^step) as Adam does before using it; it only matters
      for short runs (step ≲ 1/(1−β₂)).
    * Weight decay: AdamW's decoupled decay does not enter v; torch ``Adam(weight_decay=λ)`` adds λθ
      to the gradient, so v also holds (λθ)² and over-estimates curvature for large weights.
    * v is the curvature along the optimisation *trajectory* (an EMA over the last ~1/(1−β₂)
      steps), not at the final weights; use it when no data is at hand.

    Args:
        optimizer_state: a path to ``torch.save(optimizer.state_dict())`` (read with
            ``weights_only=True``) or the state dict itself.
        param_names: the model (its ``named_parameters()`` order) or the names, in the order the
            parameters were given to the optimizer.
        n_examples: N, the training-set size. batch_size: B used in training.
    """
    if isinstance(optimizer_state, str):
        try:
            state = torch.load(optimizer_state, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise DistacError(f"{optimizer_state}: cannot read the optimizer state: {e}") from e
        where = optimizer_state
    else:
        state, where = optimizer_state, "optimizer state"
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise DistacError(f"{where}: not a torch optimizer state_dict (needs 'state' and 'param_groups')")
    shapes = None
    if isinstance(param_names, nn.Module):
        shapes = {k: tuple(p.shape) for k, p in param_names.named_parameters()}
        names = list(shapes)
    else:
        names = list(param_names)
    ids = [i for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise DistacError(
            f"{where}: the optimizer holds {len(ids)} parameters but {len(names)} names were given; "
            "pass the names in the order the parameters were given to the optimizer"
        )
    betas = {i: g.get("betas", (0.9, 0.999)) for g in state["param_groups"] for i in g["params"]}
    out: dict[str, Tensor] = {}
    for i, name in zip(ids, names, strict=True):
        s = state["state"].get(i)
        if not s or "exp_avg_sq" not in s:
            continue  # never stepped (frozen): no curvature information
        v = s["exp_avg_sq"].detach().to(torch.float32).clone()
        if shapes is not None and tuple(v.shape) != shapes[name]:
            raise DistacError(f"{where}: exp_avg_sq of '{name}' has shape {tuple(v.shape)}, the model {shapes[name]}")
        if bias_correction:
            step = float(s.get("step", 0))
            if step > 0:
                v /= 1.0 - math.pow(float(betas[i][1]), step)
        out[name] = v * float(n_examples) * float(batch_size)
    if not out:
        raise DistacError(f"{where}: no parameter has an 'exp_avg_sq' (not an Adam/AdamW state?)")
    return out

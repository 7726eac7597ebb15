"""Diagonal Fisher information from per-example gradients, and Adam's second moments as a proxy.

Scale convention (used by every curvature method in distac): a Fisher is stored on the **sum**
scale, H = Σ_n E_y[(∂ log p(y|x_n)/∂θ)²] = N × (mean Fisher), as in Daheim et al. (ICLR 2024),
where H_t must be comparable to the prior precision H_0. ``scale="mean"`` divides by N (the
convention of Matena & Raffel's code and of FusionBench). The scale is written into the sidecar
metadata so it can never be guessed.

Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap(grad)``): every
example is its own backward pass, so no cross-example terms enter the square. Squaring the
gradient of a whole-batch loss, as MergeLM/FusionBench do, gives (Σ_n g_n)² instead of Σ_n g_n²
(the tests check the relation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import DistacError, closest
from ..nn.models import Batch, BoundModule, additive_mask, batch_to, forward_logits
from ..progress import Counter
from .adam import adam_fisher
from .examples import data_fingerprint_update, split_labels, take_examples
from .fisher_linear import linear_batch, linear_owners

__all__ = [
    "ESTIMATORS",
    "BoundModule",
    "adam_fisher",
    "data_fingerprint_update",
    "fisher_diagonal",
    "split_labels",
    "take_examples",
]

Estimator = Literal["sampled", "exact", "empirical"]
#: "sampled": one label y ~ p_θ(y|x) per example (official UBGM); "exact": Σ_y p_θ(y|x)·g_y²
#: (official Matena & Raffel); "empirical": the true label (the empirical Fisher).
ESTIMATORS: tuple[str, ...] = ("sampled", "exact", "empirical")

#: per-chunk memory budget for the vmapped per-example gradients (bytes); bounds B×P (×2 for exact).
#: On the CPU a larger chunk gains nothing (the work is memory-bound either way); see ``_chunk_bytes``.
_CHUNK_BYTES = 256 * 2**20
#: on a GPU, the share of free memory one chunk may take, and its cap: at 256 MB a 22M-parameter
#: MiniLM gets 2 examples per vmap call and the GPU waits on kernel launches (the text suite's 38
#: Fishers of 64 sentences took minutes on an H200); an eighth of free memory leaves room for
#: the activations and the running sums.
_GPU_FREE_SHARE, _GPU_CHUNK_CAP = 8, 8 * 2**30


def _chunk_bytes(device: torch.device) -> int:
    """The per-chunk budget on ``device``: :data:`_CHUNK_BYTES`, or a share of a GPU's free memory."""
    if device.type != "cuda":
        return _CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(_CHUNK_BYTES, min(free // _GPU_FREE_SHARE, _GPU_CHUNK_CAP))


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

        def one_exact(x: Any, y: Tensor, u: Tensor) -> dict[str, Tensor]:
            # With g_y = J_zᵀ(e_y − p) (J_z: Jacobian of the logits), Σ_y p_y g_y² is the diagonal of
            # J_zᵀ M J_z, M = diag(p) − ppᵀ. M has rank C−1 (M·1 = 0), so M = L Lᵀ with C−1 columns
            # from its eigendecomposition: C−1 vjps instead of C (half the work for C=2). The vjps
            # share one forward pass and run as a loop: a nested vmap over classes measured ~2×
            # slower on CPU and needs C−1 gradient copies in memory.
            z, pull = vjp(lambda p: logits_one(p, x), params)  # type: ignore[misc]  # (out, fn) without has_aux
            prob = torch.softmax(z.detach(), -1)
            evals, evecs = torch.linalg.eigh(torch.diag(prob) - prob[:, None] * prob[None, :])
            factor = evecs[:, 1:] * evals[1:].clamp(min=0).sqrt()  # drop the null direction (eigh: ascending)
            out: dict[str, Tensor] = {}
            for j in range(factor.shape[1]):
                for k, g in pull(factor[:, j])[0].items():
                    out[k] = out[k] + g.pow(2) if k in out else g.pow(2)
            return out

        return one_exact

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


class _Collector:
    """Σ of per-example squared gradients of one batch, by the fastest path that gives the same numbers.

    Models whose selected parameters are all plain ``nn.Linear`` layers take a matmul shortcut
    (:mod:`distac.stats.fisher_linear`), checked against ``vmap`` on the first batch; everything
    else goes through ``vmap`` (or, for models that branch on tensor values, a prepared mask or a loop).
    """

    def __init__(self, model: nn.Module, sel: dict[str, Tensor], frozen: dict[str, Tensor], estimator: str):
        self.model, self.sel, self.frozen, self.estimator = model, sel, frozen, estimator
        self.one = _per_example_sq_grads(model, sel, frozen, estimator)
        self.linear = linear_owners(model, sel)
        self.n_params = sum(v.numel() for v in sel.values())
        self.n_classes = 0
        self.mode = "vmap"
        self.first = True

    def _logits(self, x: Batch) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: forward_logits(BoundModule(self.model, (p, self.frozen)), x)

    def _check_classes(self, x: Batch) -> None:
        if self.n_classes:
            return
        with torch.no_grad():
            self.n_classes = int(self._logits(_first(x))(self.sel).shape[-1])
        if self.n_classes < 2:
            raise DistacError(
                f"fisher_diagonal: the model returns {self.n_classes} logit(s) per example; the Fisher of a "
                "classifier needs at least 2 classes"
            )

    def _agrees(self, x: Batch, y: Tensor, u: Tensor) -> bool:
        """Check the Linear shortcut against vmap on the first few examples (a model that uses a Linear's
        weight outside its forward, or mixes examples, would differ)."""
        assert self.linear is not None
        n = min(4, y.shape[0])
        xs = {k: v[:n] for k, v in x.items()} if isinstance(x, Mapping) else x[:n]
        fast = linear_batch(self.linear, self._logits(xs), self.sel, y[:n], u[:n], self.estimator)
        with sdpa_kernel(SDPBackend.MATH):
            ref, _ = _run_batch(self.one, xs, y[:n], u[:n], n, "vmap")
        return fast is not None and all(
            torch.allclose(fast[k], ref[k], rtol=1e-3, atol=1e-5 * float(ref[k].abs().max()) + 1e-12) for k in ref
        )

    def squares(self, x: Batch, y: Tensor, u: Tensor, b: int) -> dict[str, Tensor]:
        self._check_classes(x)
        per_example = self.n_params * (2 if self.estimator == "exact" else 1)  # exact: gradient + running sum
        chunk = max(1, _chunk_bytes(y.device) // (4 * per_example))
        if self.linear is not None and self.first and not self._agrees(x, y, u):
            self.linear = None  # the layers are used some other way: per-example vmap
        self.first = False
        sq = None
        if self.linear is not None:
            sq = linear_batch(self.linear, self._logits(x), self.sel, y, u, self.estimator)
        if sq is None:
            # the math SDPA kernel is built from ops vmap batches natively (the fused CPU kernel's
            # backward has no batching rule and would fall back to a slow per-example loop)
            with sdpa_kernel(SDPBackend.MATH):
                sq, self.mode = _run_batch(self.one, x, y, u, min(chunk, b), self.mode)
        return sq


def _labels(y: Tensor | None, given: Tensor | None, seen: int, b: int, estimator: str) -> Tensor | None:
    """The batch's labels: its own, else the next ``b`` of ``labels=``; ``empirical`` needs some."""
    if y is None and given is not None:
        if seen + b > given.numel():
            raise DistacError(f"fisher_diagonal: labels has {given.numel()} entries, data has more")
        y = given[seen : seen + b]
    if estimator == "empirical" and y is None:
        raise DistacError(
            "fisher_diagonal: estimator 'empirical' needs true labels: (x, y) batches, a 'labels' "
            "entry in dict batches, or labels=[...]"
        )
    return y


def _check_args(estimator: str, scale: str) -> None:
    if estimator not in ESTIMATORS:
        raise DistacError(f"fisher_diagonal: estimator '{estimator}' is not one of {list(ESTIMATORS)}")
    if scale not in ("sum", "mean"):
        raise DistacError(f"fisher_diagonal: scale '{scale}' must be 'sum' or 'mean'")


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
        progress: show a progress bar (on a terminal only, see :mod:`distac.progress`).
        info: if given, filled with ``n_examples`` and ``data_fingerprint`` (for the sidecar).

    Returns:
        ``{name: fp32 tensor}`` on the CPU, same shapes as the parameters.

    Example:
        >>> f = fisher_diagonal(model, [(x, y)], estimator="exact", scale="mean")  # doctest: +SKIP

    Differs from MergeLM/FusionBench, which square the gradient of a whole-batch loss Σ_b √p·log p
    (cross-example terms included) and divide by N; use ``estimator="exact", scale="mean"`` for the
    official Fisher-merging quantity.
    """
    _check_args(estimator, scale)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        sel = {k: v.to(dev) for k, v in _selected_params(model, params).items()}
        frozen = {k: v.detach().to(dev) for k, v in model.named_parameters() if k not in sel}
        frozen.update({k: v.to(dev) for k, v in model.named_buffers()})
        collector = _Collector(model, sel, frozen, estimator)
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in sel.items()}
        gen = torch.Generator().manual_seed(seed)
        given = None if labels is None else torch.as_tensor(labels).reshape(-1)
        h = hashlib.blake2b(digest_size=16)
        seen = 0
        with Counter(n_examples, desc=f"fisher ({estimator})", unit="ex", quiet=not progress) as bar:
            for x, y, b in take_examples(batches, n_examples, h):
                y = _labels(y, given, seen, b, estimator)
                x = batch_to(dict(x) if isinstance(x, Mapping) else x, dev)
                yy = (y if y is not None else torch.zeros(b, dtype=torch.long)).to(dev, torch.long)
                u = torch.rand(b, generator=gen, dtype=torch.float32).to(dev)
                for k, v in collector.squares(x, yy, u, b).items():
                    total[k] += v
                seen += b
                bar.update(b)
    finally:
        model.train(was_training)
    if seen == 0:
        raise DistacError("fisher_diagonal: the data yielded no examples")
    out = {k: (v / seen if scale == "mean" else v).cpu() for k, v in total.items()}
    for alias, src in _tied_aliases(model, sel).items():
        out[alias] = out[src]
    if info is not None:
        info.update(n_examples=seen, data_fingerprint=h.hexdigest(), estimator=estimator, scale=scale)
    return out


_MODES = ("vmap", "vmap-4d-mask", "loop")


def _additive_mask(x: Batch) -> Batch:
    """The batch with its 2-D padding mask replaced by :func:`~distac.nn.models.additive_mask`'s 4-D one."""
    if not isinstance(x, Mapping) or not isinstance(x.get("attention_mask"), Tensor) or x["attention_mask"].dim() != 2:
        raise _Unsupported
    return {**x, "attention_mask": additive_mask(x["attention_mask"])}


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


def _first(x: Batch) -> Batch:
    return {k: v[:1] for k, v in x.items()} if isinstance(x, Mapping) else x[:1]

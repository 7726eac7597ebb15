"""The EMR-Merging bundle: its on-disk format, loading it back and materialising each task.

:mod:`distac.merging.emr` computes the merge in one streaming pass; this module is everything the
result is made of afterwards: the packed 1-bit masks, the manifest, :class:`EMRBundle` (in memory or
loaded with :func:`load_emr_bundle`), :func:`export_per_task` and the bundle's model-card text.

**The bundle** (``emr_merge(..., out=folder)``, read back with :func:`load_emr_bundle`)::

    folder/emr.json                      tasks, λ_t (exact float64), base path, heads, fingerprints
    folder/unified/model*.safetensors    τ_uni per merged tensor, in θ0's dtype
    folder/masks/model*.safetensors      per merged tensor: uint8 (N, ⌈numel/8⌉), 1 bit per entry
    folder/heads/<task>.safetensors      each task's head tensors (when ``heads`` are given)
    folder/tasks/<task>/                 with ``export_per_task``: each θ̂_t as a normal checkpoint

Why τ_uni plus a reference to the base, and not the "unified model" θ0 + τ_uni: θ̂_t needs θ0
itself wherever M_t = 0, so θ0 + τ_uni alone cannot rebuild any task, and storing both would double
the bundle. τ_uni is stored exactly as computed (no θ0 + τ − θ0 cancellation); in θ0's dtype, whose
rounding of τ_uni is below the rounding of θ̂_t to that same dtype (|λ τ_uni| ≪ |θ0|); fp32
checkpoints (the official ViT setting) round-trip exactly. The base is referenced by path and, per
tensor, by a BLAKE2 fingerprint of its fp32 values taken during the pass: materialising a task
against a different base fails with the tensor's name instead of producing a wrong model. So the
bundle is ≈ one model in θ0's dtype plus N·numel/8 bytes of masks (plus heads).

Masks are packed with numpy's default (big-endian) bit order: ``numpy.unpackbits(row)[:numel]``
reads task t's mask of a tensor from row t of its ``masks`` entry.


Example:
    >>> b = load_emr_bundle("emr-bundle")                                 # doctest: +SKIP
    >>> theta_a = b.task("a")                                             # doctest: +SKIP
    >>> export_per_task(b, "per-task")                                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import DistacError
from ..io import DEFAULT_SHARD_BYTES, ShardWriter, atomic_dir, copy_model_files, open_checkpoint, parse_size
from ..progress import track
from ..tensors import DictSource, TensorSource

__all__ = [
    "FORMAT",
    "MANIFEST",
    "EMRBundle",
    "bundle_card",
    "export_per_task",
    "load_emr_bundle",
    "pack_bits",
    "unpack_bits",
]

FORMAT = "distac-emr/1"
MANIFEST = "emr.json"
_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits' default (big-endian) order

Source = TensorSource | Mapping[str, Tensor] | str | Path


# ----------------------------------------------------------------------------------------------
# the pieces of the format: packed masks, base fingerprints
# ----------------------------------------------------------------------------------------------
def new_fingerprint() -> Any:
    """A fresh hasher for one base tensor's fingerprint (fed with :func:`fp32_bytes`)."""
    return hashlib.blake2b(digest_size=16)


def fp32_bytes(t: Tensor) -> Any:
    """A tensor's values as float32 on the CPU, flat: what a base fingerprint hashes."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().reshape(-1).numpy()


def numel_of(shape: Sequence[int]) -> int:
    """The number of entries of a tensor of this shape."""
    return int(torch.Size(shape).numel())


def pack_bits(masks: Tensor) -> Tensor:
    """Pack a bool (N, k) into uint8 (N, ⌈k/8⌉), 8 entries per byte, numpy's big-endian bit order.

    Example:
        >>> pack_bits(torch.tensor([[True, False, True]])).tolist()
        [[160]]
    """
    n, k = masks.shape
    pad = (-k) % 8
    bits = masks.to(torch.uint8)
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=masks.device)
    return (bits.view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits` for one row: uint8 (⌈numel/8⌉,) -> bool (numel,).

    Example:
        >>> unpack_bits(torch.tensor([160], dtype=torch.uint8), 3).tolist()
        [True, False, True]
    """
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel].bool()


# ----------------------------------------------------------------------------------------------
# the bundle: in memory or on disk, one way to materialise a task
# ----------------------------------------------------------------------------------------------
@dataclass
class EMRBundle:
    """An EMR merge: θ̂_t = θ0 + λ_t · M_t ⊙ τ_uni for each task t, materialised on demand.

    ``unified`` holds τ_uni and ``masks`` the packed masks of every merged tensor; ``base`` is θ0;
    ``heads`` each task's own head tensors. :meth:`task` builds one task's full state dict (CPU,
    θ0's dtypes, the base's key order); :meth:`iter_task` yields it tensor by tensor.
    """

    tasks: list[str]
    rescalers: Tensor  # (N,) float64
    base: TensorSource
    unified: TensorSource
    masks: TensorSource
    heads: dict[str, TensorSource]
    head_names: list[str]
    fingerprints: dict[str, str]
    base_path: str | None = None
    path: Path | None = None  # the bundle folder, when loaded from disk

    def index(self, which: int | str) -> int:
        """The position of a task given by name or index; a clear error for anything else."""
        if isinstance(which, str):
            if which not in self.tasks:
                raise DistacError(f"EMR bundle has no task {which!r}; its tasks are {self.tasks}")
            return self.tasks.index(which)
        if isinstance(which, bool) or not isinstance(which, int) or not -len(self.tasks) <= which < len(self.tasks):
            raise DistacError(f"EMR bundle task index {which!r} is out of range: it has {len(self.tasks)} tasks")
        return which % len(self.tasks)

    def _merged(self, name: str, t: int) -> Tensor:
        theta0 = self.base.get(name)
        b32 = theta0.to(torch.float32)
        h = new_fingerprint()
        h.update(fp32_bytes(b32))
        if h.hexdigest() != self.fingerprints.get(name):
            where = self.base_path or getattr(self.base, "label", "the base")
            raise DistacError(
                f"{where}: tensor '{name}' differs from the base this EMR bundle was built from; "
                "pass the original base (load_emr_bundle(path, base=...))"
            )
        # θ̂_t lives where the base does, whichever device the merge kept its masks and τ_uni on
        mask = unpack_bits(self.masks.get(name)[t].to(b32.device), b32.numel()).view(b32.shape)
        uni = self.unified.get(name).to(b32.device, torch.float32)
        lam = float(self.rescalers[t])
        return (b32 + (uni * mask) * lam).to(theta0.dtype)

    def _tensors(self, which: int | str) -> Iterator[tuple[str, Tensor, bool]]:
        """``(name, tensor, fresh)`` of θ̂_t in the base's order; ``fresh``: built here, nobody else holds it."""
        t = self.index(which)
        merged = set(self.unified.keys())
        head_src = self.heads.get(self.tasks[t])
        head_set = set(self.head_names)
        for name in self.base.keys():
            if name in head_set:
                assert head_src is not None
                yield name, head_src.get(name), False
            elif name in merged:
                yield name, self._merged(name, t), True
            else:
                yield name, self.base.get(name), False

    def iter_task(self, which: int | str) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` of θ̂_t in the base's order, one tensor in memory at a time.

        Heads and int buffers may be the sources' own tensors: copy them before editing in place.
        """
        for name, v, _ in self._tensors(which):
            yield name, v

    def task(self, which: int | str) -> dict[str, Tensor]:
        """θ̂_t as a full state dict (task by name or index); its tensors alias nothing else.

        Example:
            >>> theta = load_emr_bundle("emr-bundle").task("cars")  # doctest: +SKIP
        """
        return {k: v if fresh else v.clone() for k, v, fresh in self._tensors(which)}

    def close(self) -> None:
        """Close the files a loaded bundle reads (a later :meth:`task` reopens them)."""
        for src in (self.base, self.unified, self.masks, *self.heads.values()):
            close = getattr(src, "close", None)
            if close is not None:
                close()


# ----------------------------------------------------------------------------------------------
# inputs: paths, state dicts, sources
# ----------------------------------------------------------------------------------------------
def as_source(x: Source, label: str) -> tuple[TensorSource, Path | None]:
    """A ``TensorSource`` for a path (opened lazily), a state dict or a source, and its path if any."""
    if isinstance(x, str | Path):
        path = Path(x).expanduser().resolve()
        return open_checkpoint(path), path
    if isinstance(x, Mapping):
        return DictSource(x, label), None
    own = getattr(x, "path", None)  # a Checkpoint: recorded absolute, so the bundle loads from anywhere
    return x, Path(own).expanduser().resolve() if own is not None else None


# ----------------------------------------------------------------------------------------------
# on disk: the manifest and card, loading, exporting
# ----------------------------------------------------------------------------------------------
def write_heads(folder: Path, tasks: Sequence[str], models: Sequence[TensorSource], head_names: list[str]) -> None:
    """Write each task's own head tensors to ``folder/heads/<task>.safetensors`` (nothing without heads)."""
    if not head_names:
        return
    (folder / "heads").mkdir()
    for t, m in zip(tasks, models, strict=True):
        save_file({k: m.get(k).contiguous() for k in head_names}, str(folder / "heads" / f"{t}.safetensors"))


def write_manifest(
    folder: Path,
    tasks: list[str],
    lam: Tensor,
    base_path: Path | None,
    head_names: list[str],
    fingerprints: dict[str, str],
) -> None:
    """Write ``emr.json`` (tasks, exact λ_t, base path, heads, fingerprints) and ``README.md`` into ``folder``."""
    manifest = {
        "format": FORMAT,
        "tasks": tasks,
        "rescalers": [float(x) for x in lam],  # json writes repr(float): float64 round-trips exactly
        "base": str(base_path) if base_path else None,
        "heads": head_names,
        "mask_bit_order": "big",
        "fingerprint": "blake2b-128 of each base tensor's float32 values",
        "fingerprints": fingerprints,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (folder / "README.md").write_text(_card(tasks, lam, base_path, bool(head_names)))


def _card(tasks: Sequence[str], lam: Tensor, base_path: Path | None, heads: bool) -> str:
    return "# EMR-Merging bundle (distac)\n\n" + _usage(tasks, lam, base_path, heads=heads)


def _usage(tasks: Sequence[str], lam: Tensor, base_path: Path | str | None, *, heads: bool) -> str:
    rows = "\n".join(f"| {t} | {float(x):.6g} |" for t, x in zip(tasks, lam, strict=True))
    own = "; each task keeps its own head (`heads/<task>.safetensors`)" if heads else ""
    return (
        "Not one model: task t is θ0 + λ_t · M_t ⊙ τ_uni (Huang et al., EMR-Merging, NeurIPS 2024, "
        f"arXiv 2405.17461){own}.\n"
        "Load it with `distac.merging.emr.load_emr_bundle(path).task(name)`, or export every task as a normal "
        "checkpoint with `distac export-tasks path --out DIR` (`distac.merging.emr.export_per_task(path, out)`).\n\n"
        f"Base model: `{base_path or 'given in memory: pass base= when loading'}`\n\n"
        f"| task | λ_t |\n|---|---|\n{rows}\n"
    )


def bundle_card(bundle: EMRBundle) -> str:
    """The model card's section for a bundle: what it is, how to load or export it, the base and each λ_t.

    Example:
        >>> "| a |" in bundle_card(emr_merge(base_sd, [sd_a], tasks=["a"]))  # doctest: +SKIP
        True
    """
    return "## EMR-Merging bundle\n\n" + _usage(
        bundle.tasks, bundle.rescalers, bundle.base_path, heads=bool(bundle.head_names)
    )


def load_emr_bundle(path: str | Path, *, base: Source | None = None) -> EMRBundle:
    """Open a bundle written by :func:`emr_merge` (lazily: tensors are read when a task is built).

    Args:
        path: the bundle folder.
        base: θ0 (path, state dict or source); default: the base path recorded in the bundle.

    Returns:
        The :class:`EMRBundle`.

    Example:
        >>> sd = load_emr_bundle("emr-bundle").task(0)  # doctest: +SKIP
    """
    folder = Path(path)
    man = _read_manifest(folder)
    if base is None and not man["base"]:
        raise DistacError(f"{folder}: the bundle was built from an in-memory base; pass base= to load it")
    base_src, base_path = as_source(base if base is not None else man["base"], "base")
    heads: dict[str, TensorSource] = {}
    if man["heads"]:
        heads = {t: open_checkpoint(folder / "heads" / f"{t}.safetensors") for t in man["tasks"]}
    return EMRBundle(
        list(man["tasks"]),
        torch.tensor(man["rescalers"], dtype=torch.float64),
        base_src,
        open_checkpoint(folder / "unified"),
        open_checkpoint(folder / "masks"),
        heads,
        list(man["heads"]),
        dict(man["fingerprints"]),
        str(base_path) if base_path else man["base"],
        folder,
    )


def _read_manifest(folder: Path) -> dict[str, Any]:
    f = folder / MANIFEST
    try:
        man = json.loads(f.read_text())
    except FileNotFoundError:
        raise DistacError(
            f"{folder}: not an EMR bundle (no {MANIFEST}); write one with emr_merge(..., out=...)"
        ) from None
    except (OSError, ValueError) as e:
        raise DistacError(f"{f}: cannot read the EMR manifest ({e})") from e
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        found = man.get("format") if isinstance(man, dict) else None
        raise DistacError(f"{f}: not a {FORMAT} manifest (format {found!r})")
    missing = [k for k in ("tasks", "rescalers", "base", "heads", "fingerprints") if k not in man]
    if missing or len(man["tasks"]) != len(man["rescalers"]):
        raise DistacError(f"{f}: damaged EMR manifest (missing {missing}, or not one λ per task)")
    return man


def export_into(bundle: EMRBundle, folder: Path, shard: int, quiet: bool) -> dict[str, Path]:
    """Write each task's θ̂_t into ``folder/<task>/`` (``folder`` exists, inside an atomic folder)."""
    base = bundle.base
    head_src = next(iter(bundle.heads.values()), None)
    head_set = set(bundle.head_names)

    def dtype(k: str) -> torch.dtype:
        return head_src.dtype(k) if head_src is not None and k in head_set else base.dtype(k)

    layout = [(k, base.shape(k), dtype(k)) for k in base.keys()]
    base_folder = Path(bundle.base_path) if bundle.base_path else None
    result = {}
    for t in track(bundle.tasks, desc="export (emr)", unit="task", quiet=quiet):
        dst = folder / t
        dst.mkdir()
        writer = ShardWriter(dst, layout, max_shard_bytes=shard, metadata={"distac_method": "emr", "distac_task": t})
        try:
            for k, v in bundle.iter_task(t):
                writer.write(k, v)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if base_folder is not None and base_folder.is_dir():
            copy_model_files(base_folder, dst)
        result[t] = dst
    return result


def export_per_task(
    bundle: EMRBundle | str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
    quiet: bool = False,
) -> dict[str, Path]:
    """Write every task's θ̂_t as a normal checkpoint folder ``out/<task>/`` (safetensors, HF shard names).

    The base's config/tokenizer files are copied in when the base is a folder, so each task folder
    loads like the base. Written atomically through the one output policy.

    Args:
        bundle: an :class:`EMRBundle` or a bundle folder.
        out: the folder to create (refused if it exists unless ``overwrite``).
        overwrite: replace an existing distac output at ``out``.
        max_shard_bytes: the largest shard.
        quiet: no progress bar.

    Returns:
        ``{task: folder}``.

    Example:
        >>> export_per_task("emr-bundle", "per-task")  # doctest: +SKIP
    """
    b = load_emr_bundle(bundle) if isinstance(bundle, str | Path) else bundle
    inputs = [p for p in (b.path, b.base_path) if p is not None]
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        export_into(b, tmp, parse_size(max_shard_bytes), quiet)
    return {t: Path(out) / t for t in b.tasks}

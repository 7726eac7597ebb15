"""The resumable state of a conditioning run: saved every ``save_every`` steps, restored only under equal settings.

A state holds the trainable parameters, Adam's and the scheduler's state, the curves so far and the
fingerprint of the settings (:meth:`~distac.conditioning.config.ConditionConfig.fingerprint` plus the
task). A setting added after a state was written compares at its default, so old states still resume.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DistacError
from ..io.atomic import atomic_file
from .config import ConditionConfig

if TYPE_CHECKING:
    from .distill import _Run

__all__ = ["CHECKPOINT", "load_checkpoint", "save_checkpoint"]

#: the file name of the state inside ``state_dir``
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, run: _Run, step: int) -> None:
    """Write the resumable state after ``step`` steps (atomically: a temporary file, then a rename)."""
    state = {
        "fingerprint": run.fingerprint,
        "step": step,
        "params": {n: p.detach().cpu().clone() for n, p in zip(run.names, run.params, strict=True)},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loss_curve": list(run.report.loss_curve),
        "norm_curve": [list(x) for x in run.report.norm_curve],
    }
    with atomic_file(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, run: _Run) -> int:
    """Restore a saved state into the live parameters/optimizer/scheduler; return the step to continue from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise DistacError(f"cannot read the conditioning state '{path}': {e}") from e
    if not isinstance(state, dict) or not {"fingerprint", "step", "params", "optimizer", "scheduler"} <= set(state):
        raise DistacError(f"'{path}' is not a distac conditioning state; use another state directory")
    _check_fingerprint(path, state["fingerprint"], run.fingerprint)
    with torch.no_grad():
        for n, p in zip(run.names, run.params, strict=True):
            p.copy_(state["params"][n].to(p.device, p.dtype))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.report.loss_curve = list(state.get("loss_curve", []))
    run.report.norm_curve = [(int(s), float(v)) for s, v in state.get("norm_curve", [])]
    return int(state["step"])


def _check_fingerprint(path: Path, saved: Any, now: dict[str, Any]) -> None:
    """A state resumes only under the same settings; a setting it predates had its default then."""
    saved = saved if isinstance(saved, dict) else {}
    defaults = ConditionConfig.defaults()
    diff = {k: (saved.get(k, defaults.get(k)), v) for k, v in now.items() if saved.get(k, defaults.get(k)) != v}
    if diff:
        raise DistacError(
            f"'{path}' was saved with other settings {diff} (saved, now); use another state directory or do not resume"
        )

"""distac: robust model merging.

Public API (everything else is internal and may change)::

    distac.merge(base, models, method="ties", **params)   # in-memory state dicts
    distac.TaskVector                                      # τ = θ_t − θ_0 algebra
    distac.METHODS / distac.get_method                     # the method registry
    distac.merge_checkpoints(config, out)                  # checkpoints on disk, streamed (YAML or dict)
    distac.open_checkpoint(path)                           # lazy reader for safetensors / HF dirs / .bin
    distac.fisher_diagonal / gram_matrices / adam_fisher   # curvature statistics (sum-scale Fishers)
    distac.save_stats / load_stats / check_stats           # statistics sidecars
    distac.diagnose / condition / calibrate                # DisTaC: flag, condition by distillation, calibrate
    distac.nn.data.load_inputs(path, tokenizer=...)           # unlabeled / labeled inputs from files
"""

from __future__ import annotations

from .conditioning import calibrate as calibrate
from .conditioning import condition as condition
from .conditioning import diagnose as diagnose
from .errors import DistacError as DistacError
from .io import open_checkpoint as open_checkpoint
from .merging.checkpoints import export_task_models as export_task_models
from .merging.checkpoints import merge_checkpoints as merge_checkpoints
from .merging.config import load_config as load_config
from .merging.engine import merge as merge
from .methods import METHODS as METHODS
from .methods import get_method as get_method
from .nn import data as data
from .stats import adam_fisher as adam_fisher
from .stats import check_stats as check_stats
from .stats import fisher_diagonal as fisher_diagonal
from .stats import gram_matrices as gram_matrices
from .stats import load_stats as load_stats
from .stats import save_stats as save_stats
from .taskvector import TaskVector as TaskVector
from .taskvector import split_heads as split_heads

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "DistacError",
    "TaskVector",
    "adam_fisher",
    "calibrate",
    "check_stats",
    "condition",
    "data",
    "diagnose",
    "export_task_models",
    "fisher_diagonal",
    "get_method",
    "gram_matrices",
    "load_config",
    "load_stats",
    "merge",
    "merge_checkpoints",
    "open_checkpoint",
    "save_stats",
    "split_heads",
]

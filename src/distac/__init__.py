"""distac: robust model merging — task vectors, 18 merge methods, curvature weighting and DisTaC conditioning.

The public API is the names below; everything else lives in subpackages and may change::

    distac.merge(base, models, "ties", **params)        # in-memory state dicts, every method
    distac.merge_checkpoints("merge.yml", "out/")       # checkpoints on disk, streamed (mergekit-style YAML)
    distac.emr_merge(base, models, out="bundle/")       # EMR-Merging: one unified model + per-task masks
    distac.TaskVector                                   # τ = θ_t − θ_0 algebra
    distac.METHODS, distac.get_method                   # the method records (formula, paper, defaults, memory)
    distac.open_checkpoint(path)                        # lazy reader: safetensors, shards, HF folders, .bin/.pt
    distac.fisher_diagonal, distac.gram_matrices        # curvature statistics (sum-scale Fishers, Grams)
    distac.save_stats, distac.load_stats                # statistics sidecars
    distac.diagnose, distac.condition, distac.calibrate # DisTaC: flag, condition by distillation, calibrate
    distac.tune                                         # hyperparameters chosen on your validation data
    distac.DistacError                                  # every user error; the message names the culprit

Subpackages: ``distac.merging`` (engine, configs, checkpoints, EMR), ``distac.methods``,
``distac.io``, ``distac.stats``, ``distac.conditioning``, ``distac.nn`` (models, data, metrics),
``distac.tuning``, ``distac.reproduce``.
"""

from __future__ import annotations

from .conditioning import calibrate as calibrate
from .conditioning import condition as condition
from .conditioning import diagnose as diagnose
from .errors import DistacError as DistacError
from .io import open_checkpoint as open_checkpoint
from .merging.checkpoints import merge_checkpoints as merge_checkpoints
from .merging.emr import emr_merge as emr_merge
from .merging.engine import merge as merge
from .methods import METHODS as METHODS
from .methods import get_method as get_method
from .stats import fisher_diagonal as fisher_diagonal
from .stats import gram_matrices as gram_matrices
from .stats import load_stats as load_stats
from .stats import save_stats as save_stats
from .taskvector import TaskVector as TaskVector
from .tuning import tune as tune

__version__ = "0.2.0"

__all__ = [
    "METHODS",
    "DistacError",
    "TaskVector",
    "calibrate",
    "condition",
    "diagnose",
    "emr_merge",
    "fisher_diagonal",
    "get_method",
    "gram_matrices",
    "load_stats",
    "merge",
    "merge_checkpoints",
    "open_checkpoint",
    "save_stats",
    "tune",
]

"""distac: robust model merging.

Public API (everything else is internal and may change)::

    distac.merge(base, models, method="ties", **params)   # in-memory state dicts
    distac.TaskVector                                      # τ = θ_t − θ_0 algebra
    distac.METHODS / distac.get_method                     # the method registry
"""

from __future__ import annotations

from .engine import merge as merge
from .errors import DistacError as DistacError
from .methods import METHODS as METHODS
from .methods import get_method as get_method
from .taskvector import TaskVector as TaskVector
from .taskvector import split_heads as split_heads

__version__ = "0.1.0"

__all__ = ["METHODS", "DistacError", "TaskVector", "get_method", "merge", "split_heads"]

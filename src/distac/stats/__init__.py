"""Statistics for curvature-weighted merging: diagonal Fishers, Adam second moments, Gram matrices.

Fishers are on the **sum** scale by default (H_t of Daheim et al.), Grams are running means
(official RegMean); every sidecar records its scale, estimator, example count and the fingerprints
of the model and the data.
"""

from __future__ import annotations

from .fisher import ESTIMATORS as ESTIMATORS
from .fisher import adam_fisher as adam_fisher
from .fisher import fisher_diagonal as fisher_diagonal
from .gram import gram_layouts as gram_layouts
from .gram import gram_matrices as gram_matrices
from .sidecar import Sidecar as Sidecar
from .sidecar import check_stats as check_stats
from .sidecar import load_stats as load_stats
from .sidecar import model_fingerprint as model_fingerprint
from .sidecar import open_sidecar as open_sidecar
from .sidecar import read_stats_metadata as read_stats_metadata
from .sidecar import save_stats as save_stats
from .sidecar import verify_sidecar as verify_sidecar

__all__ = [
    "ESTIMATORS",
    "Sidecar",
    "adam_fisher",
    "check_stats",
    "fisher_diagonal",
    "gram_layouts",
    "gram_matrices",
    "load_stats",
    "model_fingerprint",
    "open_sidecar",
    "read_stats_metadata",
    "save_stats",
    "verify_sidecar",
]

"""Hyperparameters chosen on the user's data: grid search (:func:`tune`) and AdaMerging (:func:`adamerging`)."""

from .adamerging import adamerging as adamerging
from .search import CRITERIA as CRITERIA
from .search import TunePoint as TunePoint
from .search import TuneResult as TuneResult
from .search import default_grid as default_grid
from .search import tune as tune

__all__ = ["CRITERIA", "TunePoint", "TuneResult", "adamerging", "default_grid", "tune"]

"""DisTaC: diagnose task vectors, condition them by distillation, calibrate the merged model.

See ``docs/distac.md`` for the thresholds, the defaults and the launch commands.
"""

from __future__ import annotations

from .calibrate import CalibrationResult as CalibrationResult
from .calibrate import calibrate as calibrate
from .calibrate import fit_temperature as fit_temperature
from .calibrate import read_temperatures as read_temperatures
from .calibrate import write_temperatures as write_temperatures
from .config import ConditionConfig as ConditionConfig
from .diagnose import DiagnoseReport as DiagnoseReport
from .diagnose import FlagRules as FlagRules
from .diagnose import TaskDiagnosis as TaskDiagnosis
from .diagnose import diagnose as diagnose
from .distill import ConditioningDiverged as ConditioningDiverged
from .distill import ConditionReport as ConditionReport
from .distill import ConditionResult as ConditionResult
from .distill import condition as condition
from .lowrank import FactoredVector as FactoredVector
from .lowrank import write_adapter as write_adapter

__all__ = [
    "CalibrationResult",
    "ConditionConfig",
    "ConditionReport",
    "ConditionResult",
    "ConditioningDiverged",
    "DiagnoseReport",
    "FactoredVector",
    "FlagRules",
    "TaskDiagnosis",
    "calibrate",
    "condition",
    "diagnose",
    "fit_temperature",
    "read_temperatures",
    "write_adapter",
    "write_temperatures",
]

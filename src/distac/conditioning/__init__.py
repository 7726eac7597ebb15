"""DisTaC: diagnose task vectors, condition them by distillation, calibrate the merged model.

See ``docs/distac.md`` for the thresholds, the defaults and the launch commands.
"""

from __future__ import annotations

from .calibrate import CalibrationResult as CalibrationResult
from .calibrate import calibrate as calibrate
from .calibrate import calibration_report as calibration_report
from .calibrate import fit_temperature as fit_temperature
from .calibrate import read_temperatures as read_temperatures
from .calibrate import write_temperatures as write_temperatures
from .diagnose import DiagnoseReport as DiagnoseReport
from .diagnose import TaskDiagnosis as TaskDiagnosis
from .diagnose import Thresholds as Thresholds
from .diagnose import diagnose as diagnose
from .distill import ConditioningDiverged as ConditioningDiverged
from .distill import ConditionReport as ConditionReport
from .distill import ConditionResult as ConditionResult
from .distill import condition as condition
from .distill import condition_with_report as condition_with_report

__all__ = [
    "CalibrationResult",
    "ConditionReport",
    "ConditionResult",
    "ConditioningDiverged",
    "DiagnoseReport",
    "TaskDiagnosis",
    "Thresholds",
    "calibrate",
    "calibration_report",
    "condition",
    "condition_with_report",
    "diagnose",
    "fit_temperature",
    "read_temperatures",
    "write_temperatures",
]

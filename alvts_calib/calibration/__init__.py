"""`calibrate`: capture each layer's inputs, solve its selector and skip map, measure sensitivity, refine the split.

Writes a calibration (`artifact/`); uses the runtime to measure routed layers.
"""

from .capture import input_device, move
from .joint_search import REFINE_EVALUATIONS, joint_divergences
from .pipeline import (
    HELDOUT_FRACTION,
    REFINE_STEPS,
    REPORT_KEEP_RATIO,
    CalibrationOptions,
    calibrate,
    calibration_options,
    default_rank,
)
from .sensitivity import SENSITIVITY_SAMPLES, kl_divergence
from .sweep_grid import GRID_COMPRESSIONS, budget_grid, coarse_grid

__all__ = [
    "GRID_COMPRESSIONS", "budget_grid", "coarse_grid",
    "HELDOUT_FRACTION", "REFINE_EVALUATIONS", "REFINE_STEPS", "REPORT_KEEP_RATIO", "SENSITIVITY_SAMPLES",
    "CalibrationOptions", "calibrate", "calibration_options", "default_rank", "input_device", "joint_divergences",
    "kl_divergence", "move",
]

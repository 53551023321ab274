"""What calibration hands to the runtime: the runtime config, budgets, the calibration and selector files
(one schema), and `export`, which turns a calibration into a selector artifact.
"""


from .budgets import Budget, allocate, parse_budget
from .calibration import CALIBRATION_FORMAT, Calibration, checkpoint_path, load_artifact, load_calibration
from .config import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    UNRECORDED_SKIPPED_KEYS,
    UNRECORDED_SKIPPED_UPDATE,
    RuntimeConfig,
    SkippedKeys,
    SkippedUpdate,
    check_skipped_update,
    default_skipped_update,
)
from .export import build_selector, calibrated_layers, export, keep_ratio_at, tokens_per_layer_at
from .selector import SELECTOR_FORMAT, Selector, load_selector, read_metadata

__all__ = [
    "CALIBRATION_FORMAT", "DEFAULT_BUDGET", "DEFAULT_SKIPPED_KEYS", "SELECTOR_FORMAT",
    "UNRECORDED_SKIPPED_KEYS", "UNRECORDED_SKIPPED_UPDATE", "Budget", "Calibration", "RuntimeConfig", "Selector",
    "SkippedKeys", "SkippedUpdate", "allocate", "build_selector", "calibrated_layers", "check_skipped_update",
    "checkpoint_path", "default_skipped_update", "export", "keep_ratio_at", "load_artifact", "load_calibration",
    "load_selector", "parse_budget", "read_metadata", "tokens_per_layer_at",
]

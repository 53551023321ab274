"""ALVTS: adaptive layer-wise visual token selection for transformers vision-language models.

The public names: calibrate, export and attach, the artifacts, the runtime's options and defaults, the data loaders,
and the evaluation harness. Each folder's `__init__` lists the rest of its public names.
"""

from .artifact.budgets import Budget
from .artifact.calibration import Calibration, load_calibration
from .artifact.config import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    RuntimeConfig,
    SkippedKeys,
    SkippedUpdate,
)
from .artifact.export import build_selector, export
from .artifact.selector import Selector, load_selector
from .calibration.pipeline import CalibrationOptions, calibrate
from .data import build_labelled_items, build_samples, load_records, single_sample
from .errors import AlvtsError, ArtifactError, ModelMismatchError, SampleError
from .evaluation.harness import EvalReport, evaluate
from .model.visual import visual_positions
from .runtime.attach import attach, attach_policies, attached_selector, detach
from .runtime.policies import LayerPolicy
from .selector.importance import Importance
from .selector.solver import Init
from .version import __version__

__all__ = [
    "DEFAULT_BUDGET", "DEFAULT_SKIPPED_KEYS", "AlvtsError", "ArtifactError", "Budget",
    "Calibration", "CalibrationOptions", "EvalReport", "Importance", "Init", "LayerPolicy", "ModelMismatchError",
    "RuntimeConfig", "SampleError", "Selector", "SkippedKeys", "SkippedUpdate", "__version__", "attach",
    "attach_policies", "attached_selector", "build_labelled_items", "build_samples", "build_selector", "calibrate",
    "detach", "evaluate", "export", "load_calibration", "load_records", "load_selector", "single_sample",
    "visual_positions",
]

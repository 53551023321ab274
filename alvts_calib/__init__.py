"""ALVTS: adaptive layer-wise visual token selection for transformers vision-language models."""

from .artifact.budgets import Budget
from .artifact.calibration import Calibration, load_calibration
from .artifact.config import SkippedKeys, SkippedUpdate
from .artifact.export import build_selector, export
from .artifact.selector import Selector, load_selector
from .calibration.pipeline import calibrate
from .errors import AlvtsError, ArtifactError, ModelMismatchError
from .model.visual import visual_positions
from .runtime.attach import attach, attach_policies, attached_selector, detach
from .selector.importance import Importance
from .selector.solver import Init
from .version import __version__

__all__ = [
    "AlvtsError", "ArtifactError", "Budget", "Calibration", "Importance", "Init", "ModelMismatchError", "Selector",
    "SkippedKeys", "SkippedUpdate", "__version__", "attach", "attach_policies", "attached_selector", "build_selector",
    "calibrate", "detach", "export", "load_calibration", "load_selector", "visual_positions",
]

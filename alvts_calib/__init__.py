"""ALVTS: adaptive layer-wise visual token selection for transformers vision-language models."""

__version__ = "0.1.0"

from .artifact import Selector, load_selector  # noqa: E402
from .attach import attach, attach_policies, attached_selector, detach  # noqa: E402
from .budgets import Budget  # noqa: E402
from .calibration import Calibration, load_calibration  # noqa: E402
from .errors import AlvtsError, ArtifactError, ModelMismatchError  # noqa: E402
from .export import build_selector, export  # noqa: E402
from .importance import Importance  # noqa: E402
from .pipeline import calibrate  # noqa: E402
from .routing import SkippedKeys, SkippedUpdate  # noqa: E402
from .solver import Init  # noqa: E402
from .visual import visual_positions  # noqa: E402

__all__ = [
    "AlvtsError", "ArtifactError", "Budget", "Calibration", "Importance", "Init", "ModelMismatchError", "Selector",
    "SkippedKeys", "SkippedUpdate", "attach", "attach_policies", "attached_selector", "build_selector", "calibrate",
    "detach", "export", "load_calibration", "load_selector", "visual_positions",
]

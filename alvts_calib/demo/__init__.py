"""The built-in demo: the trained shapes LLaVA checkpoint (`shapes-llava/`), its task and its training."""

from typing import Any

from .builtin import (
    BUILTIN_MODEL_DIR,
    BUILTIN_NAME,
    CALIBRATION_SAMPLES,
    EVALUATION_SAMPLES,
    builtin_model,
    builtin_processor,
)
from .shapes_model import shapes_processor
from .shapes_task import GRID, SPLIT_SEEDS, example, question_form, split_records, split_seeds, write_split

_TRAINING = ("accuracy", "question_inputs")  # from .train, imported on first use: `python -m alvts_calib.demo.train`
# runs that module, which must not be imported before


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_MODEL_DIR", "BUILTIN_NAME", "CALIBRATION_SAMPLES", "EVALUATION_SAMPLES", "GRID", "SPLIT_SEEDS",
    "accuracy", "builtin_model", "builtin_processor", "example", "question_form", "question_inputs",
    "shapes_processor", "split_records", "split_seeds", "write_split",
]

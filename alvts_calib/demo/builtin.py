"""The toolkit's built-in demo: the trained shapes LLaVA shipped with the package, and its data splits.

`alvts calibrate`, `export`, `eval` and `generate` use it when no `--model` is given, so every command runs on
a fresh machine with no download. It loads through the same `from_pretrained` path as any local checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AlvtsError
from ..model.loading import load_model, load_processor

BUILTIN_MODEL_DIR = Path(__file__).parent / "shapes-llava"
BUILTIN_NAME = "builtin:shapes-llava"
CALIBRATION_SAMPLES = 64
EVALUATION_SAMPLES = 1000


def builtin_model(dtype: str = "float32", attn_implementation: str = "sdpa", device: str | None = None) -> nn.Module:
    """The trained demo model (see `demo.train`), loaded from the package (onto `device`, a device_map)."""
    if not (BUILTIN_MODEL_DIR / "config.json").is_file():
        raise AlvtsError(
            f"the built-in demo model is missing from {BUILTIN_MODEL_DIR}; run python -m alvts_calib.demo.train"
        )
    return load_model(BUILTIN_MODEL_DIR, dtype=dtype, attn_implementation=attn_implementation, device=device)


def builtin_processor() -> Any:
    """The demo model's processor."""
    return load_processor(BUILTIN_MODEL_DIR)

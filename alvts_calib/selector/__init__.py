"""The selector's math: attention importance, the low-rank layer selector, its solver and the fitted skip maps.

Pure tensor code over one layer's inputs; imports `model/` and the base modules only.
"""

from .importance import DEFAULT_IMPORTANCE, Importance
from .layer import LayerSelector
from .skip_map import SkipUpdate, default_skip_update_rank
from .solver import Init, rope_svd_init

__all__ = [
    "DEFAULT_IMPORTANCE", "Importance", "Init", "LayerSelector", "SkipUpdate", "default_skip_update_rank",
    "rope_svd_init",
]

"""Inference: `attach` a selector artifact to a model; routed decoder layers, their policies, masks and cache."""

from .attach import attach, attach_policies, attached_selector, detach
from .context import ForwardContext
from .policies import KeepAllPolicy, LayerPolicy, RatioPolicy, SelectorPolicy
from .routing import COMPACT_RANGE, SCATTER_RANGE, SELECT_RANGE

__all__ = [
    "COMPACT_RANGE", "SCATTER_RANGE", "SELECT_RANGE", "ForwardContext", "KeepAllPolicy", "LayerPolicy", "RatioPolicy",
    "SelectorPolicy", "attach", "attach_policies", "attached_selector", "detach",
]

"""Inference: `attach` a selector artifact to a model; routed decoder layers, their policies, masks and cache."""

from .attach import attach, attach_policies, attached_selector, detach
from .context import ForwardContext
from .policies import KeepAllPolicy, LayerPolicy, RatioPolicy, SelectorPolicy
from .routing import ROUTED_RANGES

__all__ = [
    "ROUTED_RANGES", "ForwardContext", "KeepAllPolicy", "LayerPolicy", "RatioPolicy",
    "SelectorPolicy", "attach", "attach_policies", "attached_selector", "detach",
]

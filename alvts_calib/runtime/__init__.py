"""Inference: `attach` a selector artifact to a model; routed decoder layers, their policies, masks and cache."""

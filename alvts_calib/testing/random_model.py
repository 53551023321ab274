"""The built-in default: a tiny LLaVA-architecture model built from a config, with synthetic inputs.

It lets every command run on a fresh machine with no checkpoint. Its weights are random, so its selector
fidelity says nothing about real models; a trained demo model is tracked separately.
"""

from __future__ import annotations

import torch

from ..model.adapters import decoder_layers
from .tiny_models import tiny_inputs, tiny_llava

DEMO_NAME = "builtin:tiny-llava (random weights)"
ATTENTION_SHARPENING = 4.0  # random weights attend almost uniformly; sharper q/k make importance content-dependent


def sharpen_attention(model: torch.nn.Module, factor: float = ATTENTION_SHARPENING) -> torch.nn.Module:
    """Scale every decoder layer's query and key weights by `factor` in place; returns `model`."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def demo_model(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The built-in tiny LLaVA model (seeded, identical on every machine), with sharpened attention."""
    return sharpen_attention(tiny_llava(attn_implementation=attn_implementation, seed=0))


def demo_samples(model: torch.nn.Module, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` synthetic calibration samples (batches of 2 left-padded rows with 16 visual tokens each)."""
    return [tiny_inputs(model, batch=2, seed=seed) for seed in range(count)]

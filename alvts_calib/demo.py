"""The built-in default: a tiny LLaVA-architecture model built from a config, with synthetic inputs.

It lets every command run on a fresh machine with no checkpoint. Its weights are random, so its selector
fidelity says nothing about real models; a trained demo model is tracked separately.
"""

from __future__ import annotations

import torch

from .tiny_models import tiny_inputs, tiny_llava

DEMO_NAME = "builtin:tiny-llava (random weights)"


def demo_model(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The built-in tiny LLaVA model (seeded, identical on every machine)."""
    return tiny_llava(attn_implementation=attn_implementation, seed=0)


def demo_samples(model: torch.nn.Module, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` synthetic calibration samples (batches of 2 left-padded rows with 16 visual tokens each)."""
    return [tiny_inputs(model, batch=2, seed=seed) for seed in range(count)]

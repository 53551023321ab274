"""The routed layer's input norm over a whole sequence, computed with fewer passes when it is a plain RMSNorm.

Selection, the pooled stand-in and the skipped update read the normed input of every position, which the layer's
own norm computes in four passes over the sequence (square, mean, scale, weight). A plain RMSNorm (weight * x /
rms(x), the ratio taken in float32, as Llama's and Qwen2's are) needs one reduction and two multiplies (the second in
place where the dtypes allow). Whether a norm is one is checked on a probe when the layer is routed; any other norm
runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PROBE_TOLERANCE = 1e-3  # relative and absolute, loose enough for bfloat16 rounding


def sequence_norm(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`norm` itself, or a cheaper equal form of it for (B, L, D) inputs when it is a plain RMSNorm."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return norm
    if weight.device.type == "meta":  # offloaded: nothing to probe with
        return norm

    def rms_norm(states: torch.Tensor) -> torch.Tensor:
        length = torch.linalg.vector_norm(states, dim=-1, keepdim=True, dtype=torch.float32)
        scale = torch.rsqrt(length.square() / states.shape[-1] + eps)
        normed = (states.float() * scale).to(states.dtype)
        return normed.mul_(weight) if weight.dtype == normed.dtype else weight * normed  # promotes as the norm does

    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], device=weight.device, generator=generator).to(weight.dtype)
    with torch.no_grad():
        same = torch.allclose(rms_norm(probe), norm(probe), rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE)
    return rms_norm if same else norm

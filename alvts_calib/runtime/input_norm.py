"""The routed layer's input norm over a whole sequence, kept factored when it is a plain RMSNorm.

Selection, the pooled stand-in and the skipped update read the normed input of every position. A plain RMSNorm
(weight * x / rms(x), the ratio taken in float32, as Llama's and Qwen2's are) is `states * scale * weight` with one
scale per position and one weight per channel, and what those steps compute of it is linear: projections (the
selector's keys, the skip map's down-projection) and weighted sums (the stand-in's and the anchor's mean). So the
routed layer keeps it factored (`NormedSequence`): one reduction over the sequence for the scales, projections of
the states themselves with the norm's weight folded into the projection (`NormedProjection`, folded once when the
layer is routed) and scaled afterwards, and no normed copy of the sequence. Whether a norm is such an RMSNorm is
checked on a probe when the layer is routed; any other norm, and float16 (whose range the unnormed states may
exceed in a projection), runs the norm as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from ..tokens import at_positions

PROBE_TOLERANCE = 1e-3  # relative and absolute, loose enough for bfloat16 rounding


@dataclass(eq=False)
class NormedSequence:
    """A layer's normed input (B, L, D): `states * scale * weight` when factored (`scale` (B, L, 1) float32, `weight`
    (D,)), else `states` itself."""

    states: torch.Tensor
    scale: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def factored(self) -> bool:
        return self.scale is not None

    def dense(self) -> torch.Tensor:
        """The normed input as one tensor (made once, on first use, when factored)."""
        if not self.factored:
            return self.states
        if self._dense is None:
            normed = (self.states.float() * self.scale).to(self.states.dtype)
            weight = self.weight
            self._dense = normed.mul_(weight) if weight.dtype == normed.dtype else weight * normed  # as the norm
        return self._dense

    def gathered(self, gather: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor | None = None):
        """The normed input at the positions `gather` picks ((B, L, ...) to (B, L', ...)); `states`: those positions'
        states if already gathered."""
        if not self.factored:
            return NormedSequence(gather(self.states))
        return NormedSequence(gather(self.states) if states is None else states, gather(self.scale), self.weight)

    def rows(self, positions: torch.Tensor) -> NormedSequence:
        """The normed input at `positions` (B, Q) (`tokens.at_positions`)."""
        return self.gathered(lambda values: at_positions(values, positions))

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, P, D): for (B, P, L) weights, each row's weighted sums of its normed positions (one read of states)."""
        if not self.factored:
            return torch.bmm(weights.to(self.states.dtype), self.states)
        dtype = torch.promote_types(self.states.dtype, self.weight.dtype)  # the norm's output dtype
        total = torch.bmm((weights * self.scale.transpose(1, 2)).to(dtype), self.states.to(dtype))
        return total.mul_(self.weight)


@dataclass(frozen=True)
class NormedProjection:
    """A linear map of a layer's normed input: `linear(normed)`, the norm's weight folded into `weight` when the
    layer's norm is kept factored (`folded`)."""

    weight: torch.Tensor  # (R, D)
    bias: torch.Tensor | None
    folded: bool

    def __call__(self, normed: NormedSequence) -> torch.Tensor:
        """(B, L, R), in the weight's dtype."""
        if normed.factored != self.folded:
            raise ValueError("a NormedProjection applies only to the normed input of the norm that made it")
        states = normed.states.to(self.weight.dtype)
        if not self.folded:
            return functional.linear(states, self.weight, self.bias)
        projected = functional.linear(states, self.weight).float().mul_(normed.scale)
        if self.bias is not None:
            projected += self.bias
        return projected.to(states.dtype)


class SequenceNorm:
    """A decoder layer's input norm over whole sequences: `NormedSequence`s, factored for a plain RMSNorm."""

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.weight, self.eps = _plain_rms_parameters(norm)

    @property
    def factored(self) -> bool:
        return self.weight is not None

    def __call__(self, states: torch.Tensor) -> NormedSequence:
        if not self.factored:
            return NormedSequence(self.norm(states))
        return NormedSequence(states, _rms_scale(states, self.eps), self.weight)

    def projection(self, linear: nn.Linear) -> NormedProjection:
        """`linear` as a map of this norm's `NormedSequence`s (its weight times the norm's, when factored)."""
        if not self.factored:
            return NormedProjection(linear.weight, linear.bias, folded=False)
        folded = (linear.weight.float() * self.weight.float()).to(linear.weight.dtype)
        return NormedProjection(folded, linear.bias, folded=True)


def _rms_scale(states: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, L, 1) float32: 1 / rms of each position's states (one reduction over the sequence)."""
    length = torch.linalg.vector_norm(states, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(length.square() / states.shape[-1] + eps)


def _plain_rms_parameters(norm: nn.Module) -> tuple[torch.Tensor | None, float | None]:
    """(weight, eps) if `norm` computes weight * x / rms(x) (checked on a probe), else (None, None)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None, None
    if weight.device.type == "meta" or weight.dtype == torch.float16:  # offloaded: nothing to probe with; float16
        return None, None
    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], device=weight.device, generator=generator).to(weight.dtype)
    candidate = NormedSequence(probe, _rms_scale(probe, eps), weight)
    with torch.no_grad():
        same = torch.allclose(candidate.dense(), norm(probe), rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE)
    return (weight, eps) if same else (None, None)

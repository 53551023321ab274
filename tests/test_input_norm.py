"""`SequenceNorm`: the routed layer's input norm over whole sequences, kept factored for plain RMSNorms, equal to them
in what the runtime reads of it (the normed tensor, projections, weighted sums)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alvts_calib.model.adapters import decoder_layers
from alvts_calib.runtime.input_norm import NormedSequence, SequenceNorm
from alvts_calib.testing.tiny_models import TINY_MODELS


def _rms_norm(tiny_case, family: str, dtype: torch.dtype) -> nn.Module:
    norm = decoder_layers(tiny_case(family, "sdpa").model)[1].input_layernorm.to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("family", list(TINY_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_are_kept_factored_and_equal_the_norm(tiny_case, family, dtype):
    norm = _rms_norm(tiny_case, family, dtype)
    sequence_norm = SequenceNorm(norm)
    states = (torch.randn(2, 7, norm.weight.shape[0]) * 3).to(dtype)
    normed = sequence_norm(states)
    assert normed.factored and normed.states is states  # no normed copy made
    tolerance = 1e-6 if dtype is torch.float32 else 1e-2
    torch.testing.assert_close(normed.dense(), norm(states), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_and_weighted_sums_of_the_factored_form_equal_those_of_the_normed_tensor(tiny_case, dtype):
    norm = _rms_norm(tiny_case, "llama", dtype)
    width = norm.weight.shape[0]
    sequence_norm = SequenceNorm(norm)
    linear = nn.Linear(width, 5).to(dtype)
    states = (torch.randn(2, 7, width) * 3).to(dtype)
    normed = sequence_norm(states)
    expected = norm(states)
    tolerance = 1e-5 if dtype is torch.float32 else 3e-2
    projected = sequence_norm.projection(linear)(normed)
    torch.testing.assert_close(projected, linear(expected), rtol=tolerance, atol=tolerance)
    weights = torch.rand(2, 3, 7)
    torch.testing.assert_close(
        normed.weighted_sum(weights), torch.bmm(weights.to(dtype), expected), rtol=tolerance, atol=tolerance
    )
    positions = torch.tensor([[6, 0], [2, 7]])  # 7: past the end, reads the last position (`at_positions`)
    torch.testing.assert_close(
        normed.rows(positions).dense(), expected[torch.tensor([[0], [1]]), positions.clamp(max=6)],
        rtol=tolerance, atol=tolerance,
    )


def test_a_float32_weight_on_bfloat16_states_promotes_as_the_norm_does(tiny_case):
    norm = _rms_norm(tiny_case, "llama", torch.float32)
    states = (torch.randn(2, 7, norm.weight.shape[0]) * 3).bfloat16()
    expected = norm(states)
    assert expected.dtype == torch.float32
    normed = SequenceNorm(norm)(states)
    torch.testing.assert_close(normed.dense(), expected, rtol=1e-6, atol=1e-6)
    # the norm rounds x / rms(x) to bfloat16 before the weight; the factored sum does not (so it is the closer one)
    torch.testing.assert_close(normed.weighted_sum(torch.ones(2, 1, 7)), expected.sum(1, keepdim=True),
                               rtol=3e-2, atol=3e-2)


def test_a_projection_refuses_the_normed_input_of_another_kind_of_norm(tiny_case):
    norm = _rms_norm(tiny_case, "llama", torch.float32)
    width = norm.weight.shape[0]
    folded = SequenceNorm(norm).projection(nn.Linear(width, 3))
    with pytest.raises(ValueError, match="norm that made it"):
        folded(NormedSequence(torch.randn(1, 4, width)))


def test_other_norms_and_float16_run_as_they_are(tiny_case):
    layer_norm = nn.LayerNorm(8)
    states = torch.randn(1, 4, 8)
    normed = SequenceNorm(layer_norm)(states)
    assert not normed.factored
    torch.testing.assert_close(normed.dense(), layer_norm(states))
    assert not SequenceNorm(_rms_norm(tiny_case, "llama", torch.float16)).factored  # projections could overflow

    class ShiftedRMSNorm(nn.Module):  # Gemma's form, weight offset by one: same attributes, different result
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.full((8,), 0.5))
            self.variance_epsilon = 1e-6

        def forward(self, states):
            scale = torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * states * scale

    shifted = ShiftedRMSNorm()
    assert not SequenceNorm(shifted).factored
    torch.testing.assert_close(SequenceNorm(shifted)(states).dense(), shifted(states))

"""`sequence_norm`: the routed layer's input norm over whole sequences, cheaper for plain RMSNorms and equal to them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alvts_calib.model.adapters import decoder_layers
from alvts_calib.runtime.input_norm import sequence_norm
from alvts_calib.testing.tiny_models import TINY_MODELS


@pytest.mark.parametrize("family", list(TINY_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_get_an_equal_cheaper_form(tiny_case, family, dtype):
    norm = decoder_layers(tiny_case(family, "sdpa").model)[1].input_layernorm.to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    fast = sequence_norm(norm)
    assert fast is not norm
    states = (torch.randn(2, 7, norm.weight.shape[0]) * 3).to(dtype)
    tolerance = 1e-6 if dtype is torch.float32 else 1e-2
    torch.testing.assert_close(fast(states), norm(states), rtol=tolerance, atol=tolerance)


def test_a_float32_weight_on_bfloat16_states_promotes_as_the_norm_does(tiny_case):
    norm = decoder_layers(tiny_case("llama", "sdpa").model)[1].input_layernorm.float()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    states = (torch.randn(2, 7, norm.weight.shape[0]) * 3).bfloat16()
    expected = norm(states)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(sequence_norm(norm)(states), expected, rtol=1e-6, atol=1e-6)


def test_other_norms_run_as_they_are():
    layer_norm = nn.LayerNorm(8)
    assert sequence_norm(layer_norm) is layer_norm

    class ShiftedRMSNorm(nn.Module):  # Gemma's form, weight offset by one: same attributes, different result
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.full((8,), 0.5))
            self.variance_epsilon = 1e-6

        def forward(self, states):
            scale = torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (1 + self.weight) * states * scale

    shifted = ShiftedRMSNorm()
    assert sequence_norm(shifted) is shifted

"""The pooled stand-in's logit bias folded into attention (`runtime.key_bias`): exact, mask-free under SDPA, and the
same under FlashAttention's contract (emulated on the CPU: causal, bottom-right aligned, a 2-D padding mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from alvts_calib.runtime.attach import attach, detach
from alvts_calib.runtime.key_bias import fold_key_bias
from alvts_calib.testing.tiny_models import TINY_MODELS

RATIO = 0.25


@pytest.mark.parametrize("head_dim", [8, 13, 128])
def test_folded_channels_add_the_bias_to_every_logit(head_dim):
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, length, head_dim) for length in (5, 9, 9))
    bias = torch.randn(2, 9).abs() * 3
    scaling = head_dim**-0.5
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)
    additive = torch.where(causal, bias[:, None, None, :], float("-inf"))
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=additive, scale=scaling)
    folded = fold_key_bias(query, key, value, bias, scaling)
    assert all(tensor.shape[-1] % 8 == 0 and tensor.shape[-1] > head_dim for tensor in folded)
    output = F.scaled_dot_product_attention(*folded, attn_mask=causal, scale=scaling)
    torch.testing.assert_close(output[..., :head_dim], expected, atol=1e-5, rtol=1e-5)
    assert not output[..., head_dim:].any(), "the extra value channels stay zero"


def _flash_contract(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """FlashAttention-2's contract on the CPU: no bias, causal aligned to the last key, `attention_mask` None or a
    (B, L_k) padding mask, head dims a multiple of 8 and equal for keys and values."""
    assert query.shape[-1] % 8 == 0 and key.shape[-1] == value.shape[-1] == query.shape[-1]
    assert attention_mask is None or attention_mask.dim() == 2
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_length, k_length = query.shape[2], key.shape[2]
    allowed = torch.ones(q_length, k_length, dtype=torch.bool).tril(k_length - q_length)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


def _set_backend(model, name: str) -> None:
    model.config.get_text_config(decoder=True)._attn_implementation = name


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_pooled_runtime_under_flash_attention_matches_sdpa(tiny_case, make_selector, with_random_skip_updates,
                                                           family, monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "flash_attention_2", _flash_contract)
    case = tiny_case(family, "sdpa")
    model = case.model
    selector = with_random_skip_updates(make_selector(model, RATIO))
    results = {}
    for backend in ("sdpa", "flash_attention_2"):
        _set_backend(model, backend)
        attach(model, selector, skipped_keys="pool", skipped_update="linear")
        try:
            with case.routing():
                logits = model(**case.inputs).logits
                tokens = model.generate(**case.inputs, do_sample=False, max_new_tokens=4)
        finally:
            detach(model)
        results[backend] = logits, tokens
    valid = case.valid
    torch.testing.assert_close(results["flash_attention_2"][0][valid], results["sdpa"][0][valid], atol=1e-4, rtol=0)
    assert torch.equal(results["flash_attention_2"][1], results["sdpa"][1])


def test_pooled_sdpa_prefill_runs_plain_causal_attention(tiny_case, make_selector, monkeypatch):
    calls = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, attention_mask, *args, **kwargs):  # sees the folded inputs
        calls.append((query.shape[-1] > module.head_dim, query.shape[2], attention_mask))
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", recording)
    case = tiny_case("llava", "sdpa", batch=1)
    attach(case.model, make_selector(case.model, RATIO), skipped_keys="pool")
    case.model.generate(**case.inputs, do_sample=False, max_new_tokens=2)
    routed = [(length, mask) for folded, length, mask in calls if folded]
    assert routed, "routed layers pass the stand-in's bias"
    assert all(mask is None for _, mask in routed), "no float mask: prefill is causal, a decoding step sees all"
    assert {length > 1 for length, _ in routed} == {True, False}, "prefill and decoding steps both carry the bias"

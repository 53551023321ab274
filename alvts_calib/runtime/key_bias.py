"""A pooled stand-in's logit bias folded into attention exactly, so SDPA and FlashAttention run without a float mask.

Routed layers give each key a logit bias (a stand-in's log count, 0 for every other key). Added through an additive
mask it keeps SDPA off its causal fast path and FlashAttention cannot take it at all. Folded instead: every query
gets one more channel holding 1, every key one holding bias / scaling and every value one holding 0, so each logit
gains exactly the bias and the extra output channel (always 0) is dropped. The head dimension grows to the next
multiple of 8 (zero channels), which fused kernels need. The backend then runs plain causal
attention with at most a boolean padding mask, in prefill and decoding alike.

The fold wraps the SDPA and FlashAttention entries of transformers' attention registry once; the wrapper calls the
original unchanged unless a routed layer passes `KEY_BIAS_KWARG`, so every other call stays bit-exact. Eager
attention takes the bias in its additive mask, which it builds anyway (`masks.routed_attention_mask`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .masks import FLASH, SDPA

KEY_BIAS_KWARG = "alvts_key_bias"  # (B, L_k) float32 logit bias per key, passed through the attention kwargs
FOLDED = (SDPA, *FLASH)
_WRAPPED = "_alvts_folds_key_bias"


def folds_key_bias(implementation: str) -> bool:
    """Whether routed layers pass the key bias to `implementation` folded into its inputs (else: in the mask)."""
    return implementation in FOLDED


def fold_key_bias(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, value) (B, H, L, d) widened by the channels that add `bias` (B, L_k) to every logit at `scaling`:
    the first extra channel holds 1 in queries and bias / scaling in keys, the others (up to a multiple of 8) 0."""
    extra = 8 - query.shape[-1] % 8
    unit = query.new_zeros(extra)
    unit[0] = 1
    column = (bias.float() / scaling).to(key.dtype)[:, None, :, None] * unit.to(key.dtype)
    return (
        torch.cat([query, unit.expand(*query.shape[:-1], extra)], -1),
        torch.cat([key, column.expand(*key.shape[:-1], extra)], -1),
        torch.cat([value, value.new_zeros(*value.shape[:-1], extra)], -1),
    )


def _folding(attention: Callable) -> Callable:
    def attention_with_key_bias(module, query, key, value, attention_mask, *args, **kwargs):
        bias = kwargs.pop(KEY_BIAS_KWARG, None)
        if bias is None:
            return attention(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        kwargs["scaling"] = scaling  # the backend's default would read the widened head dimension
        folded = fold_key_bias(query, key, value, bias, scaling)
        output, weights = attention(module, *folded, attention_mask, *args, **kwargs)
        return output[..., : value.shape[-1]], weights

    setattr(attention_with_key_bias, _WRAPPED, True)
    return attention_with_key_bias


def install_key_bias_folding() -> None:
    """Wrap the registry's SDPA and FlashAttention functions (once per process; see the module doc)."""
    for name in FOLDED:
        if name in ALL_ATTENTION_FUNCTIONS and not getattr(ALL_ATTENTION_FUNCTIONS[name], _WRAPPED, False):
            ALL_ATTENTION_FUNCTIONS[name] = _folding(ALL_ATTENTION_FUNCTIONS[name])

"""Attention masks for routed layers, in the form each attention backend expects.

A routed layer sees a compact sequence (kept tokens in original order, then batch fillers) after whatever it
cached earlier; causality in compact order equals causality in sequence order, so a mask only needs which
keys are valid. Masks are skipped where the backend's causal path already gives the right answer.
"""

from __future__ import annotations

import torch

from ..errors import AlvtsError

EAGER = "eager"
SDPA = "sdpa"
FLASH = ("flash_attention_2", "flash_attention_3")
SUPPORTED_BACKENDS = (EAGER, SDPA, *FLASH)


def check_backend(implementation: str | None) -> None:
    """Fail unless routed layers support `implementation`."""
    if implementation not in SUPPORTED_BACKENDS:
        raise AlvtsError(
            f"attention implementation {implementation!r} is not supported by routed layers; "
            f"load the model with attn_implementation one of {', '.join(SUPPORTED_BACKENDS)}"
        )


def routed_attention_mask(
    key_valid: torch.Tensor,
    query_length: int,
    implementation: str,
    dtype: torch.dtype,
    all_valid: bool | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Mask for `query_length` new queries over keys whose validity is `key_valid` (B, L_k), or None.

    The last `query_length` keys are the queries' own. Returns a 2-D key mask for FlashAttention, a 4-D bool
    mask for SDPA and a 4-D additive mask for eager attention. `all_valid`, when the caller knows it, saves
    reading `key_valid` on the host. `key_bias` (B, L_k), added to the attention logits of each key (a pooled
    stand-in's log count), goes into eager attention's additive mask; SDPA and FlashAttention get it folded into
    their inputs instead (`key_bias.fold_key_bias`).
    """
    if key_bias is not None and implementation != EAGER:
        raise AlvtsError(f"{implementation!r} takes the key bias folded into its inputs, not in its mask")
    all_valid = bool(key_valid.all()) if all_valid is None else all_valid
    past = key_valid.shape[1] - query_length
    if implementation in FLASH:
        return None if all_valid else key_valid.to(torch.long)
    if key_bias is None and all_valid and (query_length == 1 or (past == 0 and implementation == SDPA)):
        return None
    rows = torch.arange(query_length, device=key_valid.device)[:, None] + past
    cols = torch.arange(key_valid.shape[1], device=key_valid.device)[None, :]
    allowed = (cols <= rows)[None, None] & key_valid[:, None, None, :]
    if implementation == SDPA:
        return allowed
    if implementation == EAGER:
        if key_bias is None:
            bias = torch.zeros((), dtype=dtype, device=key_valid.device)
        else:
            bias = key_bias.to(dtype)[:, None, None, :]
        return torch.where(allowed, bias, torch.finfo(dtype).min)
    raise AlvtsError(f"no routed mask for attention implementation {implementation!r}")

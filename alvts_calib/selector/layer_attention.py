"""A decoder layer's own rotated queries and keys, computed from its normed input (q_proj/k_proj plus RoPE)."""

from __future__ import annotations

import torch
from torch import nn

from .importance import apply_rope


def _rotated_heads(
    projection: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """`projection(states)` split into heads (B, H, L, d) and rotated with cos/sin for those positions."""
    batch, length = states.shape[:2]
    heads = projection(states).view(batch, length, -1, head_dim).transpose(1, 2)
    return apply_rope(heads, cos, sin)


def layer_queries_keys(
    layer: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated queries (B, H, L, d) and keys (B, H_kv, L, d) of `layer` for normed states (B, L, D)."""
    attention = layer.self_attn
    return (
        _rotated_heads(attention.q_proj, normed, cos, sin, head_dim),
        _rotated_heads(attention.k_proj, normed, cos, sin, head_dim),
    )


def last_query_attention(
    layer: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """(B, L) head-averaged attention of the last position over all valid positions (no attention weights needed).

    Only the last position's query is projected, so this costs one key projection plus one attention row.
    """
    attention = layer.self_attn
    query = _rotated_heads(attention.q_proj, normed[:, -1:], cos[:, -1:], sin[:, -1:], head_dim)
    keys = _rotated_heads(attention.k_proj, normed, cos, sin, head_dim)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)).squeeze(2) * head_dim**-0.5
    probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1)
    return probs.mean(dim=1)

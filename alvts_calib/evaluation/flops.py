"""Approximate prefill FLOPs of a decoder layer (matmuls only), for comparing methods at matched budgets."""

from __future__ import annotations

from ..model.adapters import AttentionGeometry


def layer_flops(num_tokens: float, geometry: AttentionGeometry, intermediate_size: int) -> float:
    """FLOPs of one decoder layer over `num_tokens` positions with causal attention among them.

    Projections: q, k, v, o and a gated MLP (3 matrices); attention: QK^T and AV over the causal triangle.
    """
    hidden, head_dim = geometry.hidden_size, geometry.head_dim
    attention_width = head_dim * (2 * geometry.num_heads + 2 * geometry.num_kv_heads)  # q and o, k and v
    projections = hidden * attention_width + 3 * hidden * intermediate_size
    return 2.0 * num_tokens * projections + 2.0 * geometry.num_heads * head_dim * num_tokens * (num_tokens + 1)


def skip_update_flops(num_tokens: float, hidden_size: int, rank: int) -> float:
    """FLOPs of a fitted skip update (`skip_update.SkipUpdate`, hidden -> rank -> hidden) on `num_tokens` tokens."""
    return 2.0 * num_tokens * 2 * hidden_size * rank

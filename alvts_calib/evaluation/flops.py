"""Approximate prefill FLOPs of a decoder layer (matmuls only), for comparing methods at matched budgets."""

from __future__ import annotations

from collections.abc import Iterable

from ..model.adapters import AttentionGeometry


def projection_flops(geometry: AttentionGeometry, intermediate_size: int) -> dict[str, float]:
    """Matmul FLOPs per token of each projection group: queries, keys and values, output, gated MLP (3 matrices)."""
    hidden, head_dim = geometry.hidden_size, geometry.head_dim
    width = geometry.num_heads * head_dim
    return {"q": 2.0 * hidden * width, "kv": 2.0 * hidden * 2 * geometry.num_kv_heads * head_dim,
            "o": 2.0 * width * hidden, "mlp": 2.0 * 3 * hidden * intermediate_size}


def attention_flops(num_tokens: float, geometry: AttentionGeometry) -> float:
    """QK^T and AV over the causal triangle of `num_tokens` positions."""
    return 2.0 * geometry.num_heads * geometry.head_dim * num_tokens * (num_tokens + 1)


def layer_flops(num_tokens: float, geometry: AttentionGeometry, intermediate_size: int) -> float:
    """FLOPs of one decoder layer over `num_tokens` positions with causal attention among them."""
    return num_tokens * sum(projection_flops(geometry, intermediate_size).values()) + attention_flops(
        num_tokens, geometry
    )


def keys_all_layer_flops(
    processed: float, total: float, geometry: AttentionGeometry, intermediate_size: int
) -> float:
    """FLOPs of a layer that runs on `processed` of `total` positions but reads every position's key and value: the
    skipped positions' key and value projections, and the processed queries' share of causal attention over all
    positions (the `keys-all` layout of docs/SERVING.md, which needs an attention kernel for a subset of queries)."""
    unit = projection_flops(geometry, intermediate_size)
    share = processed / total if total else 0.0
    return processed * sum(unit.values()) + (total - processed) * unit["kv"] + share * attention_flops(total, geometry)


def attention_on_all_layer_flops(
    processed: float, total: float, geometry: AttentionGeometry, intermediate_size: int
) -> float:
    """FLOPs of a layer whose attention (projections included) runs on all `total` positions and its MLP on the
    `processed` ones: SkippedKeys.ALL in this runtime (docs/SERVING.md's `engine` layout also saves the skipped
    tokens' output projection)."""
    unit = projection_flops(geometry, intermediate_size)
    return total * (unit["q"] + unit["kv"] + unit["o"]) + attention_flops(total, geometry) + processed * unit["mlp"]


def decoder_flops(
    positions: Iterable[float], total: float, geometry: AttentionGeometry, intermediate_size: int, keys_all: bool
) -> float:
    """FLOPs of the decoder layers processing `positions` of `total` tokens each (`keys_all`: SkippedKeys.ALL, whose
    attention runs on every token)."""
    if keys_all:
        return sum(attention_on_all_layer_flops(n, total, geometry, intermediate_size) for n in positions)
    return sum(layer_flops(n, geometry, intermediate_size) for n in positions)


def skip_update_flops(num_tokens: float, hidden_size: int, rank: int) -> float:
    """FLOPs of a fitted skip update (`skip_update.SkipUpdate`, hidden -> rank -> hidden) on `num_tokens` tokens."""
    return 2.0 * num_tokens * 2 * hidden_size * rank

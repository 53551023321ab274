"""The routing variants the speed benchmark compares, at matched budgets, and their ideal decoder FLOP ratio.

Selectors come from the RoPE-aware weight SVD of each layer (`rope_svd_init`, rank 2 x head_dim), so the
runtime runs its real code path without calibration data. The adaptive variant is a *synthetic* allocation
with the same average tokens per routed layer as the uniform one (alternating 1.5x / 0.5x the uniform count):
for speed only the token counts matter, not which layers get them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from alvts_calib.artifact import Selector, SkippedKeys, SkippedUpdate, default_skipped_update
from alvts_calib.evaluation import alvts_plan, fastv_plan, layer_flops, pyramid_plan
from alvts_calib.model import AttentionGeometry
from alvts_calib.runtime import LayerPolicy, SelectorPolicy
from alvts_calib.selector import DEFAULT_IMPORTANCE, default_skip_update_rank
from alvts_calib.testing import weight_svd_selector as svd_selector

COMPRESSIONS = (0.67, 0.78, 0.89)
SELECTOR_HEADS = 2  # rank 2 x head_dim: the calibration default at 7B width (head_dim 128, rank 256)


@dataclass
class Variant:
    """One row of the comparison: a method at one compression, as per-layer policies (None: the unpatched model)."""

    method: str
    compression: float | None
    policies: dict[int, LayerPolicy] | None
    planned_tokens: list[int]  # visual tokens processed per decoder layer
    skipped_keys: SkippedKeys = SkippedKeys.DROP
    skipped_update: SkippedUpdate = SkippedUpdate.NONE


def weight_svd_selector(model: nn.Module, start_layer: int = 1) -> Selector:
    """A Selector from each layer's RoPE-aware weight SVD (no calibration data), for layers start_layer and up,
    scored by the default importance, with randomly initialised skip-update maps of the default rank (for speed only
    their shapes matter)."""
    skip_rank = default_skip_update_rank(AttentionGeometry.of(model).hidden_size)
    return svd_selector(model, start_layer=start_layer, heads=SELECTOR_HEADS, skip_rank=skip_rank,
                        importance=DEFAULT_IMPORTANCE)


def _alternating(selector: Selector, uniform: dict[int, LayerPolicy], num_visual: int) -> dict[int, int]:
    """Tokens per routed layer alternating 1.5x / 0.5x the uniform count (same total, capped at n)."""
    counts = {}
    indices = sorted(uniform)
    for position, index in enumerate(indices):
        base = round(uniform[index].keep_ratio * num_visual)
        high = min(num_visual, round(1.5 * base))
        counts[index] = high if position % 2 == 0 else max(0, 2 * base - high)
    return counts


def variants(selector: Selector, num_layers: int, num_visual: int) -> list[Variant]:
    """Unpatched, ALVTS keep-all, then ALVTS default (pooled keys and the default update)/pooled (no update)/
    uniform/adaptive, FastV and PyramidDrop at each compression."""
    full = [num_visual] * num_layers
    keep_all = {index: SelectorPolicy(layer, 1.0, selector.importance) for index, layer in selector.layers.items()}
    rows = [Variant("unpatched", None, None, full), Variant("alvts-keep-all", 0.0, keep_all, full)]
    for compression in COMPRESSIONS:
        fraction = 1.0 - compression
        uniform = alvts_plan(selector, fraction, num_layers, num_visual)
        pooled = alvts_plan(selector, fraction, num_layers, num_visual, SkippedKeys.POOL)
        if pooled is not None:  # the toolkit's default runtime: k - 1 tokens, the stand-in, the default update
            rows.append(Variant("alvts-default", compression, pooled.policies, pooled.planned_tokens, SkippedKeys.POOL,
                                default_skipped_update(SkippedKeys.POOL, has_fitted_maps=True)))
            rows.append(Variant("alvts-pooled", compression, pooled.policies, pooled.planned_tokens, SkippedKeys.POOL))
        if uniform is not None:
            rows.append(Variant("alvts-uniform", compression, uniform.policies, uniform.planned_tokens))
            counts = _alternating(selector, uniform.policies, num_visual)
            adaptive = {
                index: SelectorPolicy(selector.layers[index], count / num_visual, selector.importance)
                for index, count in counts.items()
            }
            planned = [counts.get(index, num_visual) for index in range(num_layers)]
            rows.append(Variant("alvts-adaptive*", compression, adaptive, planned))
        for plan in (fastv_plan(fraction, num_layers, num_visual), pyramid_plan(fraction, num_layers, num_visual)):
            if plan is not None:
                rows.append(Variant(plan.method, compression, plan.policies, plan.planned_tokens))
    return rows


def ideal_speedup(planned: list[int], num_visual: int, num_text: int, geometry: AttentionGeometry,
                  intermediate: int, selection_flops: float = 0.0) -> float:
    """Decoder prefill FLOPs of all tokens over those of the planned counts plus `selection_flops` (matmuls only)."""
    full = sum(layer_flops(num_text + num_visual, geometry, intermediate) for _ in planned)
    routed = sum(layer_flops(num_text + count, geometry, intermediate) for count in planned)
    return full / (routed + selection_flops)


def selection_flops(
    policies: dict[int, LayerPolicy] | None, num_tokens: int, num_text: int, geometry: AttentionGeometry
) -> float:
    """FLOPs all policies spend selecting over a row of `num_tokens` positions, `num_text` of them text (their own
    estimates)."""
    return sum(policy.selection_flops(num_tokens, num_text, geometry) for policy in (policies or {}).values())

"""Selectors without calibration data, from each layer's RoPE-aware weight SVD: for tests and benchmarks."""

from __future__ import annotations

from torch import nn

from ..artifact.selector import Selector
from ..model.adapters import AttentionGeometry, decoder_layers
from ..model.fingerprint import model_fingerprint
from ..selector.importance import Importance
from ..selector.layer import LayerSelector
from ..selector.skip_map import SkipUpdate
from ..selector.solver import rope_svd_init


def weight_svd_selector(
    model: nn.Module, keep_ratio: float = 1.0, start_layer: int = 0, heads: int = 1, skip_rank: int = 0,
    importance: Importance = Importance.PAPER,
) -> Selector:
    """A Selector for layers start_layer and up at `keep_ratio`, each layer's selector the RoPE-aware weight SVD
    with `heads` selector heads (one per model head reproduces the full attention), on the layer's device and dtype;
    with `skip_rank` > 0, randomly initialised skip maps of that rank (where only their shapes matter); scored by
    `importance`."""
    geometry = AttentionGeometry.of(model)
    layers = decoder_layers(model)
    selectors = {}
    for index in range(start_layer, geometry.num_layers):
        attention = layers[index].self_attn
        tensors = rope_svd_init(attention, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim, heads)
        weight = attention.q_proj.weight
        selectors[index] = LayerSelector.from_tensors(tensors, geometry.head_dim).to(weight.device, weight.dtype)
    skip_updates = {index: SkipUpdate(geometry.hidden_size, skip_rank) for index in selectors} if skip_rank else {}
    return Selector(selectors, dict.fromkeys(selectors, keep_ratio), importance, model_fingerprint(model),
                    skip_updates=skip_updates)

"""Runtime routing: each routed decoder layer processes its selected visual tokens plus all text tokens.

The other visual tokens skip the layer unchanged and are put back in place before the next layer, where
they may be selected again. Layers are patched by swapping their class for a subclass, so isinstance checks
and hooks on the layer keep working; `detach` swaps it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .devices import align_tensors, execution_device, follow_class_forward
from .importance import Importance, top_k_mask
from .masks import routed_attention_mask
from .routed_cache import existing_routed_layer, routed_cache_layer
from .selector import LayerSelector

CONTEXT_KWARG = "alvts_context"


@dataclass
class ForwardContext:
    """What every routed layer needs to know about the current forward pass."""

    visual: torch.Tensor  # (B, L) bool: visual positions among this pass's inputs
    valid: torch.Tensor  # (B, L) bool: non-padding positions among this pass's inputs


@dataclass
class Compaction:
    """Which positions a layer processes: `index` (B, L_c) into the sequence; fillers point at slot L."""

    index: torch.Tensor
    filler: torch.Tensor  # (B, L_c) bool

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Compaction:
        length = keep.shape[1]
        positions = torch.arange(length, device=keep.device).expand_as(keep)
        order = torch.where(keep, positions, positions + length).argsort(dim=1, stable=True)
        kept = keep.sum(1)
        compact_length = int(kept.max())
        filler = torch.arange(compact_length, device=keep.device)[None, :] >= kept[:, None]
        index = order[:, :compact_length].masked_fill(filler, length)
        return cls(index=index, filler=filler)

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) to (B, L_c, ...); filler rows read an appended copy of the last position."""
        states = torch.cat([states, states[:, -1:]], dim=1)
        index = self.index.view(*self.index.shape, *([1] * (states.dim() - 2))).expand(-1, -1, *states.shape[2:])
        return states.gather(1, index)

    def scatter(self, full: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
        """Write compact rows back into a copy of `full` (B, L, D); fillers land in a discarded extra slot."""
        extended = torch.cat([full, full[:, -1:]], dim=1)
        index = self.index[..., None].expand(-1, -1, full.shape[-1])
        return extended.scatter(1, index, compact.to(full.dtype))[:, :-1]


class RoutedLayerMixin:
    """Mixed into a decoder layer's class by `attach` (which sets the `alvts_*` attributes)."""

    alvts_selector: LayerSelector
    alvts_keep_ratio: float
    alvts_importance: Importance

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        context: ForwardContext | None = kwargs.pop(CONTEXT_KWARG, None)
        cache = kwargs.get("cache")
        compacted_before = existing_routed_layer(cache, self.self_attn.layer_idx) is not None
        if context is None or args or (self.alvts_keep_ratio >= 1.0 and not compacted_before):
            return super().forward(hidden_states, *args, **kwargs)
        align_tensors(context, hidden_states.device)
        return self._routed_forward(hidden_states, context, kwargs)

    def _keep_mask(self, hidden_states: torch.Tensor, context: ForwardContext, kwargs: dict) -> torch.Tensor:
        """(B, L) bool: top-k visual tokens by the selector, every valid text token, and the last position."""
        keep = context.valid & ~context.visual
        if bool(context.visual.any()):
            cos, sin = kwargs["position_embeddings"]
            normed = self.input_layernorm(hidden_states)
            weight = self.alvts_selector.q_proj.weight
            scores = self.alvts_selector.scores(
                normed.to(weight.dtype), cos, sin, context.visual, context.valid, self.alvts_importance
            )
            keep = keep | top_k_mask(scores, context.visual & context.valid, self.alvts_keep_ratio)
        keep[:, -1] = True
        return keep

    def _routed_forward(self, hidden_states: torch.Tensor, context: ForwardContext, kwargs: dict) -> torch.Tensor:
        layer_idx = self.self_attn.layer_idx
        keep = self._keep_mask(hidden_states, context, kwargs)
        dense = bool(keep.all())
        compaction = None if dense else Compaction.from_keep(keep)
        compact = hidden_states if dense else compaction.gather(hidden_states)
        new_valid = keep if dense else ~compaction.filler

        cache = kwargs.get("cache")
        layer_cache = routed_cache_layer(cache, layer_idx) if cache is not None else None
        key_valid = new_valid if layer_cache is None else layer_cache.append_validity(new_valid)
        kwargs["attention_mask"] = routed_attention_mask(
            key_valid, compact.shape[1], self.self_attn.config._attn_implementation, hidden_states.dtype
        )
        kwargs["position_ids"] = None
        if not dense:
            cos, sin = kwargs["position_embeddings"]
            batch = hidden_states.shape[0]
            kwargs["position_embeddings"] = (
                compaction.gather(cos.expand(batch, -1, -1)),
                compaction.gather(sin.expand(batch, -1, -1)),
            )
        output = super().forward(compact, **kwargs)
        if layer_cache is not None:
            layer_cache.key_valid = key_valid
        return output if dense else compaction.scatter(hidden_states, output)


_ROUTED_CLASSES: dict[type, type] = {}


def routed_class(layer_class: type) -> type:
    """The routed subclass of a decoder layer class (one per class, created on first use)."""
    if layer_class not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[layer_class] = type(f"Routed{layer_class.__name__}", (RoutedLayerMixin, layer_class), {})
    return _ROUTED_CLASSES[layer_class]


def route_layer(layer: nn.Module, selector: LayerSelector, keep_ratio: float, importance: Importance) -> None:
    """Patch one decoder layer in place."""
    weight = layer.self_attn.q_proj.weight
    layer.alvts_selector = selector.to(device=execution_device(layer), dtype=weight.dtype)
    layer.alvts_keep_ratio = keep_ratio
    layer.alvts_importance = importance
    layer.__class__ = routed_class(type(layer))
    follow_class_forward(layer)


def unroute_layer(layer: nn.Module) -> None:
    """Undo `route_layer`."""
    if not isinstance(layer, RoutedLayerMixin):
        return
    layer.__class__ = layer.__class__.__mro__[2]
    follow_class_forward(layer)
    del layer.alvts_selector
    del layer.alvts_keep_ratio
    del layer.alvts_importance

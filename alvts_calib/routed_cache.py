"""KV cache bookkeeping for routed layers: which cached keys are real and which are batch fillers or padding.

A routed layer caches K/V only for the tokens it processed, so its cache is shorter than layer 0's and rows
of a batch may hold different numbers of real keys. The validity of every cached slot lives in the cache
layer itself, so beam reordering, batch selection and cropping keep it consistent with the keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import AlvtsError


class RoutedCacheLayer(DynamicLayer):
    """A DynamicLayer that also remembers, per cached slot, whether the key may be attended to."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_valid: torch.Tensor | None = None
        self.keys_all_valid: bool | None = None  # host-side: every cached key is valid (None: not known)

    def append_validity(self, valid: torch.Tensor) -> torch.Tensor:
        """Validity of all keys after appending `valid` (B, L) for the keys about to be cached."""
        return valid if self.key_valid is None else torch.cat([self.key_valid, valid.to(self.key_valid.device)], 1)

    def all_valid_after(self, appended_all_valid: bool | None) -> bool | None:
        """Whether every key is valid after appending keys that are all valid (True), not (False) or unknown."""
        if self.key_valid is None:
            return appended_all_valid
        if self.keys_all_valid is False or appended_all_valid is False:
            return False
        return None if self.keys_all_valid is None or appended_all_valid is None else True

    def reset(self) -> None:
        super().reset()
        self.key_valid = None
        self.keys_all_valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, beam_idx.to(self.key_valid.device))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.key_valid is not None and tokens_to_remove < 0:
            self.key_valid = self.key_valid[:, :tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[indices]


def routed_cache_layer(cache: Cache, layer_idx: int) -> RoutedCacheLayer:
    """The routed bookkeeping layer of `cache` at `layer_idx`, installing it on first use."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        layers.append(DynamicLayer())
    layer = layers[layer_idx]
    if isinstance(layer, RoutedCacheLayer):
        return layer
    if type(layer) is not DynamicLayer:
        raise AlvtsError(
            f"routed layers need a DynamicCache; got {type(layer).__name__} at layer {layer_idx} "
            "(static, sliding-window and quantized caches are not supported)"
        )
    if layer.get_seq_length() > 0:
        raise AlvtsError(
            f"the cache already holds unrouted keys for layer {layer_idx}; start generation with an empty cache "
            "after attaching the selector"
        )
    layers[layer_idx] = RoutedCacheLayer()
    return layers[layer_idx]


def existing_routed_layer(cache: Cache | None, layer_idx: int) -> RoutedCacheLayer | None:
    """The routed bookkeeping layer if this layer's cache was already compacted, else None."""
    if cache is None or len(cache.layers) <= layer_idx:
        return None
    layer = cache.layers[layer_idx]
    return layer if isinstance(layer, RoutedCacheLayer) and layer.key_valid is not None else None

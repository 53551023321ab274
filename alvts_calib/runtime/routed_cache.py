"""KV cache bookkeeping for routed layers: which cached keys are real and which are batch fillers or padding.

A routed layer caches K/V only for the tokens it processed, so its cache is shorter than the sequence and rows
of a batch may hold different numbers of real keys. The validity of every cached slot lives in the cache
layer itself, so beam reordering, batch selection and cropping keep it consistent with the keys. Its
`get_seq_length` still counts every position it was given, as transformers expects of every layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import AlvtsError


class RoutedCacheLayer(DynamicLayer):
    """A DynamicLayer that also remembers, per cached slot, whether the key may be attended to."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_valid: torch.Tensor | None = None
        self.keys_all_valid: bool | None = None  # host-side: every cached key is valid (None: not known)
        self.key_bias: torch.Tensor | None = None  # (B, L_k) logit bias per cached key (pooled stand-ins); None: 0
        self.seen = 0  # positions of the sequence this layer has been given, processed or skipped

    def get_seq_length(self) -> int:
        """The sequence length so far, skipped positions included, as for an unrouted layer (transformers reads
        layer 0's for masks, positions and generation bookkeeping); the cached keys may be fewer."""
        return self.seen

    def append_bias(self, bias: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
        """Logit bias of all keys after appending keys with `bias` (None: zero) and validity `valid` (B, L)."""
        if bias is None and self.key_bias is None:
            return None
        if bias is None:
            bias = torch.zeros(valid.shape, dtype=self.key_bias.dtype, device=self.key_bias.device)
        if self.key_bias is None:
            past = 0 if self.key_valid is None else self.key_valid.shape[1]
            return torch.cat([bias.new_zeros(bias.shape[0], past), bias], 1)
        return torch.cat([self.key_bias, bias.to(self.key_bias.device)], 1)

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
        self.key_bias = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._per_key(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self.seen = max(self.seen + tokens_to_remove, 0)
            self._per_key(lambda tensor: tensor[:, :tokens_to_remove])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._per_key(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._per_key(lambda tensor: tensor[indices])

    def _per_key(self, change) -> None:
        """Apply a batch or length change of the cached keys to their validity and bias."""
        if self.key_valid is not None:
            self.key_valid = change(self.key_valid)
        if self.key_bias is not None:
            self.key_bias = change(self.key_bias)


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

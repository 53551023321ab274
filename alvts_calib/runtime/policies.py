"""Per-layer selection policies: which visual tokens a routed decoder layer processes.

ALVTS uses its calibrated selector (`SelectorPolicy`). Other policies subclass `LayerPolicy`: the calibration's
budget sweep (`calibration.sensitivity.BudgetSweepPolicy`) and the evaluation's reference methods
(`evaluation.baselines`) run in the same runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..model.adapters import AttentionGeometry
from ..selector.importance import Importance, importance_from_parts, query_row_count, query_rows, top_k_mask
from ..selector.layer import LayerSelector
from ..tokens import keep_count_host
from .context import ForwardContext
from .input_norm import NormedProjection, NormedSequence, SequenceNorm


class LayerPolicy(ABC):
    """Chooses the visual tokens one decoder layer processes."""

    @abstractmethod
    def select(
        self, layer: nn.Module, normed: NormedSequence, context: ForwardContext, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor | None:
        """(B, L) bool of the visual tokens to process, or None for all of them.

        `normed` is the layer's input after its input layernorm (`normed.dense()` as one tensor; None when
        `reads_states` is False); `cos`/`sin` are the layer's RoPE tables. Called only for passes that contain
        visual tokens, and not when `keeps_all`.
        """

    reads_states = True  # select() uses `normed` (the routed layer then computes it)

    @property
    def keeps_all(self) -> bool:
        """The layer processes every visual token: it runs unpatched, without calling `select`."""
        return False

    def kept_visual(self, num_visual: int) -> int | None:
        """How many of a row's `num_visual` valid visual tokens `select` keeps, if that is known in advance."""
        return None

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerPolicy:
        """Move any tensors the policy holds; returns the policy."""
        return self

    def bind_norm(self, norm: SequenceNorm) -> None:
        """Prepare for the normed input of the layer the policy is attached to (after `to`); called once then."""
        return None

    def selection_flops(self, num_tokens: int, num_text: int, geometry: AttentionGeometry) -> float:
        """Approximate FLOPs of one selection over a row of `num_tokens` positions, `num_text` of them text (matmuls
        only)."""
        return 0.0


class KeepAllPolicy(LayerPolicy):
    """Process every visual token (the layer runs unpatched); lets the harness count tokens in every layer."""

    reads_states = False
    keeps_all = True

    def select(self, layer, normed, context, cos, sin):
        return None


class RatioPolicy(LayerPolicy):
    """A policy keeping keep_count(n, keep_ratio) visual tokens of each row; a ratio of 1.0 keeps all."""

    keep_ratio: float

    @property
    def keeps_all(self) -> bool:
        return self.keep_ratio >= 1.0

    def kept_visual(self, num_visual):
        return keep_count_host(num_visual, self.keep_ratio)


class SelectorScoring:
    """Scores a routed layer's visual tokens by the calibrated low-rank selector's importance: queries at the rows
    the importance reads only, keys from the layer's normed input kept factored (`SequenceNorm`) once bound."""

    selector: LayerSelector
    importance: Importance
    keys: NormedProjection | None = None  # the selector's key projection of the bound layer's normed input

    def scores(
        self, normed: NormedSequence, context: ForwardContext, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) the selector's importance of every position."""
        selector = self.selector
        dtype = selector.q_proj.weight.dtype
        positions = query_rows(context.visual, context.valid, self.importance, max(context.host_counts().text))
        query_states = normed if positions is None else normed.rows(positions)
        queries = selector.q_proj(query_states.dense().to(dtype))
        keys = selector.k_proj(normed.dense().to(dtype)) if self.keys is None else self.keys(normed)
        parts = selector.projected_parts(
            queries, keys, cos, sin, context.visual, context.valid, self.importance, positions
        )
        return importance_from_parts(parts)

    def to(self, device, dtype):
        self.selector = self.selector.to(device=device, dtype=dtype)
        self.keys = None
        return self

    def bind_norm(self, norm):
        self.keys = norm.projection(self.selector.k_proj)


class SelectorPolicy(SelectorScoring, RatioPolicy):
    """ALVTS: the top `keep_ratio` of visual tokens by the calibrated low-rank selector's importance."""

    def __init__(self, selector: LayerSelector, keep_ratio: float, importance: Importance):
        self.selector = selector
        self.keep_ratio = keep_ratio
        self.importance = importance

    def select(self, layer, normed, context, cos, sin):
        return top_k_mask(self.scores(normed, context, cos, sin), context.visual & context.valid, self.keep_ratio)

    def selection_flops(self, num_tokens, num_text, geometry):
        """Keys at every position, queries at the rows the importance reads (`query_rows`), and their logits."""
        rank = self.selector.q_proj.out_features
        rows = query_row_count(self.importance, num_tokens, num_text)
        return 2.0 * (num_tokens + rows) * geometry.hidden_size * rank + 2.0 * rows * num_tokens * rank



"""The evaluation's reference methods as layer policies: the oracle (the layer's own full-attention importance, the
selector's upper bound), random selection, and static pruning (FastV, PyramidDrop, DART), where a `PrunePolicy`
shrinks the set of retained visual tokens at its layer and `CarryPolicy` layers process whatever is still retained.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import AlvtsError
from ..runtime.context import ForwardContext
from ..runtime.input_norm import NormedSequence
from ..runtime.policies import LayerPolicy, RatioPolicy
from ..selector.importance import Importance, attention_parts, importance_from_parts, top_count_mask, top_k_mask
from ..selector.layer_attention import last_query_attention, layer_queries_keys
from ..tokens import keep_count

# (layer, normed, context, cos, sin, candidates, counts) -> (B, L) bool: the visual tokens a pruning step keeps
Chooser = Callable[[nn.Module, NormedSequence, ForwardContext, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                   torch.Tensor]


RETAINED = "retained"  # ForwardContext.policy_state key: (B, L) bool, the visual tokens static pruning kept so far


def retained(context: ForwardContext) -> torch.Tensor | None:
    """The visual tokens static pruning has kept so far in this pass (None before its first step)."""
    return context.policy_state.get(RETAINED)


class ExactPolicy(RatioPolicy):
    """The oracle: the same top-k rule on the importance of the layer's own full attention."""

    def __init__(self, keep_ratio: float, importance: Importance):
        self.keep_ratio = keep_ratio
        self.importance = importance

    def select(self, layer, normed, context, cos, sin):
        queries, keys = layer_queries_keys(layer, normed.dense(), cos, sin, layer.self_attn.head_dim)
        parts = attention_parts(queries, keys, context.visual, context.valid, self.importance)
        return top_k_mask(importance_from_parts(parts), context.visual & context.valid, self.keep_ratio)

    def selection_flops(self, num_tokens, num_text, geometry):
        width = (geometry.num_heads + geometry.num_kv_heads) * geometry.head_dim
        query_width = geometry.num_heads * geometry.head_dim
        return 2.0 * num_tokens * geometry.hidden_size * width + 4.0 * num_tokens**2 * query_width


class RandomPolicy(RatioPolicy):
    """A uniformly random `keep_ratio` of the visual tokens, drawn afresh at every layer (seeded)."""

    def __init__(self, keep_ratio: float, seed: int):
        self.keep_ratio = keep_ratio
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, layer, normed, context, cos, sin):
        scores = torch.rand(context.visual.shape, generator=self.generator).to(context.visual.device)
        return top_k_mask(scores, context.visual & context.valid, self.keep_ratio)


class PrunePolicy(LayerPolicy):
    """Static pruning step: keep `keep_fraction` of each row's visual tokens among those still retained.

    The choice is stored in the forward context for the following layers. With `applies_here` the layer
    itself already processes only the new set (PyramidDrop, DART); otherwise it runs on the previous set and
    the pruning takes effect from the next layer (FastV decides at layer K-1 for layers K and up).
    """

    def __init__(self, keep_fraction: float, choose: Chooser, applies_here: bool, query_rows: int = 1):
        self.keep_fraction = keep_fraction
        self.choose = choose
        self.applies_here = applies_here
        self.query_rows = query_rows  # rows scored against every position: one query, or DART's pivots

    def select(self, layer, normed, context, cos, sin):
        if not bool(context.valid[:, -1].all()):
            raise AlvtsError("static pruning reads the last position's attention: pad batches on the left")
        before = retained(context)
        candidates = context.visual & context.valid if before is None else before
        counts = torch.minimum(
            keep_count((context.visual & context.valid).sum(-1), self.keep_fraction), candidates.sum(-1)
        )
        chosen = context.policy_state[RETAINED] = self.choose(layer, normed, context, cos, sin, candidates, counts)
        return chosen if self.applies_here else before

    def selection_flops(self, num_tokens, num_text, geometry):
        keys = 2.0 * num_tokens * geometry.hidden_size * geometry.num_kv_heads * geometry.head_dim
        return keys + 2.0 * self.query_rows * num_tokens * geometry.hidden_size


class CarryPolicy(LayerPolicy):
    """Process the visual tokens that earlier pruning steps retained (all of them before the first step)."""

    reads_states = False

    def select(self, layer, normed, context, cos, sin):
        return retained(context)


def last_attention_choice(layer, normed, context, cos, sin, candidates, counts) -> torch.Tensor:
    """FastV / PyramidDrop: the candidates the last position attends to most (head-averaged).

    The softmax runs over the positions still in play (text and the candidates), as if earlier drops had
    removed the other visual tokens from the sequence.
    """
    present = context.valid & (~context.visual | candidates)
    scores = last_query_attention(layer, normed.dense(), cos, sin, present, layer.self_attn.head_dim)
    return top_count_mask(scores, candidates, counts)


DART_IMAGE_PIVOTS = 4


DART_TEXT_PIVOTS = 4


DART_PIVOTS = DART_IMAGE_PIVOTS + DART_TEXT_PIVOTS


def dart_choice(layer, normed, context, cos, sin, candidates, counts) -> torch.Tensor:
    """DART: pivots by largest key L1 norm, then per pivot the candidates least similar to it (cosine)."""
    normed = normed.dense()
    key_norms = layer.self_attn.k_proj(normed).float().abs().sum(-1)
    states = torch.nn.functional.normalize(normed.float(), dim=-1)
    text = context.valid & ~context.visual
    keep = torch.zeros_like(candidates)
    for row in range(candidates.shape[0]):
        keep[row] = _dart_row(states[row], key_norms[row], candidates[row], text[row], int(counts[row]))
    return keep


def _dart_row(
    states: torch.Tensor, key_norms: torch.Tensor, candidates: torch.Tensor, text: torch.Tensor, count: int
) -> torch.Tensor:
    keep = torch.zeros_like(candidates)
    if count == 0:
        return keep
    image_pivots = _top_positions(key_norms, candidates, min(DART_IMAGE_PIVOTS, count))
    text_pivots = _top_positions(key_norms, text, DART_TEXT_PIVOTS)
    keep[image_pivots] = True
    pivots = [*image_pivots.tolist(), *text_pivots.tolist()]
    per_pivot = math.ceil((count - len(image_pivots)) / max(len(pivots), 1))
    for pivot in pivots:
        remaining = candidates & ~keep
        wanted = min(per_pivot, count - int(keep.sum()), int(remaining.sum()))
        if wanted <= 0:
            break
        similarity = states @ states[pivot]
        keep[_top_positions(-similarity, remaining, wanted)] = True
    return keep


def _top_positions(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest `scores` among `allowed` positions (fewer if fewer are allowed)."""
    count = min(count, int(allowed.sum()))
    return scores.masked_fill(~allowed, float("-inf")).topk(count).indices

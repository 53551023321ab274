"""What one routed pass cost, read off its context: visual tokens each layer processed, and prefill FLOPs (matmuls)
with the policies' selection and the fitted skipped updates included. Shared by `alvts eval` and the divergence
measure, so every table counts a method's cost the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..artifact.selector import Selector
from ..model.adapters import AttentionGeometry
from ..runtime.context import ForwardContext
from ..runtime.policies import LayerPolicy
from .flops import decoder_flops, layer_flops, skip_update_flops


@dataclass(frozen=True)
class PassCosts:
    """Per row of one pass: visual tokens processed per layer, and prefill FLOPs (selection included) and the
    selection's share of them."""

    tokens: torch.Tensor  # (B, layers)
    flops: list[float]
    selection: list[float]


def update_ranks(
    selector: Selector | None, policies: dict[int, LayerPolicy], skipped_keys: SkippedKeys, update: SkippedUpdate
) -> dict[int, int]:
    """Per layer that applies the fitted skip update `update` to its skipped visual tokens, the update's rank."""
    if selector is None or not update.fitted or (
        update is SkippedUpdate.STAND_IN and skipped_keys is not SkippedKeys.POOL
    ):
        return {}
    return {
        index: selector.skip_updates[index].down.out_features
        for index, policy in policies.items() if not policy.keeps_all
    }


def pass_costs(
    context: ForwardContext, policies: dict[int, LayerPolicy], ranks: dict[int, int], skipped_keys: SkippedKeys,
    geometry: AttentionGeometry, intermediate_size: int,
) -> PassCosts:
    """The costs of the pass `context` describes: the decoder layers on what they processed (with SkippedKeys.ALL
    attention on every token), the fitted skip updates on `ranks`' layers, and the policies' selection."""
    processed = context.processed_counts()
    tokens = torch.stack([processed[i].cpu() for i in range(geometry.num_layers)], dim=1)
    text = (context.valid & ~context.visual).sum(-1).cpu()
    length = context.valid.sum(-1).cpu()
    skipped = {index: updated_tokens(context, index).cpu() for index in ranks}
    flops, selection = [], []
    for row in range(tokens.shape[0]):
        positions = (tokens[row] + text[row]).tolist()
        flops_row = decoder_flops(positions, int(length[row]), geometry, intermediate_size,
                                  keys_all=skipped_keys is SkippedKeys.ALL)
        flops_row += sum(
            skip_update_flops(int(skipped[index][row]), geometry.hidden_size, rank) for index, rank in ranks.items()
        )
        selection_row = sum(
            p.selection_flops(int(length[row]), int(text[row]), geometry)
            for p in policies.values() if not p.keeps_all
        )
        flops.append(flops_row + selection_row)
        selection.append(selection_row)
    return PassCosts(tokens, flops, selection)


def full_prefill_flops(num_tokens: int, geometry: AttentionGeometry, intermediate_size: int) -> float:
    """Prefill FLOPs of the unpatched decoder over `num_tokens` positions."""
    return geometry.num_layers * layer_flops(num_tokens, geometry, intermediate_size)


def updated_tokens(context: ForwardContext, index: int) -> torch.Tensor:
    """(B,) skipped visual tokens layer `index` gave an update in the last pass: those of rows where it processed
    some of the visual tokens (the others have no update to take)."""
    keep = context.selected.get(index)
    if keep is None:
        return torch.zeros(context.visual.shape[0], dtype=torch.long)
    visual = context.visual & context.valid
    return ((visual & ~keep).sum(-1) * (visual & keep).any(-1)).long()

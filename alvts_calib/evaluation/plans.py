"""Token-selection methods at a matched budget: per-layer policies for ALVTS, its oracle and the peers.

The budget is the average number of visual tokens processed per decoder layer, as a fraction of the visual
tokens n (compression = 1 - fraction; see docs). Every method gets the largest whole token counts whose
average over all decoder layers does not exceed the budget at the reference count n.

- ALVTS, oracle, random: layers before `start_layer` process everything; every later layer k tokens. With
  pooled skipped keys (`SkippedKeys.POOL`) the stand-in is one of the k: they select k - 1 (all n when k = n).
- FastV (K=2): layers 0..K-1 process everything; layer K-1's last-position attention picks T tokens for the rest.
- PyramidDrop: layers 0..1 process everything, then N0 tokens picked at layer 2 and halved (lambda 0.5) at
  1/4, 1/2 and 3/4 of depth, each time by the last position's attention. Stage one keeps all tokens in the
  original method, which caps it near 53% compression; the layer-2 cut is how it reaches 67-89%.
- DART (K=2): after layer K-1, T tokens least duplicated with respect to pivot tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..artifact.config import SkippedKeys, SkippedUpdate
from ..artifact.selector import Selector
from ..runtime.policies import LayerPolicy, SelectorPolicy
from ..selector.importance import Importance
from ..tokens import keep_count_host, per_layer_count, selected_beside_stand_in, with_stand_in
from .baselines import (
    DART_PIVOTS,
    CarryPolicy,
    ExactPolicy,
    PrunePolicy,
    RandomPolicy,
    dart_choice,
    last_attention_choice,
)

STATIC_PRUNE_LAYER = 2  # K of FastV and DART, and PyramidDrop's first cut
PYRAMID_LAMBDA = 0.5
PYRAMID_STAGES = (0.25, 0.5, 0.75)


@dataclass
class Plan:
    """One method at one budget: the policy of each patched layer and the planned tokens of every layer."""

    method: str
    policies: dict[int, LayerPolicy]
    planned_tokens: list[int]  # visual tokens processed per decoder layer at the reference count
    skipped_keys: SkippedKeys = SkippedKeys.DROP  # what processed tokens see of skipped ones (the runtime setting)
    layer_wise: bool = True  # skipped tokens may be selected again later, so their update matters (static: never)

    def skipped_update(self, update: SkippedUpdate) -> SkippedUpdate:
        """What this plan's skipped tokens get when the runtime's setting is `update`: nothing for static pruning,
        whose pruned tokens no later layer reads."""
        return update if self.layer_wise else SkippedUpdate.NONE


def _uniform_plan(
    method: str, fraction: float, num_layers: int, num_visual: int, start_layer: int,
    make: Callable[[int, float], LayerPolicy], skipped_keys: SkippedKeys = SkippedKeys.DROP,
) -> Plan | None:
    count = per_layer_count(fraction, num_layers, num_visual, start_layer)
    if count is None:
        return None
    selected = selected_beside_stand_in(count, num_visual) if skipped_keys is SkippedKeys.POOL else count
    if selected == 0:
        return None
    ratio = selected / num_visual
    policies = {index: make(index, ratio) for index in range(start_layer, num_layers)}
    planned = [num_visual] * start_layer + [count] * (num_layers - start_layer)
    return Plan(method, policies, planned, skipped_keys)


def alvts_plan(
    selector: Selector, fraction: float, num_layers: int, num_visual: int,
    skipped_keys: SkippedKeys = SkippedKeys.DROP,
) -> Plan | None:
    """ALVTS with `selector`'s layers at one uniform keep ratio matching the budget."""
    importance = selector.importance
    return _uniform_plan(
        "alvts-uniform", fraction, num_layers, num_visual, selector.start_layer,
        lambda index, ratio: SelectorPolicy(selector.layers[index], ratio, importance), skipped_keys,
    )


def selector_plan(method: str, selector: Selector, num_visual: int) -> Plan:
    """ALVTS with the selector's own per-layer ratios (e.g. adaptive budgets) and skipped-key setting."""
    policies = {
        index: SelectorPolicy(selector.layers[index], ratio, selector.importance)
        for index, ratio in selector.keep_ratios.items()
    }
    skipped_keys = SkippedKeys(selector.metadata.get("skipped_keys", SkippedKeys.DROP))
    num_layers = int(selector.fingerprint["num_layers"])
    planned = [num_visual] * num_layers
    for index, ratio in selector.keep_ratios.items():
        selected = keep_count_host(num_visual, ratio)
        planned[index] = with_stand_in(selected, num_visual) if skipped_keys is SkippedKeys.POOL else selected
    return Plan(method, policies, planned, skipped_keys)


def oracle_plan(
    importance: Importance, fraction: float, num_layers: int, num_visual: int, start_layer: int,
    skipped_keys: SkippedKeys = SkippedKeys.DROP,
) -> Plan | None:
    """The exact full-attention importance with ALVTS's top-k rule (the selector's upper bound)."""
    return _uniform_plan(
        "oracle", fraction, num_layers, num_visual, start_layer, lambda index, ratio: ExactPolicy(ratio, importance),
        skipped_keys,
    )


def random_plan(
    fraction: float, num_layers: int, num_visual: int, start_layer: int, seed: int = 0,
    skipped_keys: SkippedKeys = SkippedKeys.DROP,
) -> Plan | None:
    """Random per-layer selection at ALVTS's per-layer counts."""
    return _uniform_plan(
        "random", fraction, num_layers, num_visual, start_layer,
        lambda index, ratio: RandomPolicy(ratio, seed + index), skipped_keys,
    )


def _static_plan(
    method: str, count: int, num_layers: int, num_visual: int, decide_before: bool, choose, query_rows: int = 1
) -> Plan:
    """Everything for K layers, `count` tokens after; the choice is made at layer K-1 or at layer K."""
    decision_layer = STATIC_PRUNE_LAYER - 1 if decide_before else STATIC_PRUNE_LAYER
    step = PrunePolicy(count / num_visual, choose, not decide_before, query_rows)
    policies: dict[int, LayerPolicy] = {decision_layer: step}
    policies.update({index: CarryPolicy() for index in range(STATIC_PRUNE_LAYER, num_layers) if index not in policies})
    planned = [num_visual] * STATIC_PRUNE_LAYER + [count] * (num_layers - STATIC_PRUNE_LAYER)
    return Plan(method, policies, planned, layer_wise=False)


def fastv_plan(fraction: float, num_layers: int, num_visual: int) -> Plan | None:
    """FastV (K=2): layer 1's last-position attention keeps T tokens for layers 2 and up."""
    count = per_layer_count(fraction, num_layers, num_visual, STATIC_PRUNE_LAYER)
    if not count:
        return None
    return _static_plan("fastv", count, num_layers, num_visual, True, last_attention_choice)


def dart_plan(fraction: float, num_layers: int, num_visual: int) -> Plan | None:
    """DART (K=2): the T least duplicated tokens at layer 2's input, for layers 2 and up."""
    count = per_layer_count(fraction, num_layers, num_visual, STATIC_PRUNE_LAYER)
    if not count:
        return None
    return _static_plan("dart", count, num_layers, num_visual, False, dart_choice, DART_PIVOTS)


def _pyramid_counts(first: int, num_layers: int, num_visual: int) -> list[int]:
    boundaries = [round(stage * num_layers) for stage in PYRAMID_STAGES]
    counts = []
    for index in range(num_layers):
        if index < STATIC_PRUNE_LAYER:
            counts.append(num_visual)
            continue
        halvings = sum(index >= boundary for boundary in boundaries)
        counts.append(int(first * PYRAMID_LAMBDA**halvings))
    return counts


def pyramid_plan(fraction: float, num_layers: int, num_visual: int) -> Plan | None:
    """PyramidDrop: N0 tokens from layer 2, halved at 1/4, 1/2 and 3/4 of depth by last-position attention."""
    budget = fraction * num_layers * num_visual + 1e-9
    first = next(
        (n0 for n0 in range(num_visual, 0, -1) if sum(_pyramid_counts(n0, num_layers, num_visual)) <= budget), None
    )
    if first is None:
        return None
    counts = _pyramid_counts(first, num_layers, num_visual)
    policies: dict[int, LayerPolicy] = {}
    for index in range(STATIC_PRUNE_LAYER, num_layers):
        if counts[index] != counts[index - 1]:
            policies[index] = PrunePolicy(counts[index] / num_visual, last_attention_choice, applies_here=True)
        else:
            policies[index] = CarryPolicy()
    return Plan("pyramiddrop", policies, counts, layer_wise=False)



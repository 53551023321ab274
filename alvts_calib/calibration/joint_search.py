"""Joint refinement of the sensitivity budget: tokens move between layers while every layer is routed at once.

The sensitivity measurement routes one layer at a time, so the split `budgets.min_damage` finds from it misses what
layers do together (on the demo, the quiet copies of a trained layer read the image's rows only jointly). This
search starts from that split and measures the real objective instead: the mean KL divergence of the next token
from the unrouted model's, with every layer routed at its budget, on calibration samples. Each round it probes
every layer with `step` tokens more and with `step` fewer (one batch; at first 1/16 of the visual tokens), then
tries the most promising pairs (one layer gains `step` tokens, another gives them up; a second batch) and keeps
the best if the joint divergence drops; when none does, the step halves (down to one token). The total never
changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..artifact.config import SkippedUpdate
from ..artifact.selector import Selector
from ..model.adapters import decoder_layers
from ..progress import counting
from .sensitivity import BudgetSweepPolicy, SweepInputs, advance_batches, routed_divergence, sweep_inputs

REFINE_EVALUATIONS = 400  # default cap on joint evaluations per refined budget
STEP_SHARE = 16  # tokens moved per pair at first: 1/16 of the visual count (4 of the demo's 64, 36 of LLaVA's 576)
PAIRS_TRIED = 8  # most promising pairs tried per round before the step halves


@dataclass(frozen=True)
class SearchResult:
    """The refined split (tokens per layer, stand-in included) and what the search measured."""

    tokens: list[int]
    divergence_before: float
    divergence_after: float
    evaluations: int


def _moved(tokens: tuple[int, ...], layer: int, change: int, visual_tokens: int) -> tuple[int, ...] | None:
    """`tokens` with `change` tokens more at `layer`, or None if that budget is not one a layer can use: 0, 2 up
    to `visual_tokens` (a budget of one is only the stand-in, which skips the image like 0 but costs a token).
    Landing on one rounds to 0 (going down) or 2 (going up)."""
    budget = tokens[layer] + change
    if budget == 1:
        budget = 0 if change < 0 else 2
    if not 0 <= budget <= visual_tokens or budget == tokens[layer]:
        return None
    return (*tokens[:layer], budget, *tokens[layer + 1 :])


def refine_split(
    divergences: Callable[[list[tuple[int, ...]]], list[float]],
    start: list[int],
    visual_tokens: int,
    max_evaluations: int = REFINE_EVALUATIONS,
    progress: bool = True,
) -> SearchResult:
    """Search splits of `sum(start)` tokens over layers for the smallest divergence, from `start` (see the module
    doc). `divergences(splits)` measures a batch of splits at once. Stops after about `max_evaluations` splits or
    when one-token moves no longer help."""
    cache: dict[tuple[int, ...], float] = {}
    with counting("refining the split", max_evaluations, enabled=progress) as advance:

        def measure(splits: list[tuple[int, ...]]) -> list[float]:
            new = list(dict.fromkeys(split for split in splits if split not in cache))
            if new:
                cache.update(zip(new, divergences(new), strict=True))
                for _ in new:
                    advance()
            return [cache[split] for split in splits]

        current = tuple(start)
        best = first = measure([current])[0]
        step = max(1, visual_tokens // STEP_SHARE)
        while step >= 1 and len(cache) < max_evaluations:
            probes = {
                (layer, sign): moved
                for layer in range(len(current))
                for sign in (1, -1)
                if (moved := _moved(current, layer, sign * step, visual_tokens)) is not None
            }
            effects = dict(zip(probes, (value - best for value in measure(list(probes.values()))), strict=True))
            pairs = sorted(
                (effects[up, 1] + effects[down, -1], up, down)
                for up, down in itertools.permutations(range(len(current)), 2)
                if (up, 1) in effects and (down, -1) in effects
            )
            candidates = []
            for _, up, down in pairs:
                moved = _moved(probes[up, 1], down, probes[down, -1][down] - current[down], visual_tokens)
                if moved is not None and sum(moved) == sum(current):
                    candidates.append(moved)
                if len(candidates) == PAIRS_TRIED:
                    break
            values = measure(candidates) if candidates else []
            if values and min(values) < best:
                best = min(values)
                current = candidates[values.index(best)]
            else:
                step //= 2
    return SearchResult(list(current), first, best, len(cache))


def joint_divergences(
    model: nn.Module,
    samples: list[Mapping[str, Any]] | SweepInputs,
    selector: Selector,
    visual_tokens: int,
    skipped_update: SkippedUpdate = SkippedUpdate.NONE,
) -> Callable[[list[tuple[int, ...]]], list[float]]:
    """The search's objective: for each split (tokens per layer of `selector`, in layer order, at the reference
    count `visual_tokens`), the mean KL(unrouted || routed) of each sample's next token with every layer routed at
    once, pooled skipped keys and `skipped_update`. A batch of K splits runs as K copies of each sample, one split
    per copy (`BudgetSweepPolicy` in every layer). Each sample's input to the first routed layer is computed once
    (from `SweepInputs`, made here from `samples` if not given), and every evaluation runs the layers from there."""
    inputs = samples if isinstance(samples, SweepInputs) else sweep_inputs(model, samples)
    layers = sorted(selector.layers)
    captured = inputs.layer_zero()
    for layer in decoder_layers(model)[: layers[0]]:
        advance_batches(layer, captured)

    def divergences(splits: list[tuple[int, ...]]) -> list[float]:
        fractions = torch.tensor(splits, dtype=torch.float64).T / visual_tokens  # (layers, K)
        policies = {
            index: BudgetSweepPolicy(selector.layers[index], fractions[position], selector.importance)
            for position, index in enumerate(layers)
        }
        return routed_divergence(model, captured, inputs.references, policies, len(splits), selector,
                                 skipped_update).tolist()

    return divergences


def refine_budget(
    model: nn.Module,
    samples: list[Mapping[str, Any]] | SweepInputs,
    selector: Selector,
    start: Mapping[int, int],
    visual_tokens: int,
    skipped_update: SkippedUpdate = SkippedUpdate.NONE,
    max_evaluations: int = REFINE_EVALUATIONS,
    progress: bool = True,
) -> tuple[dict[int, int], SearchResult]:
    """`refine_split` of the per-layer budgets `start` (layer -> tokens) with `joint_divergences` on `samples` (or
    their `SweepInputs`); returns the refined budgets (layer -> tokens) and the search's record."""
    layers = sorted(start)
    objective = joint_divergences(model, samples, selector, visual_tokens, skipped_update)
    result = refine_split(objective, [start[index] for index in layers], visual_tokens, max_evaluations, progress)
    return dict(zip(layers, result.tokens, strict=True)), result

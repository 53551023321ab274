"""Where the sensitivity measurement spends its budgets: a coarse grid for every layer, then the full grid's budgets
only around the splits the allocation makes.

`budget_grid` is the full grid (0, 2, 3, 4, 6, 8, 12, ... n). Every layer is first measured at `coarse_grid` (0, the
powers of four and n). Each further round allocates, from what is measured so far, every average budget that the
compressions `GRID_COMPRESSIONS` span (`budgets.min_damage`, as export does) and adds, for each layer, the full
grid's budgets next to the one it got (one grid step beyond the measured budgets around it on each side). Rounds end
when no layer needs a new budget: every split in that range then rests on the full grid's resolution around each
layer's choice, while budgets no split of that range comes near are never measured. A round is computed from the
measurements of the budgets its predecessors asked for only, so a resumed run asks for the same budgets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..artifact.budgets import damage_costs, min_damage

GRID_COMPRESSIONS = (0.67, 0.89)  # the range of compressions whose splits get the full grid's resolution

Measured = Mapping[int, Mapping[int, float]]  # layer -> budget -> measured damage


def budget_grid(visual_tokens: int) -> list[int]:
    """Budgets (tokens per layer, a stand-in included) at which sensitivity can be measured: 0, 2, 3, 4, 6, 8, 12,
    ... (powers of two and 1.5 times them) below `visual_tokens`, and `visual_tokens` itself."""
    grid, power = [0], 2
    while power < visual_tokens:
        grid += [value for value in (power, power * 3 // 2) if value < visual_tokens and value not in grid]
        power *= 2
    return [*grid, visual_tokens]


def coarse_grid(visual_tokens: int) -> list[int]:
    """The budgets every layer is measured at first: those of `budget_grid` that are 0, a power of four or
    `visual_tokens`."""
    return [value for value in budget_grid(visual_tokens)
            if value in (0, visual_tokens) or (value & (value - 1) == 0 and value.bit_length() % 2 == 1)]


def grid_neighbours(grid: Sequence[int], tokens: int) -> set[int]:
    """The budgets of `grid` around `tokens`: the nearest at or below it and at or above it, and one more on each
    side of those."""
    below = max(position for position, value in enumerate(grid) if value <= tokens)
    above = min(position for position, value in enumerate(grid) if value >= tokens)
    return set(grid[max(below - 1, 0) : above + 2])


def next_round(measured: Measured, visual_tokens: int, totals: Sequence[int]) -> dict[int, list[int]] | None:
    """Per layer of `measured`, the budgets the first unfinished round asks for (measured or not), or None when the
    rounds are over. `totals`: the average tokens per layer whose splits are refined."""
    grid = budget_grid(visual_tokens)
    wanted = {index: set(coarse_grid(visual_tokens)) for index in measured}
    while True:
        if any(not budgets <= measured[index].keys() for index, budgets in wanted.items()):
            return {index: sorted(budgets) for index, budgets in wanted.items()}
        grown = {index: set(budgets) for index, budgets in wanted.items()}
        for tokens in _splits(measured, wanted, visual_tokens, totals):
            for index, budget in tokens.items():
                grown[index] |= grid_neighbours(grid, budget)
        if grown == wanted:
            return None
        wanted = grown


def _splits(
    measured: Measured, wanted: Mapping[int, set[int]], visual_tokens: int, totals: Sequence[int]
) -> list[dict[int, int]]:
    """The sensitivity split (layer -> tokens) at each average of `totals`, from the `wanted` budgets' damage."""
    indices = sorted(wanted)
    costs = damage_costs(
        [(np.array(sorted(wanted[index])), np.array([measured[index][b] for b in sorted(wanted[index])]))
         for index in indices],
        visual_tokens,
    )
    return [dict(zip(indices, min_damage(costs, total * len(indices)), strict=True)) for total in totals]

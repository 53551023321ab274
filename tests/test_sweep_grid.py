"""Where the sensitivity measurement spends its budgets: the coarse grid and the rounds that refine it."""

from __future__ import annotations

import numpy as np

from alvts_calib.artifact.budgets import damage_costs, min_damage
from alvts_calib.calibration.sweep_grid import budget_grid, coarse_grid, grid_neighbours, next_round

VISUAL = 64
TOTALS = range(7, 22)


def test_the_coarse_grid_is_zero_the_powers_of_four_and_every_token():
    assert coarse_grid(64) == [0, 4, 16, 64]
    assert coarse_grid(576) == [0, 4, 16, 64, 256, 576]
    assert coarse_grid(20) == [0, 4, 16, 20]
    assert coarse_grid(1) == [0, 1]
    for n in (1, 5, 16, 64, 577):
        assert set(coarse_grid(n)) <= set(budget_grid(n))


def test_neighbours_reach_one_grid_step_beyond_the_budgets_around():
    grid = budget_grid(64)  # 0, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64
    assert grid_neighbours(grid, 8) == {6, 8, 12}
    assert grid_neighbours(grid, 10) == {6, 8, 12, 16}
    assert grid_neighbours(grid, 0) == {0, 2}
    assert grid_neighbours(grid, 64) == {48, 64}


def _layers(seed: int, count: int = 12) -> list[np.ndarray]:
    """Damage per layer over 0..VISUAL tokens: falling, at different speeds and heights, with noise."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(VISUAL + 1)
    return [rng.lognormal(-6, 2) * np.exp(-tokens / rng.uniform(1, 30)) * rng.uniform(0.8, 1.2, VISUAL + 1)
            for _ in range(count)]


def _measure_in_rounds(truth: list[np.ndarray]) -> tuple[dict[int, dict[int, float]], int]:
    measured: dict[int, dict[int, float]] = {index: {} for index in range(len(truth))}
    rounds = 0
    while (wanted := next_round(measured, VISUAL, TOTALS)) is not None:
        rounds += 1
        for index, budgets in wanted.items():
            measured[index].update({b: float(truth[index][b]) for b in budgets})
    return measured, rounds


def _split(measured: dict[int, dict[int, float]], total: int) -> list[int]:
    pairs = [(np.array(sorted(m)), np.array([m[b] for b in sorted(m)])) for m in measured.values()]
    return min_damage(damage_costs(pairs, VISUAL), total * len(measured))


def test_rounds_measure_fewer_budgets_and_end_where_the_splits_rest_on_the_full_grid():
    grid = budget_grid(VISUAL)
    for seed in range(5):
        truth = _layers(seed)
        measured, rounds = _measure_in_rounds(truth)
        assert rounds >= 2
        assert sum(map(len, measured.values())) < len(grid) * len(truth)
        for total in TOTALS:  # a fixed point: every split's budgets and their neighbours are measured
            for index, budget in enumerate(_split(measured, total)):
                assert grid_neighbours(grid, budget) <= measured[index].keys(), (seed, total, index)


def test_a_round_depends_only_on_the_budgets_earlier_rounds_asked_for():
    """What a resumed run has measured beyond the unfinished round does not change the rounds it asks for."""
    truth = _layers(1)
    measured, _ = _measure_in_rounds(truth)
    everything = {index: {b: float(truth[index][b]) for b in budget_grid(VISUAL)} for index in range(len(truth))}
    assert next_round(everything, VISUAL, TOTALS) is None
    first = next_round({index: {} for index in range(len(truth))}, VISUAL, TOTALS)
    assert first == dict.fromkeys(range(len(truth)), coarse_grid(VISUAL))
    partly = {index: dict(values) for index, values in everything.items()}
    for index in measured:  # drop a budget the rounds asked for: that round is asked for again, nothing else
        missing = max(measured[index])
        del partly[index][missing]
        wanted = next_round(partly, VISUAL, TOTALS)
        assert wanted is not None and missing in wanted[index]
        assert all(set(budgets) <= measured[layer].keys() for layer, budgets in wanted.items())
        partly[index][missing] = everything[index][missing]

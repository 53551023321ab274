"""Per-layer adaptive budgets: the statistics, both allocations, export, attach and the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from alvts_cli.app import app
from typer.testing import CliRunner

from alvts_calib import AlvtsError, attach, calibrate, detach, load_calibration, load_selector
from alvts_calib.artifact.budgets import (
    UPDATE_FLOOR,
    Budget,
    LayerStatistics,
    LayerUpdates,
    UpdateTally,
    allocate,
    coverage_curves,
    coverage_grid,
    parse_budget,
    pooled_coverage,
    token_curves,
    water_filling,
)
from alvts_calib.artifact.export import build_selector, export
from alvts_calib.testing.random_model import demo_model, demo_samples
from alvts_calib.testing.tiny_models import IMAGE_TOKEN
from alvts_calib.tokens import keep_count

ADAPTIVE = [Budget.ADAPTIVE, Budget.ADAPTIVE_MASS, Budget.ADAPTIVE_UPDATE]


def power_layer(alpha: float, share: float = 0.5, text: float = 1.0, visual: float = 0.1) -> LayerStatistics:
    """Coverage f**alpha: alpha 1 is flat importance, small alpha concentrates it on a few tokens. The layer
    changes text rows by `text` and visual tokens by `visual` (relative update energy), spread like its importance."""
    updates = LayerUpdates(text=text, visual=visual, coverage=coverage_grid() ** alpha)
    return LayerStatistics(coverage=coverage_grid() ** alpha, visual_share=share, updates=updates)


def layers(*alphas: float) -> dict[int, LayerStatistics]:
    return {index + 1: power_layer(alpha) for index, alpha in enumerate(alphas)}


# ----------------------------------------------------------------------------------------------------- statistics


def test_coverage_curves_follow_the_runtime_keep_count():
    importance = torch.tensor([[0.0, 4.0, 3.0, 2.0, 1.0, 9.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    visual = torch.tensor([[False, True, True, True, True, False], [False] * 6])
    curves = coverage_curves(importance, visual)
    assert curves.shape == (1, coverage_grid().numel())  # the row without visual tokens is left out
    grid = coverage_grid()
    for fraction, value in zip(grid.tolist(), curves[0].tolist(), strict=True):
        kept = int(keep_count(torch.tensor(4), fraction))
        assert value == pytest.approx([0, 4, 7, 9, 10][kept] / 10)


def test_update_tally_measures_relative_update_energy_of_text_and_visual_tokens():
    hidden = torch.ones(1, 4, 2)  # |h|^2 = 2 everywhere
    output = hidden + torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])  # |dh|^2 = 2, 4, 0, 1
    visual = torch.tensor([[False, True, True, False]])
    valid = torch.tensor([[True, True, True, True]])
    tally = UpdateTally()
    tally.add(hidden, output, visual, valid)
    updates = tally.result(read_later=True)
    assert updates.text == pytest.approx((1.0 + 0.5) / 2) and updates.visual == pytest.approx((2.0 + 0.0) / 2)
    assert updates.coverage[-1] == pytest.approx(1.0) and updates.coverage[128] == pytest.approx(1.0)  # one holds all
    assert tally.result(read_later=False).visual == 0.0  # after the last layer nothing reads the visual tokens


# ----------------------------------------------------------------------------------------------------- allocation


def test_unknown_budget_names_give_a_one_line_error():
    expected = "budget must be one of uniform, adaptive, adaptive-mass, adaptive-update, sensitivity, got 'fancy'"
    with pytest.raises(AlvtsError, match=expected):
        parse_budget("fancy")


@pytest.mark.parametrize("budget", ADAPTIVE)
@pytest.mark.parametrize("visual_tokens", [16, 37, 576])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.11, 0.25, 0.5, 0.9, 1.0])
def test_allocation_meets_the_average_exactly(budget, visual_tokens, keep_ratio):
    statistics = layers(0.1, 0.3, 0.6, 1.0, 0.45)
    allocation = allocate(statistics, keep_ratio, visual_tokens, budget)
    uniform = int(keep_count(torch.tensor(visual_tokens), keep_ratio))
    assert sum(allocation.tokens.values()) == uniform * len(statistics)
    for index, ratio in allocation.ratios.items():
        assert 0.0 <= ratio <= 1.0
        assert int(keep_count(torch.tensor(visual_tokens), ratio)) == allocation.tokens[index]  # what the runtime keeps
    summary = allocation.summary()
    assert summary["mean_tokens_per_layer"] == summary["uniform_tokens_per_layer"] == uniform


@pytest.mark.parametrize("budget", ADAPTIVE)
def test_allocation_is_monotone_in_the_target(budget):
    statistics = layers(0.1, 0.3, 0.6, 1.0, 0.45)
    previous = dict.fromkeys(statistics, 0)
    for keep_ratio in np.linspace(0.01, 1.0, 60):
        tokens = allocate(statistics, float(keep_ratio), 64, budget).tokens
        assert all(tokens[i] >= previous[i] for i in statistics), (keep_ratio, tokens, previous)
        previous = tokens


@pytest.mark.parametrize("keep_ratio", [0.05, 0.11, 0.3, 0.6])
def test_equal_coverage_gives_flatter_curves_more_tokens_and_equal_coverage(keep_ratio):
    statistics = layers(0.15, 0.4, 1.0)
    allocation = allocate(statistics, keep_ratio, 576, Budget.ADAPTIVE)
    tokens = [allocation.tokens[i] for i in (1, 2, 3)]
    assert tokens[0] < tokens[1] < tokens[2], tokens
    curves = token_curves(np.stack([statistics[i].coverage.numpy() for i in (1, 2, 3)]), 576)
    lowest = min(curves[row, k] for row, k in enumerate(tokens))
    assert all(curves[row, k - 1] <= lowest for row, k in enumerate(tokens)), tokens  # equal up to one token


def test_identical_layers_get_identical_budgets():
    for budget in ADAPTIVE:
        tokens = allocate(layers(0.3, 0.3, 0.3), 0.25, 64, budget).tokens
        assert sorted(tokens.values()) == [16, 16, 16], (budget, tokens)


def test_extremes_zero_and_all_tokens():
    # a layer whose importance sits on one token needs one token; a flat layer needs all of them
    one_token = LayerStatistics(coverage=torch.ones(coverage_grid().numel(), dtype=torch.float64), visual_share=0.5)
    one_token.coverage[0] = 0.0
    statistics = {1: one_token, 2: power_layer(1.0)}
    allocation = allocate(statistics, 0.5, 64, Budget.ADAPTIVE)
    assert allocation.tokens == {1: 1, 2: 63}
    assert allocate(statistics, 1.0, 64, Budget.ADAPTIVE).ratios == {1: 1.0, 2: 1.0}
    # water-filling ignores a layer the text never looks at: it keeps no visual token there
    blind = dataclasses.replace(power_layer(0.3), visual_share=0.0)
    mass = allocate({1: blind, 2: power_layer(0.3)}, 0.25, 64, Budget.ADAPTIVE_MASS)
    assert mass.tokens == {1: 0, 2: 32} and mass.ratios[1] == 0.0


def test_adaptive_update_puts_tokens_where_layers_change_the_hidden_states():
    # layers 1 and 3 barely change anything; layer 2 reads the image (text update), layer 4 rewrites visual tokens
    statistics = {
        1: power_layer(0.5, text=1e-4, visual=1e-5), 2: power_layer(0.5, text=2.0, visual=1e-3),
        3: power_layer(0.5, text=1e-4, visual=1e-5), 4: power_layer(1.0, text=0.1, visual=0.5),
    }
    allocation = allocate(statistics, 0.25, 64, Budget.ADAPTIVE_UPDATE)
    tokens = allocation.tokens
    assert sum(tokens.values()) == 4 * 16 and tokens[1] == tokens[3] == UPDATE_FLOOR and tokens[2] > tokens[4] > 2
    older = {index: dataclasses.replace(layer, updates=None) for index, layer in statistics.items()}
    with pytest.raises(AlvtsError, match="'adaptive-update' needs the layers' update statistics.*re-run"):
        allocate(older, 0.25, 64, Budget.ADAPTIVE_UPDATE)


def test_pooled_coverage_counts_only_what_a_stand_in_gets_wrong():
    curves = token_curves(np.stack([coverage_grid().numpy() ** a for a in (1.0, 0.3)]), 64)
    pooled = pooled_coverage(curves)
    assert pooled.shape == curves.shape and np.allclose(pooled[:, -1], 1.0)
    assert np.allclose(pooled[0], 1.0, atol=1e-6), "a flat attention loses nothing to pooling"
    assert pooled[1, 0] < 0.8 and np.all(np.diff(pooled[1, :40]) > 0), "a peaked one gains from its top tokens"
    masses = np.diff(curves[1])  # by hand at k = 5: the tail's distance from its own mean
    tail = masses[5:]
    assert pooled[1, 5] == pytest.approx(1 - 0.5 * np.abs(tail - tail.mean()).sum())


def test_pooled_adaptive_update_leaves_flat_layers_at_the_floor():
    # same work in both layers; layer 1 attends flatly (its stand-in is exact), layer 2 to a few tokens
    statistics = {1: power_layer(1.0, text=1.0, visual=0.0), 2: power_layer(0.3, text=1.0, visual=0.0)}
    plain = allocate(statistics, 0.25, 64, Budget.ADAPTIVE_UPDATE).tokens
    pooled = allocate(statistics, 0.25, 64, Budget.ADAPTIVE_UPDATE, pooled=True).tokens
    assert sum(pooled.values()) == sum(plain.values()) == 32
    assert pooled[1] == UPDATE_FLOOR < plain[1]


@pytest.mark.parametrize("floor", [0, 2])
def test_water_filling_is_optimal_on_concave_curves(floor):
    curves = token_curves(np.stack([coverage_grid().numpy() ** a for a in (0.2, 0.5, 1.0)]), 6)
    weights = np.array([0.2, 0.5, 0.4])
    for total in range(3 * floor, 19):
        tokens = water_filling(curves, weights, total, floor)
        best = max(
            sum(weights[i] * curves[i, k[i]] for i in range(3))
            for k in itertools.product(range(floor, 7), repeat=3)
            if sum(k) == total
        )
        assert sum(tokens) == total and min(tokens) >= floor
        assert sum(weights[i] * curves[i, tokens[i]] for i in range(3)) == pytest.approx(best)


# ------------------------------------------------------------------------------------ export, artifact, attach, CLI


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """A demo calibration whose layer 1 has importance on few tokens and layer 3 flat importance."""
    torch.manual_seed(0)
    model = demo_model()
    result = calibrate(model, demo_samples(model, 2), rank=16, refine_steps=5, start_layer=1, progress=False)
    result.layers[1].budget = power_layer(0.1)
    result.layers[3].budget = power_layer(1.0)
    path = tmp_path_factory.mktemp("budgets") / "calib.safetensors"
    result.save(path)
    return path


def test_calibration_records_budget_statistics_and_round_trips(calibration):
    loaded = load_calibration(calibration)
    assert loaded.metadata["summary"]["visual_tokens"] == 16
    statistics, visual_tokens = loaded.budget_statistics()
    assert visual_tokens == 16 and sorted(statistics) == [1, 2, 3]
    measured = statistics[2]
    assert measured.coverage[0] == 0.0 and measured.coverage[-1] == pytest.approx(1.0)
    assert bool((measured.coverage.diff() >= 0).all()) and 0.0 < measured.visual_share <= 1.0
    torch.testing.assert_close(statistics[3].coverage, power_layer(1.0).coverage)
    assert measured.updates.text > 0.0 and measured.updates.visual > 0.0
    assert measured.updates.coverage[-1] == pytest.approx(1.0)
    last = calibrate(demo_model(), demo_samples(demo_model(), 1), rank=16, refine_steps=0, progress=False)
    assert last.layers[3].budget.updates.visual == 0.0 and last.layers[3].budget.updates.text > 0.0


def test_older_calibrations_export_uniform_but_not_adaptive(calibration):
    older = load_calibration(calibration)
    for result in older.layers.values():
        result.budget = None
    uniform = build_selector(older, keep_ratio=0.25, budget="uniform", skipped_keys="drop")
    assert uniform.keep_ratios == {1: 0.25, 2: 0.25, 3: 0.25}
    with pytest.raises(AlvtsError, match="no budget statistics"):
        build_selector(older, keep_ratio=0.25, budget="adaptive")


def test_adaptive_export_round_trips_through_the_artifact_and_attach(calibration, tmp_path):
    path = tmp_path / "adaptive.safetensors"
    selector = export(load_calibration(calibration), path, keep_ratio=0.25, budget="adaptive", skipped_keys="drop")
    loaded = load_selector(path)
    assert loaded.keep_ratios == selector.keep_ratios
    tokens = {i: round(r * 16) for i, r in loaded.keep_ratios.items()}
    assert tokens[1] < tokens[2] < tokens[3] and sum(tokens.values()) == 3 * 4
    assert loaded.metadata["budget"] == "adaptive"
    allocation = loaded.metadata["allocation"]
    assert allocation["method"] == "equal-coverage" and allocation["target_keep_ratio"] == 0.25
    assert allocation["mean_tokens_per_layer"] == 4 and allocation["visual_tokens"] == 16
    assert set(loaded.metadata["fidelity"]["1"]) == {
        "recall", "spearman", "mass", "update_explained", "text_update", "visual_update"
    }

    model = demo_model()
    inputs = demo_samples(model, 1)[0]
    attach(model, path)
    cache = model(**inputs, use_cache=True).past_key_values
    visual = inputs["input_ids"] == IMAGE_TOKEN
    text = (inputs["attention_mask"].bool() & ~visual).sum(1)
    for index in (1, 2, 3):
        assert torch.equal(cache.layers[index].key_valid.sum(1), text + tokens[index]), index
    detach(model)


def test_pooled_adaptive_export_counts_the_stand_in_in_each_layers_budget(calibration, tmp_path):
    selector = export(load_calibration(calibration), tmp_path / "s.safetensors", keep_ratio=0.25,
                      budget="adaptive-update", skipped_keys="pool")
    tokens = {int(i): k for i, k in selector.metadata["allocation"]["tokens"].items()}
    assert sum(tokens.values()) == 3 * 4 and selector.metadata["skipped_keys"] == "pool"
    assert selector.keep_ratios == {i: max(k - 1, 0) / 16 for i, k in tokens.items()}
    model = demo_model()
    inputs = demo_samples(model, 1)[0]
    attach(model, tmp_path / "s.safetensors")  # the artifact's own skipped-key setting
    cache = model(**inputs, use_cache=True).past_key_values
    visual = inputs["input_ids"] == IMAGE_TOKEN
    text = (inputs["attention_mask"].bool() & ~visual).sum(1)
    for index, count in tokens.items():  # selected tokens plus the stand-in; one token leaves no room for both
        expected = count if count >= 2 else 0
        assert torch.equal(cache.layers[index].key_valid.sum(1), text + expected), (index, count)
    detach(model)


def test_a_layer_with_ratio_zero_routes_no_visual_token(calibration):
    model = demo_model()
    inputs = demo_samples(model, 1)[0]
    selector = build_selector(load_calibration(calibration), keep_ratio=0.25, budget="uniform", skipped_keys="drop")
    selector.keep_ratios[2] = 0.0
    attach(model, selector)
    cache = model(**inputs, use_cache=True).past_key_values
    visual = inputs["input_ids"] == IMAGE_TOKEN
    text = (inputs["attention_mask"].bool() & ~visual).sum(1)
    assert torch.equal(cache.layers[2].key_valid.sum(1), text + visual[:, -1].long())
    assert torch.equal(cache.layers[1].key_valid.sum(1), text + 4)
    detach(model)


@pytest.mark.slow
def test_cli_export_and_inspect_show_the_budgets(calibration, tmp_path):
    runner = CliRunner()
    path = tmp_path / "selector.safetensors"
    result = runner.invoke(app, ["export", str(calibration), "--keep-ratio", "0.25", "--budget", "adaptive-mass",
                                 "--out", str(path), "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["budget"] == "adaptive-mass" and exported["allocation"]["method"] == "water-filling"
    inspected = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert inspected["keep_ratios"] == exported["keep_ratios"] and inspected["allocation"] == exported["allocation"]
    table = runner.invoke(app, ["inspect", str(path)]).stdout
    assert "adaptive (water-filling): mean 4.00 of 16 visual tokens" in table and "keep ratio" in table
    process = subprocess.run(
        [sys.executable, "-m", "alvts_cli.app", "export", str(calibration), "--keep-ratio", "0.2", "--budget", "x",
         "--out", str(tmp_path / "bad.safetensors")],
        capture_output=True, text=True,
    )
    assert process.returncode == 1 and process.stderr.strip().splitlines() == [
        "error: budget must be one of uniform, adaptive, adaptive-mass, adaptive-update, sensitivity, got 'x'"
    ]

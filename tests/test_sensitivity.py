"""The "sensitivity" budget: measuring each layer's effect on the answer, and the allocation that minimises it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import alvts_calib.calibration.sensitivity as sensitivity_module
from alvts_calib import AlvtsError, calibrate, export, load_calibration
from alvts_calib.artifact.budgets import damage_curve, min_damage
from alvts_calib.artifact.config import SkippedUpdate
from alvts_calib.artifact.export import calibrated_layers
from alvts_calib.calibration.sensitivity import BudgetSweepPolicy, measure_sensitivity
from alvts_calib.calibration.sweep_grid import budget_grid, coarse_grid
from alvts_calib.model.adapters import decoder_layers
from alvts_calib.runtime.attach import attach, detach
from alvts_calib.testing.random_model import demo_model, demo_samples
from alvts_calib.testing.tiny_models import TINY_MODELS, tiny_inputs
from alvts_calib.testing.whole_model import prepare_samples, swept_divergence
from alvts_calib.tokens import keep_count_host


def test_budget_grid_doubles_with_half_steps_and_ends_at_every_token():
    assert budget_grid(64) == [0, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert budget_grid(16) == [0, 2, 3, 4, 6, 8, 12, 16]
    assert budget_grid(20) == [0, 2, 3, 4, 6, 8, 12, 16, 20]
    assert budget_grid(1) == [0, 1]


def test_damage_curve_interpolates_never_rises_and_treats_one_token_as_none():
    curve = damage_curve(np.array([0, 2, 4, 8]), np.array([1.0, 0.5, 0.6, 0.0]), 8)
    assert curve.shape == (9,)
    assert curve[0] == curve[1] == 1.0 and curve[2] == 0.5
    assert bool((np.diff(curve) <= 0).all()) and curve[-1] == 0.0
    assert curve[3] == 0.5 and curve[6] == pytest.approx(0.3)  # 0.55 and 0.3 interpolated, never above 0.5


def test_min_damage_finds_the_best_split_exhaustively():
    rng = np.random.default_rng(0)
    for _ in range(20):
        curves = np.sort(rng.random((3, 6)), axis=1)[:, ::-1]  # 3 layers, 0..5 tokens, falling
        for total in (0, 4, 9, 15):
            tokens = min_damage(curves, total)
            assert sum(tokens) == total
            best = min(
                sum(curves[i, k] for i, k in enumerate(split))
                for split in itertools.product(range(6), repeat=3) if sum(split) == total
            )
            assert sum(curves[i, k] for i, k in enumerate(tokens)) == pytest.approx(best)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torch.manual_seed(0)
    model = demo_model()
    calibration = calibrate(model, demo_samples(model, 3), rank=16, refine_steps=5, sensitivity_samples=2,
                            progress=False)
    path = tmp_path_factory.mktemp("sensitivity") / "calib.safetensors"
    calibration.save(path)
    return model, path


def test_calibration_measures_every_layer_from_no_token_to_all(measured):
    _, path = measured
    calibration = load_calibration(path)
    assert calibration.metadata["summary"]["sensitivity_samples"] == 2
    assert calibration.metadata["summary"]["sensitivity_update"] == "linear"  # the runtime's default
    visual_tokens = calibration.metadata["summary"]["visual_tokens"]
    assert "sensitivity_unfinished" not in calibration.metadata["summary"] and calibration.unfinished() is None
    for index, result in calibration.layers.items():
        budgets = result.budget.damage_budgets.tolist()
        assert set(coarse_grid(visual_tokens)) <= set(budgets) <= set(budget_grid(visual_tokens)), index
        assert budgets == sorted(budgets)
        damage = result.budget.damage
        assert damage.shape == (len(budgets),) and bool((damage >= 0).all())
        assert float(damage[-1]) < 1e-6, index  # every token kept: the layer runs unchanged
    assert max(float(result.budget.damage[0]) for result in calibration.layers.values()) > 1e-4


def test_sensitivity_export_spends_exactly_the_average_budget(measured, tmp_path):
    _, path = measured
    calibration = load_calibration(path)
    visual_tokens = calibration.metadata["summary"]["visual_tokens"]
    selector = export(calibration, tmp_path / "s.safetensors", keep_ratio=0.25)  # the default budget
    allocation = selector.metadata["allocation"]
    assert selector.metadata["budget"] == "sensitivity" and allocation["method"] == "measured sensitivity"
    tokens = {int(i): k for i, k in allocation["tokens"].items()}
    assert sum(tokens.values()) == len(calibration.layers) * keep_count_host(visual_tokens, 0.25)
    with pytest.raises(AlvtsError, match="pooled skipped keys"):
        export(calibration, tmp_path / "d.safetensors", keep_ratio=0.25, skipped_keys="drop")


def test_exported_runtime_passes_the_fitted_update_on_by_default(measured, tmp_path):
    model, path = measured
    calibration = load_calibration(path)
    pooled = export(calibration, tmp_path / "s.safetensors", keep_ratio=0.25)
    dropped = export(calibration, tmp_path / "d.safetensors", keep_ratio=0.25, budget="uniform", skipped_keys="drop")
    assert (pooled.metadata["skipped_update"], dropped.metadata["skipped_update"]) == ("linear", "linear")
    for artifact, expected in ((tmp_path / "s.safetensors", "linear"), (tmp_path / "d.safetensors", "linear")):
        attach(model, artifact)
        try:
            assert {layer.alvts_skipped_update.value for layer in decoder_layers(model)} == {expected}
        finally:
            detach(model)


def test_the_measurement_routes_with_the_skipped_update_it_is_given(measured):
    model, path = measured
    selector = calibrated_layers(load_calibration(path))
    grid = budget_grid(int(selector.metadata["calibration"]["visual_tokens"]))
    samples = demo_samples(model, 2)
    done = {index: torch.zeros(len(grid)) for index in selector.layers if index != 2}
    damage = {
        update: measure_sensitivity(model, samples, selector, grid, grid[-1], update, progress=False, done=done)[2]
        for update in (SkippedUpdate.NONE, SkippedUpdate.STAND_IN)
    }
    assert not torch.allclose(damage[SkippedUpdate.NONE], damage[SkippedUpdate.STAND_IN])
    assert float(damage[SkippedUpdate.STAND_IN][-1]) < 1e-6  # every token kept: nothing to update


def test_sensitivity_budget_needs_the_measurement(tmp_path):
    model = demo_model()
    calibration = calibrate(model, demo_samples(model, 2), rank=16, refine_steps=0, sensitivity_samples=0,
                            progress=False)
    assert all(result.budget.damage is None for result in calibration.layers.values())
    with pytest.raises(AlvtsError, match="--sensitivity-samples"):
        export(calibration, tmp_path / "s.safetensors", keep_ratio=0.25)
    export(calibration, tmp_path / "u.safetensors", keep_ratio=0.25, budget="adaptive-update")
    with pytest.raises(AlvtsError, match="sensitivity samples"):
        calibrate(model, demo_samples(model, 1), sensitivity_samples=-1, progress=False)


def test_interrupted_measurement_resumes_without_measuring_any_budget_twice(tmp_path, monkeypatch):
    model = demo_model()
    samples = demo_samples(model, 2)
    options = dict(rank=16, refine_steps=0, sensitivity_samples=2, progress=False)
    reference = calibrate(model, samples, **options)
    visual_tokens = reference.metadata["summary"]["visual_tokens"]
    checkpoint = tmp_path / "calib.partial.safetensors"
    original = sensitivity_module.BudgetSweepPolicy
    measured: list[tuple[int, int]] = []  # (layer, budget) pairs, as the sweeps ask for them
    crash = [True]
    layer_of: dict = {}

    def crash_at_layer_2(selector, fractions, importance):
        layer = layer_of[id(selector)]
        if layer == 2 and crash[0]:
            raise KeyboardInterrupt
        measured.extend((layer, round(float(f) * visual_tokens)) for f in fractions)
        return original(selector, fractions, importance)

    real_measure = sensitivity_module.measure_sensitivity

    def tracking_measure(model, samples, selector, *args, **kwargs):
        layer_of.update({id(s): i for i, s in selector.layers.items()})
        return real_measure(model, samples, selector, *args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "BudgetSweepPolicy", crash_at_layer_2)
    monkeypatch.setattr("alvts_calib.calibration.pipeline.measure_sensitivity", tracking_measure)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, samples, checkpoint=checkpoint, **options)
    saved = load_calibration(checkpoint)
    assert [i for i, r in sorted(saved.layers.items()) if r.budget.damage is not None] == [0, 1]
    assert saved.unfinished() == "every layer calibrated, the sensitivity measurement unfinished"
    before = list(measured)
    crash[0] = False
    resumed = calibrate(model, samples, checkpoint=checkpoint, **options)
    assert not set(before) & set(measured[len(before):])  # nothing measured before is measured again
    assert len(set(measured)) == len(measured)
    for index, result in reference.layers.items():
        assert resumed.layers[index].budget.damage_budgets.tolist() == result.budget.damage_budgets.tolist()
        torch.testing.assert_close(resumed.layers[index].budget.damage, result.budget.damage, rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llama"])
def test_measuring_from_each_layers_input_equals_routing_the_whole_model(family, make_selector):
    """The measurement runs each sweep from the layer's captured input on; routing the whole model per sample and
    budget (as before the prefix was reused) gives the same divergences."""
    model = TINY_MODELS[family]("sdpa")
    samples = [tiny_inputs(model, batch=2, seed=seed) for seed in range(2)]
    selector = make_selector(model, 1.0)
    grid = [0, 2, 4, 8, 16]
    measured = measure_sensitivity(model, samples, selector, grid, 16, SkippedUpdate.NONE, progress=False)
    prepared = prepare_samples(model, samples)
    for index in selector.layers:
        policy = BudgetSweepPolicy(selector.layers[index], torch.tensor(grid, dtype=torch.float64) / 16,
                                   selector.importance)
        whole = swept_divergence(model, prepared, {index: policy}, len(grid), selector, SkippedUpdate.NONE)
        torch.testing.assert_close(measured[index], whole, rtol=1e-4, atol=1e-6)
        assert float(whole[0]) > 0  # skipping the image there moves the answer: the comparison can fail

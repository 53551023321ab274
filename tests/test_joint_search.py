"""Joint refinement of the sensitivity split: the search, its batched objective, and calibrate/export around it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import alvts_calib.calibration.pipeline as pipeline_module
from alvts_calib import AlvtsError, calibrate, export, load_calibration
from alvts_calib.artifact.config import SkippedKeys, SkippedUpdate
from alvts_calib.artifact.export import calibrated_layers, keep_ratio_at
from alvts_calib.calibration.joint_search import joint_divergences, refine_split
from alvts_calib.calibration.sensitivity import BudgetSweepPolicy, kl_divergence
from alvts_calib.runtime.attach import attach_policies, detach
from alvts_calib.runtime.policies import SelectorPolicy
from alvts_calib.testing.random_model import demo_model, demo_samples
from alvts_calib.testing.whole_model import prepare_samples, routed_log_probs, swept_divergence
from alvts_calib.tokens import selected_beside_stand_in

VISUAL = 16
WEIGHTS = (1.0, 3.0, 0.5, 2.0)


def separable(split: tuple[int, ...]) -> float:
    """A convex decreasing cost per layer, heavier for some layers."""
    return sum(weight * math.exp(-budget / 4) for weight, budget in zip(WEIGHTS, split, strict=True))


def _valid_splits(total: int, layers: int):
    budgets = [0, *range(2, VISUAL + 1)]
    return [split for split in itertools.product(budgets, repeat=layers) if sum(split) == total]


def test_the_search_reaches_the_best_split_of_a_separable_cost_and_keeps_the_total():
    start = [12, 2, 12, 2]
    calls = []

    def divergences(splits):
        calls.append(list(splits))
        return [separable(split) for split in splits]

    result = refine_split(divergences, start, VISUAL, max_evaluations=1000, progress=False)
    best = min(_valid_splits(sum(start), len(start)), key=separable)
    assert sum(result.tokens) == sum(start)
    assert all(budget == 0 or 2 <= budget <= VISUAL for budget in result.tokens)
    assert result.divergence_after == pytest.approx(separable(best))
    assert result.divergence_before == pytest.approx(separable(tuple(start)))
    assert result.divergence_after < result.divergence_before
    measured = [split for batch in calls for split in batch]
    assert max(len(batch) for batch in calls) > 1  # splits are measured in batches
    assert result.evaluations == len(measured) == len(set(measured))  # none measured twice


def test_the_search_stops_at_its_evaluation_cap_and_never_gets_worse():
    start = [2, 2, 2, 12]
    result = refine_split(lambda splits: [separable(s) for s in splits], start, VISUAL, max_evaluations=5,
                          progress=False)
    assert result.evaluations <= 5 + 2 * len(start) + 8  # the cap is checked between rounds
    assert result.divergence_after <= result.divergence_before
    assert sum(result.tokens) == sum(start)


def test_a_batch_of_splits_measures_what_routing_each_split_alone_gives():
    model = demo_model()
    samples = demo_samples(model, 2)
    calibration = calibrate(model, samples, rank=16, refine_steps=0, sensitivity_samples=0, progress=False)
    selector = calibrated_layers(calibration)
    layers = sorted(selector.layers)
    splits = [tuple([VISUAL] * len(layers)), (2, 4, 0, 9)[: len(layers)], (5, 3, 16, 2)[: len(layers)]]
    batched = joint_divergences(model, samples, selector, VISUAL, SkippedUpdate.STAND_IN)(splits)
    prepared = prepare_samples(model, samples)
    for split, value in zip(splits, batched, strict=True):
        policies = {
            index: SelectorPolicy(selector.layers[index], selected_beside_stand_in(k, VISUAL) / VISUAL,
                                  selector.importance)
            for index, k in zip(layers, split, strict=True)
        }
        attach_policies(model, policies, selector=selector, skipped_update=SkippedUpdate.STAND_IN,
                        skipped_keys=SkippedKeys.POOL)
        try:
            alone = torch.cat([kl_divergence(reference, routed_log_probs(model, inputs, mask))
                               for inputs, mask, reference in prepared])
        finally:
            detach(model)
        assert value == pytest.approx(float(alone.clamp(min=0).mean()), abs=1e-5)
    assert batched[0] == pytest.approx(0.0, abs=1e-6)  # every token kept: the unrouted model
    assert batched[1] > 1e-4


def test_the_objective_runs_the_vision_tower_once_per_sample_and_the_layers_from_the_first_routed_one():
    """Evaluations start from each sample's captured input to the first routed layer (here layer 1): the same
    divergences as routing the whole model per evaluation, without running the image encoder again."""
    model = demo_model()
    samples = demo_samples(model, 2)
    calibration = calibrate(model, samples, rank=16, refine_steps=0, sensitivity_samples=0, start_layer=1,
                            progress=False)
    selector = calibrated_layers(calibration)
    layers = sorted(selector.layers)
    assert layers[0] == 1
    splits = [(2, 4, 0), (VISUAL, 3, 9)]
    encoded: list[int] = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(1))
    try:
        objective = joint_divergences(model, samples, selector, VISUAL, SkippedUpdate.STAND_IN)
        batched = objective(splits)
        assert objective(splits[:1]) == pytest.approx(batched[:1], rel=1e-3)  # batch size changes float order only
    finally:
        handle.remove()
    assert len(encoded) == len(samples)  # once per sample, for every evaluation
    fractions = torch.tensor(splits, dtype=torch.float64).T / VISUAL
    policies = {index: BudgetSweepPolicy(selector.layers[index], fractions[position], selector.importance)
                for position, index in enumerate(layers)}
    whole = swept_divergence(model, prepare_samples(model, samples), policies, len(splits), selector,
                             SkippedUpdate.STAND_IN)
    assert batched == pytest.approx(whole.tolist(), rel=1e-4, abs=1e-6)
    assert min(batched) > 1e-5  # the splits move the answer: the comparison can fail


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    model = demo_model()
    samples = demo_samples(model, 2)
    checkpoint = tmp_path_factory.mktemp("refined") / "calib.partial.safetensors"
    calibration = calibrate(model, samples, rank=16, refine_steps=0, sensitivity_samples=2,
                            refine_compressions=(0.75,), refine_evaluations=30, checkpoint=checkpoint,
                            progress=False)
    return model, samples, calibration, checkpoint


def test_calibration_records_the_refined_split_and_export_uses_it_at_its_keep_ratio(refined, tmp_path):
    _, _, calibration, _ = refined
    num_layers = len(calibration.layers)
    (count, entry), = calibration.metadata["refined_budgets"].items()
    assert int(count) == 4 and entry["compression"] == 0.75  # 25% of 16 visual tokens per layer
    assert entry["divergence_after"] <= entry["divergence_before"]
    assert sum(entry["tokens"].values()) == 4 * num_layers and entry["samples"] == 2
    assert keep_ratio_at(calibration, 0.75) == 4 / VISUAL  # what `alvts export --compression 0.75` exports at
    selector = export(calibration, tmp_path / "s.safetensors", keep_ratio=keep_ratio_at(calibration, 0.75))
    allocation = selector.metadata["allocation"]
    assert allocation["method"] == "measured sensitivity, refined jointly"
    assert allocation["tokens"] == entry["tokens"]
    other = export(calibration, tmp_path / "o.safetensors", keep_ratio=6 / VISUAL)
    assert other.metadata["allocation"]["method"] == "measured sensitivity"  # no refined split for 6 tokens
    updates = export(calibration, tmp_path / "u.safetensors", keep_ratio=4 / VISUAL, budget="adaptive-update")
    assert updates.metadata["allocation"]["method"] == "update-weighted water-filling"  # refined only sensitivity


def test_a_resumed_calibration_keeps_its_refined_split(refined, monkeypatch):
    model, samples, calibration, checkpoint = refined
    assert load_calibration(checkpoint).metadata["refined_budgets"] == calibration.metadata["refined_budgets"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the split was refined again")

    monkeypatch.setattr(pipeline_module, "refine_budget", must_not_run)
    resumed = calibrate(model, samples, rank=16, refine_steps=0, sensitivity_samples=2,
                        refine_compressions=(0.75,), refine_evaluations=30, checkpoint=checkpoint, progress=False)
    assert resumed.metadata["refined_budgets"] == calibration.metadata["refined_budgets"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refine_compressions": (1.5,)}, "compression must be in"),
        ({"refine_compressions": (0.75,), "sensitivity_samples": 0}, "needs the sensitivity measurement"),
        ({"refine_compressions": (0.75,), "refine_evaluations": 0}, "refine evaluations must be at least 1"),
    ],
)
def test_nonsense_refinement_options_are_rejected_before_any_work(options, message):
    model = demo_model()
    with pytest.raises(AlvtsError, match=message):
        calibrate(model, demo_samples(model, 1), **options, progress=False)

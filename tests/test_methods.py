"""Selection policies and matched-budget plans: ALVTS, oracle, random, FastV, PyramidDrop and DART."""

from __future__ import annotations

import pytest
import torch

from alvts_calib.artifact.config import SkippedKeys
from alvts_calib.errors import AlvtsError
from alvts_calib.evaluation.baselines import ExactPolicy, retained
from alvts_calib.evaluation.harness import DEFAULT_METHODS, build_plans, check_methods, default_methods
from alvts_calib.evaluation.plans import alvts_plan, dart_plan, fastv_plan, oracle_plan, pyramid_plan, random_plan
from alvts_calib.model.adapters import AttentionGeometry, decoder_layers
from alvts_calib.runtime.attach import attach_policies, detach, last_visual_pass
from alvts_calib.runtime.policies import KeepAllPolicy, SelectorPolicy
from alvts_calib.selector.importance import Importance
from alvts_calib.testing.selectors import weight_svd_selector
from alvts_calib.tokens import check_compression, per_layer_count

STATIC_PLANS = {"fastv": fastv_plan, "pyramiddrop": pyramid_plan, "dart": dart_plan}


def _run(case, plan_policies: dict) -> tuple[torch.Tensor, object]:
    """Logits and routing context of one prefill with `plan_policies` (every other layer keeps everything)."""
    model = case.model
    policies = {i: plan_policies.get(i, KeepAllPolicy()) for i in range(len(decoder_layers(model)))}
    attach_policies(model, policies)
    try:
        with case.routing():
            logits = model(**case.inputs).logits
        return logits, last_visual_pass(model)
    finally:
        detach(model)


@pytest.mark.parametrize("num_layers,num_visual", [(24, 64), (32, 576), (28, 1296)])
@pytest.mark.parametrize("compression", [0.67, 0.78, 0.89])
def test_plans_use_the_largest_token_counts_within_the_budget(num_layers, num_visual, compression):
    fraction = check_compression(compression)
    budget = fraction * num_layers * num_visual
    for name, build in {"random": lambda f, n_l, n: random_plan(f, n_l, n, 1), **STATIC_PLANS}.items():
        plan = build(fraction, num_layers, num_visual)
        if plan is None:
            assert name in STATIC_PLANS and per_layer_count(fraction, num_layers, num_visual, 2) in (None, 0)
            continue
        assert len(plan.planned_tokens) == num_layers
        assert sum(plan.planned_tokens) <= budget + 1e-6, name
        if name != "pyramiddrop":  # one more token in every pruned layer would break the budget
            pruned = sum(count < num_visual for count in plan.planned_tokens)
            assert sum(plan.planned_tokens) + pruned > budget, name


@pytest.mark.parametrize(("compression", "num_layers", "num_visual", "full", "expected"),
                         [(0.8, 24, 10, 0, 2), (0.8, 24, 5, 0, 1), (0.67, 24, 575, 1, 173)])
def test_per_layer_counts_are_not_lost_to_float_rounding(compression, num_layers, num_visual, full, expected):
    assert per_layer_count(check_compression(compression), num_layers, num_visual, full) == expected


def test_pyramiddrop_halves_at_quarter_depths():
    plan = pyramid_plan(0.33, 24, 576)
    counts = plan.planned_tokens
    assert counts[:2] == [576, 576]
    first = counts[2]
    assert counts[2:6] == [first] * 4 and counts[6:12] == [first // 2] * 6
    assert counts[12:18] == [first // 4] * 6 and counts[18:] == [first // 8] * 6


def test_nonsense_compression_is_rejected():
    for value in (-0.1, 1.0, 1.5):
        with pytest.raises(AlvtsError, match="compression"):
            check_compression(value)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llama"])
@pytest.mark.parametrize("method", ["random", "oracle", "fastv", "pyramiddrop", "dart"])
def test_measured_tokens_follow_the_plan(tiny_case, family, method):
    case = tiny_case(family, "eager")
    geometry = AttentionGeometry.of(case.model)
    visual_counts = (case.visual & case.valid).sum(-1)
    num_visual = int(visual_counts[0])
    fraction = 0.7
    plan = {
        "random": lambda: random_plan(fraction, geometry.num_layers, num_visual, 1),
        "oracle": lambda: oracle_plan(Importance.PAPER, fraction, geometry.num_layers, num_visual, 1),
        **{name: (lambda build=build: build(fraction, geometry.num_layers, num_visual))
           for name, build in STATIC_PLANS.items()},
    }[method]()
    _, context = _run(case, plan.policies)
    for layer, planned in enumerate(plan.planned_tokens):
        expected = torch.ceil(visual_counts * planned / num_visual - 1e-9).long()
        assert torch.equal(context.processed_counts()[layer].cpu(), expected), (method, layer)


@pytest.mark.parametrize("method", ["alvts-uniform", "oracle", "random"])
def test_pooled_plans_count_the_stand_in_within_the_budget(tiny_case, make_selector, method):
    case = tiny_case("llava", "eager")
    geometry = AttentionGeometry.of(case.model)
    num_visual = int((case.visual & case.valid).sum(-1)[0])
    selector = make_selector(case.model, 1.0)
    plans = {
        keys: build_plans(method, 0.4, num_layers=geometry.num_layers, num_visual=num_visual, selector=selector,
                          skipped_keys=keys)[0]
        for keys in ("drop", "pool")
    }
    dropped, pooled = plans["drop"], plans["pool"]
    assert pooled.skipped_keys is SkippedKeys.POOL and pooled.planned_tokens == dropped.planned_tokens
    assert pooled.policies[1].keep_ratio == dropped.policies[1].keep_ratio - 1 / num_visual
    attach_policies(case.model, {i: pooled.policies.get(i, KeepAllPolicy()) for i in range(geometry.num_layers)},
                    skipped_keys="pool")
    try:
        case.model(**case.inputs)
        measured = last_visual_pass(case.model).processed_counts()
    finally:
        detach(case.model)
    for layer, planned in enumerate(pooled.planned_tokens):  # the runtime processes exactly the planned tokens
        assert int(measured[layer][0]) == planned, layer


def test_static_baselines_run_as_published_whatever_the_skipped_keys(tiny_case):
    for method in ("fastv", "pyramiddrop", "dart"):
        plan, _ = build_plans(method, 0.75, num_layers=24, num_visual=64, skipped_keys="pool")
        assert plan.skipped_keys is SkippedKeys.DROP, method


def test_fastv_keeps_what_the_last_position_attends_to_in_layer_k_minus_1(tiny_case):
    case = tiny_case("llava", "eager")
    with torch.no_grad():
        attentions = case.model(**case.inputs, output_attentions=True).attentions
    num_visual = int(case.visual[0].sum())
    plan = fastv_plan(0.7, 4, num_visual)
    _, context = _run(case, plan.policies)
    last_row = attentions[1][:, :, -1, :].mean(1)  # layer K-1 = 1, head-averaged
    count = plan.planned_tokens[-1]
    expected = torch.zeros_like(case.visual)
    for row in range(expected.shape[0]):
        scores = last_row[row].masked_fill(~(case.visual & case.valid)[row], float("-inf"))
        expected[row, scores.topk(count).indices] = True
    assert torch.equal(retained(context), expected)


def test_pyramiddrop_and_dart_sets_are_nested_and_sized(tiny_case):
    case = tiny_case("llava", "eager")
    num_visual = int(case.visual[0].sum())
    for build in (pyramid_plan, dart_plan):
        plan = build(0.7, 4, num_visual)
        _, context = _run(case, plan.policies)
        assert bool((retained(context) <= (case.visual & case.valid)).all())
        assert retained(context).sum(-1).tolist() == [plan.planned_tokens[-1]] * case.visual.shape[0]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llama"])
def test_the_oracle_matches_a_full_rank_selector(tiny_case, family):
    """A full-rank weight-SVD selector reproduces the full attention, so it must pick the oracle's tokens."""
    from alvts_calib.testing.random_model import sharpen_attention

    case = tiny_case(family, "eager")
    sharpen_attention(case.model)
    geometry = AttentionGeometry.of(case.model)
    selector = weight_svd_selector(case.model, start_layer=1, heads=geometry.num_heads)
    full_rank = {i: SelectorPolicy(layer, 0.5, Importance.PAPER) for i, layer in selector.layers.items()}
    oracle = {i: ExactPolicy(0.5, Importance.PAPER) for i in range(1, geometry.num_layers)}
    logits_selector, _ = _run(case, full_rank)
    logits_oracle, _ = _run(case, oracle)
    torch.testing.assert_close(logits_selector, logits_oracle, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "llama"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_keep_all_everywhere_is_exact(tiny_case, family, backend):
    case = tiny_case(family, backend)
    reference = case.model(**case.inputs).logits
    logits, context = _run(case, {})
    assert torch.equal(logits, reference)
    assert sorted(context.processed_counts()) == list(range(len(decoder_layers(case.model))))


def test_alvts_plan_uses_the_selector_from_its_start_layer(make_selector, tiny_case):
    case = tiny_case("llava", "eager")
    selector = make_selector(case.model, 1.0, start_layer=2)
    plan = alvts_plan(selector, 0.75, 4, 16)
    assert sorted(plan.policies) == [2, 3]
    assert plan.planned_tokens == [16, 16, 8, 8]
    assert all(policy.keep_ratio == 0.5 for policy in plan.policies.values())


def test_static_pruning_refuses_right_padding(tiny_case):
    case = tiny_case("llava", "eager")
    for key in ("input_ids", "attention_mask"):  # move each row's padding to the right
        case.inputs[key] = torch.stack([torch.roll(row, -int((mask == 0).sum()))
                                        for row, mask in zip(case.inputs[key], case.inputs["attention_mask"],
                                                             strict=True)])
    assert not bool(case.inputs["attention_mask"][:, -1].all())
    with pytest.raises(AlvtsError, match="pad batches on the left"):
        _run(case, fastv_plan(0.7, 4, int(case.visual[0].sum())).policies)


def test_the_alvts_row_is_the_toolkits_defaults_and_needs_the_calibration(tiny_case, make_selector):
    selector = make_selector(tiny_case("llava", "eager").model, 1.0)
    with pytest.raises(AlvtsError, match="alvts re-splits each budget over layers from the calibration"):
        check_methods(("alvts",), selector, None)
    with pytest.raises(AlvtsError, match="method alvts-adaptive is now called alvts"):
        check_methods(("alvts-adaptive", "fastv"), selector, None)
    check_methods(default_methods(None), selector, None)  # a selector file alone: alvts-uniform in its place
    assert "alvts-uniform" in default_methods(None) and "alvts" not in default_methods(None)
    assert default_methods(calibration=object()) == DEFAULT_METHODS and DEFAULT_METHODS[0] == "alvts"

"""The continuation-divergence measure of the real-weight evaluation, on the tiny language model."""

from __future__ import annotations

import pytest
import torch

from alvts_calib.artifact.config import SkippedKeys
from alvts_calib.errors import AlvtsError
from alvts_calib.evaluation.divergence import full_references, measure_plan
from alvts_calib.evaluation.flops import layer_flops, skip_update_flops
from alvts_calib.evaluation.plans import Plan, alvts_plan, fastv_plan, random_plan
from alvts_calib.model.adapters import AttentionGeometry
from alvts_calib.model.visual import visual_positions
from alvts_calib.runtime.attach import attach_policies, detach
from alvts_calib.runtime.policies import KeepAllPolicy
from alvts_calib.testing.tiny_models import tiny_inputs, tiny_llama

NEW_TOKENS = 5


def _samples(model, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """One-row prompts with a 16-token span, as the real-weight passages are."""
    inputs = tiny_inputs(model, batch=1)
    samples = []
    for seed in range(count):
        ids = torch.randint(1, 100, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(seed))
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "visual_mask": inputs["visual_mask"]})
    return samples


def test_keeping_every_token_gives_zero_divergence_and_full_agreement():
    model = tiny_llama("sdpa")
    references = full_references(model, _samples(model), NEW_TOKENS)
    keep_all = Plan("keep-all", {i: KeepAllPolicy() for i in range(4)}, [16] * 4)
    result = measure_plan(model, references, keep_all, "keep-all", 0.0)
    assert result.kl == 0.0 and result.top1 == 1.0
    assert result.visual_tokens_per_layer == [16.0] * 4
    assert all(reference.continuation.shape == (1, NEW_TOKENS) for reference in references)


def test_teacher_forced_log_probs_are_what_greedy_decoding_computes():
    """The measure reads the continuation as decoding does: the routed model's step-by-step scores along the same
    tokens equal the teacher-forced ones."""
    model = tiny_llama("eager")
    sample = _samples(model, 1)[0]
    (reference,) = full_references(model, [sample], NEW_TOKENS)
    plan = random_plan(0.5, 4, 16, 0, skipped_keys=SkippedKeys.POOL)
    result = measure_plan(model, [reference], plan, "random", 0.5)
    fresh = random_plan(0.5, 4, 16, 0, skipped_keys=SkippedKeys.POOL)  # the same draws again
    attach_policies(model, fresh.policies, skipped_keys=SkippedKeys.POOL)
    try:
        with visual_positions(model, sample["visual_mask"]):
            prompt = sample["input_ids"]
            out = model(input_ids=prompt, use_cache=True)
            cache, scores = out.past_key_values, [out.logits[0, -1]]
            for token in reference.continuation[0, :-1]:
                out = model(input_ids=token.view(1, 1), cache=cache, use_cache=True)
                cache = out.past_key_values
                scores.append(out.logits[0, -1])
    finally:
        detach(model)
    stepwise = torch.stack(scores).float().log_softmax(-1)
    kl = (reference.log_probs.exp() * (reference.log_probs - stepwise)).sum(-1).clamp(min=0).mean()
    assert result.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
    assert result.kl > 0  # routing half the span moved the distribution: the measure can tell


def test_static_pruning_is_counted_as_the_harness_counts_it():
    model = tiny_llama("sdpa")
    references = full_references(model, _samples(model), NEW_TOKENS)
    plan = fastv_plan(0.75, 4, 16)  # 25% compression: layers 0-1 keep all 16, layers 2-3 keep 8
    result = measure_plan(model, references, plan, "fastv", 0.25)
    assert result.visual_tokens_per_layer == [float(count) for count in plan.planned_tokens]


def test_bad_samples_are_refused():
    model = tiny_llama("sdpa")
    sample = _samples(model, 1)[0]
    with pytest.raises(AlvtsError, match="at least one token"):
        full_references(model, [sample], 0)
    with pytest.raises(AlvtsError, match="one row"):
        full_references(model, [{**sample, "visual_mask": sample["visual_mask"][:, :-1]}], NEW_TOKENS)


def test_flops_count_selection_and_the_skipped_update(make_selector, with_random_skip_updates):
    """The FLOPs ratio counts what `alvts eval` counts: the routed layers, each policy's selection and the fitted
    update of the skipped tokens, against the full model's prefill."""
    model = tiny_llama("sdpa")
    references = full_references(model, _samples(model), NEW_TOKENS)
    selector = with_random_skip_updates(make_selector(model, 0.5, start_layer=1), rank=4)
    plan = alvts_plan(selector, 0.5, 4, 16)
    result = measure_plan(model, references, plan, "alvts", 0.5, skipped_update="linear", selector=selector)
    geometry = AttentionGeometry.of(model)
    intermediate = model.config.intermediate_size
    length = references[0].input_ids.shape[1]
    text = length - 16
    expected = layer_flops(length, geometry, intermediate)  # layer 0 keeps every token
    for index in (1, 2, 3):
        kept = plan.planned_tokens[index]
        expected += layer_flops(text + kept, geometry, intermediate)
        expected += plan.policies[index].selection_flops(length, text, geometry)
        expected += skip_update_flops(16 - kept, geometry.hidden_size, 4)
    full = 4 * layer_flops(length, geometry, intermediate)
    assert 0 < plan.planned_tokens[1] < 16
    assert result.flops_ratio == pytest.approx(expected / full, rel=1e-9)
    unrouted = measure_plan(model, references, Plan("keep-all", {}, [16] * 4), "keep-all", 0.0)
    assert unrouted.flops_ratio == pytest.approx(1.0, rel=1e-12)

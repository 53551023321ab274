"""Stale-state handling: what visual tokens that skip a routed layer receive from it."""

from __future__ import annotations

import pytest
import torch

import alvts_calib.runtime.routing as routing_module
from alvts_calib.errors import AlvtsError
from alvts_calib.model.adapters import decoder_layers
from alvts_calib.runtime.attach import attach
from alvts_calib.selector.skip_map import SkipUpdate

RATIO = 0.25


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_mean_update_moves_skipped_visual_tokens_by_the_mean_processed_update(
    tiny_case, make_selector, layer_io, family
):
    case = tiny_case(family, "sdpa")
    selector = make_selector(case.model, RATIO, start_layer=1)
    before, plain, _ = layer_io(case, selector, "none")
    before_mean, compensated, _ = layer_io(case, selector, "mean")
    assert torch.equal(before, before_mean)  # layer 0 is not routed here
    visual = case.visual & case.valid
    skipped = visual & (plain == before).all(-1)
    processed = visual & ~skipped
    assert bool(skipped.any()) and bool(processed.any())
    torch.testing.assert_close(compensated[~skipped], plain[~skipped])
    for row in range(before.shape[0]):
        mean = (plain[row][processed[row]] - before[row][processed[row]]).mean(0)
        torch.testing.assert_close(compensated[row][skipped[row]], before[row][skipped[row]] + mean)


@pytest.mark.parametrize(
    ("skipped_update", "skipped_keys"), [("mean", "drop"), ("linear", "drop"), ("stand-in", "pool")]
)
def test_a_layer_that_processes_no_visual_token_leaves_them_unchanged(
    tiny_case, make_selector, layer_io, skipped_update, skipped_keys
):
    case = tiny_case("llava", "sdpa")
    selector = make_selector(case.model, RATIO, start_layer=1)
    selector.keep_ratios[1] = 0.0
    hidden = case.model.config.text_config.hidden_size
    selector.skip_updates = {index: SkipUpdate(hidden, 2) for index in selector.layers}
    for module in selector.skip_updates.values():
        torch.nn.init.normal_(module.down.weight)
        torch.nn.init.normal_(module.up.weight)
    before, after, _ = layer_io(case, selector, skipped_update, skipped_keys)
    visual = case.visual & case.valid
    assert torch.equal(after[visual], before[visual])  # no processed token (or stand-in) to take an update from


# Keeps every visual token of the tiny models' rows (ceil(0.999 n) = n) through the routed path: unlike a ratio of
# 1.0, which leaves the layers unpatched, the layers select, compact the padded row and run the skipped update.
EVERY_TOKEN_ROUTED = 0.999


def _counting_compensations(monkeypatch) -> list[int]:
    calls = []
    original = routing_module.compensate_skipped

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(routing_module, "compensate_skipped", counting)
    return calls


def test_mean_update_changes_nothing_when_no_visual_token_skips(tiny_case, make_selector, layer_io, monkeypatch):
    case = tiny_case("llava", "eager")
    reference = case.model(**case.inputs).logits
    selector = make_selector(case.model, EVERY_TOKEN_ROUTED)
    _, _, plain = layer_io(case, selector, "none")
    calls = _counting_compensations(monkeypatch)
    _, _, logits = layer_io(case, selector, "mean")
    assert len(calls) == len(selector.layers)  # every layer ran the update ...
    assert torch.equal(logits, plain)  # ... on no token
    torch.testing.assert_close(logits[case.valid], reference[case.valid])


def test_unknown_skipped_update_is_rejected(tiny_case, make_selector):
    case = tiny_case("llava", "eager")
    with pytest.raises(AlvtsError, match="skipped_update must be one of none, mean, linear"):
        attach(case.model, make_selector(case.model, RATIO), skipped_update="magic")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_linear_update_adds_the_mean_and_the_fitted_map_of_each_tokens_deviation_to_skipped_tokens_only(
    tiny_case, make_selector, layer_io, with_random_skip_updates, linear_update, family
):
    case = tiny_case(family, "sdpa")
    selector = with_random_skip_updates(make_selector(case.model, RATIO, start_layer=1))
    before, plain, _ = layer_io(case, selector, "none")
    _, compensated, _ = layer_io(case, selector, "linear")
    visual = case.visual & case.valid
    skipped = visual & (plain == before).all(-1)
    assert bool(skipped.any())
    torch.testing.assert_close(compensated[~skipped], plain[~skipped])
    expected = linear_update(case, before, plain, visual & ~skipped, selector.skip_updates[1])
    torch.testing.assert_close(compensated[skipped], expected[skipped])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(("skipped_update", "skipped_keys"), [("linear", "drop"), ("stand-in", "pool")])
def test_fitted_updates_change_nothing_when_no_visual_token_skips(
    tiny_case, make_selector, layer_io, with_random_skip_updates, monkeypatch, backend, skipped_update, skipped_keys
):
    case = tiny_case("llava", backend)
    reference = case.model(**case.inputs).logits
    selector = with_random_skip_updates(make_selector(case.model, EVERY_TOKEN_ROUTED))
    _, _, plain = layer_io(case, selector, "none", skipped_keys)
    calls = _counting_compensations(monkeypatch)
    _, _, logits = layer_io(case, selector, skipped_update, skipped_keys)
    assert len(calls) == len(selector.layers)  # every layer ran its fitted map ...
    assert torch.equal(logits, plain)  # ... on no token
    torch.testing.assert_close(logits[case.valid], reference[case.valid])


@pytest.mark.parametrize(("skipped_update", "skipped_keys"), [("linear", "drop"), ("stand-in", "pool")])
def test_fitted_updates_need_a_selector_with_fitted_updates(tiny_case, make_selector, skipped_update, skipped_keys):
    case = tiny_case("llava", "eager")
    with pytest.raises(AlvtsError, match=f"'{skipped_update}' needs fitted skip updates for layers"):
        attach(case.model, make_selector(case.model, RATIO), skipped_update=skipped_update, skipped_keys=skipped_keys)
    assert not hasattr(case.model, "_alvts_runtime")


def test_stand_in_update_needs_pooled_keys(tiny_case, make_selector, with_random_skip_updates):
    case = tiny_case("llava", "eager")
    selector = with_random_skip_updates(make_selector(case.model, RATIO))
    with pytest.raises(AlvtsError, match="skipped_keys 'drop' does not have; use skipped_keys 'pool'"):
        attach(case.model, selector, skipped_update="stand-in", skipped_keys="drop")
    assert not hasattr(case.model, "_alvts_runtime")


def test_stand_in_update_changes_only_skipped_tokens(tiny_case, make_selector, layer_io, with_random_skip_updates):
    case = tiny_case("llava", "sdpa")
    selector = with_random_skip_updates(make_selector(case.model, RATIO, start_layer=1))
    before, plain, _ = layer_io(case, selector, "none", "pool")
    _, updated, _ = layer_io(case, selector, "stand-in", "pool")
    visual = case.visual & case.valid
    skipped = visual & (plain == before).all(-1)
    assert bool(skipped.any())
    torch.testing.assert_close(updated[~skipped], plain[~skipped])
    assert not torch.allclose(updated[skipped], before[skipped])  # (the exact values: tests/test_routing.py)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_exact_update_gives_skipped_tokens_the_unrouted_layers_output(tiny_case, make_selector, layer_io, family):
    case = tiny_case(family, "sdpa")
    selector = make_selector(case.model, RATIO, start_layer=1)  # layer 1's input is the unrouted model's
    before, plain, _ = layer_io(case, selector, "none")
    _, exact, _ = layer_io(case, selector, "exact")
    handle_seen = {}
    handle = decoder_layers(case.model)[1].register_forward_hook(
        lambda module, args, kwargs, output: handle_seen.update(output=output.clone()), with_kwargs=True
    )
    try:
        case.model(**case.inputs)
    finally:
        handle.remove()
    full = handle_seen["output"]
    visual = case.visual & case.valid
    skipped = visual & (plain == before).all(-1)
    assert bool(skipped.any())
    torch.testing.assert_close(exact[skipped], full[skipped])  # skipped tokens: the unrouted layer's update
    torch.testing.assert_close(exact[~skipped], plain[~skipped])  # processed tokens: the routed layer's output
    assert not torch.allclose(exact[skipped], before[skipped])

"""SkippedKeys.ALL: processed tokens see every visual token's own key and value; skipped tokens keep their state
plus the skipped update; every layer caches every token."""

from __future__ import annotations

import pytest
import torch

from alvts_calib.errors import AlvtsError
from alvts_calib.evaluation.flops import (
    attention_on_all_layer_flops,
    decoder_flops,
    keys_all_layer_flops,
    layer_flops,
    projection_flops,
)
from alvts_calib.model.adapters import AttentionGeometry, decoder_layers
from alvts_calib.runtime.attach import attach, detach
from alvts_calib.testing.tiny_models import TINY_MODELS

RATIO = 0.25
FAMILY = pytest.mark.parametrize("family", list(TINY_MODELS))
BACKEND = pytest.mark.parametrize("backend", ["eager", "sdpa"])


@FAMILY
@BACKEND
def test_keys_all_is_exact_at_keep_ratio_one(tiny_case, make_selector, with_random_skip_updates, family, backend):
    case = tiny_case(family, backend)
    reference = case.model(**case.inputs).logits
    reference_gen = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    attach(case.model, with_random_skip_updates(make_selector(case.model, 1.0)), skipped_keys="all",
           skipped_update="linear")
    with case.routing():
        assert torch.equal(case.model(**case.inputs).logits, reference)
        assert torch.equal(case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False), reference_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_processed_tokens_get_the_unrouted_output_and_skipped_tokens_the_linear_update(
    tiny_case, make_selector, layer_io, with_random_skip_updates, linear_update, family
):
    case = tiny_case(family, "sdpa")
    selector = with_random_skip_updates(make_selector(case.model, RATIO, start_layer=1))
    before, full, _ = layer_io(case, None)  # layer 1's input is the unrouted model's
    before_routed, routed, _ = layer_io(case, selector, "linear", "all")
    _, plain, _ = layer_io(case, selector, "none", "all")
    assert torch.equal(before, before_routed)
    visual = case.visual & case.valid
    skipped = visual & (plain == before).all(-1)
    processed = visual & ~skipped
    assert bool(skipped.any()) and bool(processed.any())
    torch.testing.assert_close(routed[~skipped], full[~skipped])
    expected = linear_update(case, before, full, processed, selector.skip_updates[1])
    torch.testing.assert_close(routed[skipped], expected[skipped])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_keys_all_caches_every_token_and_decodes_consistently(tiny_case, make_selector, backend):
    case = tiny_case("llava", backend)
    attach(case.model, make_selector(case.model, RATIO), skipped_keys="all")
    with case.routing():
        prefill = case.model(**case.inputs, use_cache=True)
        gen = case.model.generate(**case.inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    length = case.inputs["input_ids"].shape[1]
    for layer in prefill.past_key_values.layers:
        assert layer.keys.shape[-2] == length  # every layer caches every token, as unpruned
    torch.testing.assert_close(gen.scores[0], prefill.logits[:, -1])
    detach(case.model)
    assert not torch.equal(prefill.logits, case.model(**case.inputs).logits)  # routing changed the prefill


def test_keys_all_takes_no_stand_in_update(tiny_case, make_selector, with_random_skip_updates):
    case = tiny_case("llava", "sdpa")
    selector = with_random_skip_updates(make_selector(case.model, RATIO))
    with pytest.raises(AlvtsError, match="skipped_keys 'all' does not have; use skipped_keys 'pool'"):
        attach(case.model, selector, skipped_update="stand-in", skipped_keys="all")


def test_keys_all_flops_add_the_skipped_tokens_keys_and_values_to_the_routed_layers():
    geometry = AttentionGeometry(32, 4096, 32, 8, 128)
    assert keys_all_layer_flops(600, 600, geometry, 14336) == layer_flops(600, geometry, 14336)
    routed = layer_flops(100, geometry, 14336)
    keys_all = keys_all_layer_flops(100, 600, geometry, 14336)
    skipped_kv = 500 * projection_flops(geometry, 14336)["kv"]
    assert routed + skipped_kv < keys_all < layer_flops(600, geometry, 14336)
    this_runtime = attention_on_all_layer_flops(100, 600, geometry, 14336)  # what SkippedKeys.ALL runs here
    assert attention_on_all_layer_flops(600, 600, geometry, 14336) == layer_flops(600, geometry, 14336)
    assert keys_all < this_runtime < layer_flops(600, geometry, 14336)
    assert decoder_flops([100, 600], 600, geometry, 14336, keys_all=True) == this_runtime + layer_flops(
        600, geometry, 14336
    )
    assert decoder_flops([100, 600], 600, geometry, 14336, keys_all=False) == routed + layer_flops(600, geometry, 14336)


def test_keys_all_runs_the_mlp_on_the_processed_tokens_only(tiny_case, make_selector):
    case = tiny_case("llava", "sdpa")
    attach(case.model, make_selector(case.model, RATIO), skipped_keys="all")
    widths = []
    handle = decoder_layers(case.model)[0].mlp.register_forward_hook(
        lambda module, args, output: widths.append(args[0].shape[1])
    )
    try:
        with case.routing():
            case.model(**case.inputs)
    finally:
        handle.remove()
    num_visual = int((case.visual & case.valid).sum(-1).min())
    assert 0 < widths[0] <= case.inputs["input_ids"].shape[1] - num_visual // 2  # most visual tokens skip the MLP

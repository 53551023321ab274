"""calibrate -> export -> attach -> generate for every family, through the public API."""

from __future__ import annotations

import math

import pytest
import torch

from alvts_calib import attach, attached_selector, calibrate, detach, export, load_selector
from alvts_calib.runtime.routed_cache import RoutedCacheLayer


@pytest.mark.parametrize("skipped_keys", ["drop", "pool"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "llama"])
def test_calibrate_export_attach_generate(family, skipped_keys, tiny_case, tmp_path):
    case = tiny_case(family, "sdpa")
    explicit = {"visual_mask": case.explicit_visual} if case.explicit_visual is not None else {}
    calibration = calibrate(case.model, [{**case.inputs, **explicit}], rank=16, refine_steps=10, progress=False)
    path = tmp_path / "selector.safetensors"
    export(calibration, path, keep_ratio=0.5, budget="uniform", skipped_keys=skipped_keys)
    reference = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)

    attach(case.model, path)
    ratio = load_selector(path).keep_ratios[0]
    assert attached_selector(case.model).keep_ratios == load_selector(path).keep_ratios
    with case.routing():
        output = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert output.sequences.shape == reference.shape
    cache_layers = output.past_key_values.layers
    prompt = case.inputs["input_ids"].shape[1]
    assert output.past_key_values.get_seq_length() == prompt + 3  # every position counts, skipped ones too
    visual = (case.visual & case.valid).sum(1)
    text = (~case.visual & case.valid).sum(1)
    kept = torch.tensor([math.ceil(ratio * int(n) - 1e-9) for n in visual])
    pooled = (kept > 0) & (kept < visual) if skipped_keys == "pool" else torch.zeros_like(kept, dtype=torch.bool)
    if skipped_keys == "pool":
        assert ratio < 0.5 and pooled.any()  # the stand-in is one of the budget's tokens
    for layer in cache_layers:  # layer 0 is routed too (the default start layer)
        assert isinstance(layer, RoutedCacheLayer)
        assert layer.keys.shape[-2] == int((kept + text + pooled).max()) + 3
        assert torch.equal(layer.key_valid.sum(1).cpu(), kept + text + pooled + 3)
        if skipped_keys == "pool":  # one key per pooled row carries log(skipped count), the rest none
            bias = layer.key_bias.cpu()
            assert torch.equal((bias != 0).sum(1), pooled.long())
            assert torch.allclose(bias.sum(1), torch.where(pooled, (visual - kept).float().log(), 0.0))
        else:
            assert layer.key_bias is None

    detach(case.model)
    assert torch.equal(case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False), reference)


def test_an_artifact_keeping_every_token_is_exact_with_the_defaults(tiny_case, tmp_path):
    case = tiny_case("llava", "sdpa")
    calibration = calibrate(case.model, [case.inputs], rank=16, refine_steps=0, progress=False)
    selector = export(calibration, tmp_path / "s.safetensors", keep_ratio=1.0)  # adaptive-update, pooled keys
    assert set(selector.keep_ratios.values()) == {1.0} and selector.metadata["skipped_keys"] == "pool"
    reference = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
    attach(case.model, tmp_path / "s.safetensors")
    assert torch.equal(case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False), reference)
    detach(case.model)


def test_keep_ratio_override_at_attach(tiny_case, tmp_path):
    case = tiny_case("llava", "eager")
    calibration = calibrate(case.model, [case.inputs], rank=16, refine_steps=0, progress=False)
    export(calibration, tmp_path / "s.safetensors", keep_ratio=0.25, budget="uniform")
    reference = case.model(**case.inputs).logits
    attach(case.model, tmp_path / "s.safetensors", keep_ratio=1.0)
    assert torch.equal(case.model(**case.inputs).logits, reference)

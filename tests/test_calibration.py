"""Calibration: the target importance, the RoPE-aware SVD, refinement, fidelity, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import alvts_calib.calibration.pipeline as calibrate_module
from alvts_calib import (
    AlvtsError,
    CalibrationOptions,
    Importance,
    attach,
    calibrate,
    detach,
    export,
    load_calibration,
    load_selector,
)
from alvts_calib.calibration import calibration_options
from alvts_calib.errors import SampleError
from alvts_calib.model.adapters import AttentionGeometry, decoder_layers
from alvts_calib.testing.random_model import demo_model, demo_samples, sharpen_attention
from alvts_calib.testing.tiny_models import tiny_inputs


@pytest.mark.parametrize("importance", ["text", "paper"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llama"])
def test_target_importance_matches_the_models_own_attention_weights(family, importance, tiny_case):
    case = tiny_case(family, "eager", batch=1)
    sharpen_attention(case.model)
    sample = {**case.inputs, **({"visual_mask": case.explicit_visual} if case.explicit_visual is not None else {})}
    calibration = calibrate(case.model, [sample], rank=16, refine_steps=0, importance=importance, progress=False)
    attentions = case.model(**case.inputs, output_attentions=True).attentions
    visual = case.visual[0]
    text = ~visual
    for index in calibration.layers:
        probs = attentions[index][0].float().mean(0)  # head-averaged (L, L)
        expected = probs[text].mean(0) * (probs[visual].mean(0) if importance == "paper" else 1.0)
        torch.testing.assert_close(calibration.layers[index].heldout_target, expected[visual], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llama"])
@pytest.mark.parametrize("init", ["weight_svd", "data_svd"])
def test_full_rank_svd_selector_reproduces_the_full_attention(family, init, tiny_case):
    case = tiny_case(family, "sdpa")
    sharpen_attention(case.model)
    geometry = AttentionGeometry.of(case.model)
    samples = [{**s, "visual_mask": case.explicit_visual} if case.explicit_visual is not None else s
               for s in [case.inputs]]
    calibration = calibrate(
        case.model, samples, rank=geometry.num_heads * geometry.head_dim, init=init, refine_steps=0, progress=False
    )
    for index, result in calibration.layers.items():
        fidelity = calibration.fidelity(index, keep_ratio=0.25)
        assert fidelity["recall"] == 1.0, (index, fidelity)
        assert fidelity["spearman"] > 0.999, (index, fidelity)
        assert result.stats["loss_init"] < 1e-6


def test_refinement_lowers_the_consistency_loss_and_low_rank_is_not_exact():
    model = demo_model()
    samples = demo_samples(model, 6)
    calibration = calibrate(model, samples, rank=16, refine_steps=60, progress=False)
    for result in calibration.layers.values():
        assert result.stats["loss_refined"] < 0.5 * result.stats["loss_init"]
    recalls = [calibration.fidelity(i, 0.25)["recall"] for i in calibration.layers]
    assert all(0.0 < r <= 1.0 for r in recalls)
    assert min(recalls) < 1.0  # one head of four cannot be exact on sharpened attention


def test_importance_definitions_differ_and_are_recorded():
    model = demo_model()
    samples = demo_samples(model, 2)
    paper = calibrate(model, samples, rank=16, refine_steps=0, importance=Importance.PAPER, progress=False)
    text = calibrate(model, samples, rank=16, refine_steps=0, progress=False)  # the default
    last = calibrate(model, samples, rank=16, refine_steps=0, importance="last", progress=False)
    assert text.importance is Importance.TEXT and last.importance is Importance.LAST
    assert paper.importance is Importance.PAPER
    assert paper.layers[1].heldout_parts.shape[0] == 2 and text.layers[1].heldout_parts.shape[0] == 1
    assert not torch.allclose(paper.layers[1].heldout_target, text.layers[1].heldout_target)


def test_calibration_round_trip_and_rank_truncation(tmp_path):
    model = demo_model()
    calibration = calibrate(model, demo_samples(model, 3), rank=32, refine_steps=10, progress=False)
    path = calibration.save(tmp_path / "calib.safetensors")
    loaded = load_calibration(path)
    assert loaded.metadata == calibration.metadata
    for index in calibration.layers:
        for name, tensor in calibration.layers[index].selector.items():
            assert torch.equal(loaded.layers[index].selector[name], tensor)
        assert loaded.fidelity(index, 0.25) == calibration.fidelity(index, 0.25)
    full = export(loaded, tmp_path / "full.safetensors", keep_ratio=0.25)
    half = export(loaded, tmp_path / "half.safetensors", keep_ratio=0.25, rank=16)
    assert full.layers[1].q_proj.weight.shape[0] == 32 and half.layers[1].q_proj.weight.shape[0] == 16
    assert torch.equal(half.layers[1].q_proj.weight, full.layers[1].q_proj.weight[:16])
    with pytest.raises(AlvtsError, match="rank"):
        export(loaded, tmp_path / "bad.safetensors", keep_ratio=0.25, rank=48)
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(AlvtsError, match="keep ratio"):
            export(loaded, tmp_path / "bad.safetensors", keep_ratio=ratio)


def test_same_inputs_and_seed_give_byte_identical_calibrations_and_artifacts(tmp_path):
    for run in range(2):
        model = demo_model()
        calibration = calibrate(model, demo_samples(model, 3), rank=16, refine_steps=20, seed=7, progress=False)
        calibration.save(tmp_path / f"calib{run}.safetensors")
        export(load_calibration(tmp_path / f"calib{run}.safetensors"), tmp_path / f"run{run}.safetensors",
               keep_ratio=0.25)
    export(load_calibration(tmp_path / "calib0.safetensors"), tmp_path / "again.safetensors", keep_ratio=0.25)
    assert (tmp_path / "calib0.safetensors").read_bytes() == (tmp_path / "calib1.safetensors").read_bytes()
    assert (tmp_path / "run0.safetensors").read_bytes() == (tmp_path / "run1.safetensors").read_bytes()
    assert (tmp_path / "run0.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()


def test_the_recorded_options_as_a_config_calibrate_the_same(tmp_path):
    model = demo_model()
    samples = demo_samples(model, 3)
    by_options = calibrate(model, samples, rank=16, refine_steps=5, seed=3, sensitivity_samples=1, progress=False)
    config = CalibrationOptions(**by_options.metadata["options"])
    by_config = calibrate(model, samples, config, progress=False)
    by_options.save(tmp_path / "options.safetensors")
    by_config.save(tmp_path / "config.safetensors")
    assert (tmp_path / "options.safetensors").read_bytes() == (tmp_path / "config.safetensors").read_bytes()
    with pytest.raises(AlvtsError, match="either a CalibrationOptions or the separate options"):
        calibrate(model, samples, config, rank=32, progress=False)


def test_interrupted_calibration_resumes_with_identical_results(tmp_path, monkeypatch):
    model = demo_model()
    samples = demo_samples(model, 3)
    reference = calibrate(model, samples, rank=16, refine_steps=20, progress=False)

    checkpoint = tmp_path / "calib.partial.safetensors"
    original = calibrate_module._solve_layer
    solved: list[int] = []

    def crash_at_layer_3(layer, index, *args):
        if index == 3:
            raise KeyboardInterrupt
        solved.append(index)
        return original(layer, index, *args)

    monkeypatch.setattr(calibrate_module, "_solve_layer", crash_at_layer_3)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, samples, rank=16, refine_steps=20, checkpoint=checkpoint, progress=False)
    assert checkpoint.exists() and sorted(load_calibration(checkpoint).layers) == [0, 1, 2]

    monkeypatch.setattr(calibrate_module, "_solve_layer", lambda layer, index, *a: solved.append(index) or original(
        layer, index, *a))
    solved.clear()
    resumed = calibrate(model, samples, rank=16, refine_steps=20, checkpoint=checkpoint, progress=False)
    assert solved == [3]  # finished layers were not solved again
    for index in reference.layers:
        for name, tensor in reference.layers[index].selector.items():
            assert torch.equal(resumed.layers[index].selector[name], tensor), (index, name)

    with pytest.raises(AlvtsError, match="different options"):
        calibrate(model, samples, rank=32, refine_steps=20, checkpoint=checkpoint, progress=False)


def test_bad_calibration_input_gives_clear_errors():
    model = demo_model()
    samples = demo_samples(model, 1)
    with pytest.raises(AlvtsError, match="empty"):
        calibrate(model, [], progress=False)
    with pytest.raises(AlvtsError, match="rank"):
        calibrate(model, samples, rank=24, progress=False)  # not a multiple of head_dim 16
    with pytest.raises(AlvtsError, match="rank"):
        calibrate(model, samples, rank=128, progress=False)  # more than heads x head_dim
    with pytest.raises(AlvtsError, match="start layer"):
        calibrate(model, samples, start_layer=4, progress=False)
    with pytest.raises(AlvtsError, match="start layer"):
        calibrate(model, samples, start_layer=-1, progress=False)
    text_only = {k: v for k, v in samples[0].items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == 100, 5)
    with pytest.raises(AlvtsError, match="visual tokens"):
        calibrate(model, [text_only], progress=False)


def _layer_output(model, inputs, index):
    seen = {}
    handle = decoder_layers(model)[index].register_forward_hook(
        lambda module, args, kwargs, output: seen.update(input=args[0] if args else kwargs["hidden_states"],
                                                         output=output),
        with_kwargs=True,
    )
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["input"], seen["output"]


@pytest.mark.slow
def test_the_fitted_skip_update_brings_skipped_tokens_closer_to_the_full_layer(tmp_path):
    model = demo_model()
    calibration = calibrate(model, demo_samples(model, 32), rank=16, refine_steps=0, skip_update_rank=8,
                            start_layer=1, progress=False)  # layer 1's input is then the full model's
    stats = calibration.layers[1].stats
    assert 0.0 < stats["skip_update_explained"] <= 1.0
    selector = export(calibration, tmp_path / "selector.safetensors", keep_ratio=0.25)
    assert load_selector(tmp_path / "selector.safetensors").skip_updates[1].state_dict().keys() == {
        "down.weight", "up.weight", "up.bias"}
    held_out = tiny_inputs(model, batch=2, seed=99)
    _, full = _layer_output(model, held_out, 1)
    errors, skipped = {}, None
    for update in ("none", "mean", "linear"):
        attach(model, selector, skipped_update=update)
        try:
            before, routed = _layer_output(model, held_out, 1)
        finally:
            detach(model)
        skipped = (routed == before).all(-1) if skipped is None else skipped  # from "none": unchanged tokens
        errors[update] = float((routed - full)[skipped].pow(2).sum())
    assert errors["linear"] < 0.5 * errors["none"], errors
    assert errors["linear"] < errors["mean"], errors


def test_skip_updates_round_trip_resume_and_can_be_turned_off(tmp_path):
    model = demo_model()
    samples = demo_samples(model, 3)
    calibration = calibrate(model, samples, rank=16, refine_steps=0, skip_update_rank=4,
                            checkpoint=tmp_path / "calib.safetensors", progress=False)
    loaded = load_calibration(tmp_path / "calib.safetensors")
    for index, result in calibration.layers.items():
        for name, tensor in result.skip_update.items():
            assert torch.equal(loaded.layers[index].skip_update[name], tensor)
    assert calibration.layers[1].skip_update["down.weight"].shape == (4, model.config.text_config.hidden_size)
    without = calibrate(model, samples, rank=16, refine_steps=0, skip_update_rank=0, progress=False)
    assert all(result.skip_update is None for result in without.layers.values())
    assert export(without, tmp_path / "plain.safetensors", keep_ratio=0.25).skip_updates == {}
    with pytest.raises(AlvtsError, match="skip-update rank"):
        calibrate(model, samples, skip_update_rank=-1, progress=False)


def test_a_checkpoint_from_other_options_says_which_and_how_to_start_over(tmp_path, capsys):
    model = demo_model()
    samples = demo_samples(model, 2)
    checkpoint = tmp_path / "calib.partial.safetensors"
    options = dict(refine_steps=0, sensitivity_samples=0, checkpoint=checkpoint)
    calibrate(model, samples, rank=16, progress=False, **options)
    with pytest.raises(AlvtsError, match=r"different options \(rank 16 there, 32 now\); to start over delete it "
                                         r"\(`alvts calibrate --no-resume` does\), or choose another output path"):
        calibrate(model, samples, rank=32, progress=False, **options)
    with pytest.raises(AlvtsError, match=r"made with different calibration data; to start over"):
        calibrate(model, samples[:1], rank=16, progress=False, **options)
    capsys.readouterr()
    calibrate(model, samples, rank=16, progress=True, **options)
    assert f"resuming from {checkpoint}: 4 layer(s) already calibrated" in capsys.readouterr().err


def test_options_and_samples_the_model_cannot_take_are_named(tmp_path):
    model = demo_model()
    samples = demo_samples(model, 3)
    for options, message in ((dict(refine_steps=-1), "refine steps must be 0"),
                             (dict(heldout_fraction=1.0), r"held-out fraction must be in \[0, 1\)"),
                             (dict(importance="bogus"), "importance must be one of")):
        with pytest.raises(AlvtsError, match=message):
            calibrate(model, samples, progress=False, **options)
    broken = [samples[0], {**samples[1], "pixel_values": samples[1]["pixel_values"][..., :20, :20]}, samples[2]]
    with pytest.raises(SampleError, match=r"calibration sample 2: .*; fix or leave out that row") as error:
        calibrate(model, broken, progress=False)
    assert error.value.index == 1 and "\n" not in str(error.value)
    model.config.text_config.max_position_embeddings = samples[0]["input_ids"].shape[1] - 1
    with pytest.raises(SampleError, match=r"calibration sample 1: it has \d+ tokens, more than the model's \d+ pos"):
        calibrate(model, samples, progress=False)


@pytest.mark.parametrize(("heads", "head_dim", "rank", "skip_rank"), [
    (4, 16, 64, 8),  # the demo: every head (256 would exceed them), hidden / 8
    (9, 64, 256, 64),  # SmolLM2-135M: four heads reach 256; 576 / 8 capped at 64
    (32, 128, 256, 64),  # LLaVA-1.5-7B: two heads are 256 already
])
def test_default_ranks_follow_the_model_width(heads, head_dim, rank, skip_rank):
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads,
                         num_hidden_layers=2, intermediate_size=4 * heads * head_dim)
    options = dict(start_layer=0, importance="text", init="weight_svd", refine_steps=0, heldout_fraction=0.0,
                   report_keep_ratio=0.11, seed=0, sensitivity_samples=0, refine_compressions=(), refine_evaluations=1)
    defaults = calibration_options(config, rank=None, skip_update_rank=None, **options)
    assert (defaults.rank, defaults.skip_update_rank) == (rank, skip_rank)
    chosen = calibration_options(config, rank=head_dim, skip_update_rank=4, **options)
    assert (chosen.rank, chosen.skip_update_rank) == (head_dim, 4)

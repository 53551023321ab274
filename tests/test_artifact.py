"""Selector artifacts: round trip, atomic writes, clear errors for corrupt or foreign files, fuzzing."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from alvts_calib import AlvtsError, ArtifactError, ModelMismatchError, attach, calibrate, export, load_selector
from alvts_calib.artifact.selector import METADATA_KEY, Selector
from alvts_calib.testing.random_model import demo_model, demo_samples
from alvts_calib.testing.tiny_models import tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = demo_model()
    calibration = calibrate(model, demo_samples(model, 2), rank=16, refine_steps=5, progress=False)
    path = tmp_path_factory.mktemp("artifact") / "selector.safetensors"
    export(calibration, path, keep_ratio=0.25, budget="uniform", skipped_keys="drop")
    return path


def test_round_trip_keeps_tensors_and_metadata(artifact):
    selector = load_selector(artifact)
    again = load_selector(selector.save(artifact.with_name("copy.safetensors")))
    assert selector.metadata == again.metadata
    assert selector.keep_ratios == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    for index, layer in selector.layers.items():
        for name, tensor in layer.state_dict().items():
            assert torch.equal(again.layers[index].state_dict()[name], tensor)
    assert set(selector.metadata["fidelity"]) == {"0", "1", "2", "3"}
    assert selector.metadata["calibration"]["samples"] == 2


def test_writes_are_atomic_and_leave_no_temporary_files(artifact, tmp_path):
    load_selector(artifact).save(tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_attaching_to_another_model_names_the_mismatch(artifact):
    with pytest.raises(ModelMismatchError, match="family"):
        attach(tiny_qwen2_5_vl(), artifact)
    other_weights = demo_model()
    with torch.no_grad():
        other_weights.model.language_model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(ModelMismatchError, match="different weights"):
        attach(other_weights, artifact)


def test_truncated_and_foreign_files_give_clear_errors(artifact, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(artifact.read_bytes()[: len(artifact.read_bytes()) // 2])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_selector(truncated)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_selector(text)
    with pytest.raises(ArtifactError, match="no such file"):
        load_selector(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(ArtifactError, match="no ALVTS metadata"):
        load_selector(plain)


def _rewrite_metadata(source, target, change) -> None:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    change(metadata, tensors)
    save_file(tensors, target, metadata={METADATA_KEY: json.dumps(metadata)})


def test_unknown_format_version_and_missing_tensors(artifact, tmp_path):
    future = tmp_path / "future.safetensors"
    _rewrite_metadata(artifact, future, lambda m, t: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_selector(future)
    calibration_like = tmp_path / "other.safetensors"
    _rewrite_metadata(artifact, calibration_like, lambda m, t: m.update(format="alvts-calibration"))
    with pytest.raises(ArtifactError, match="expected a alvts-selector"):
        load_selector(calibration_like)
    missing = tmp_path / "missing_tensor.safetensors"
    _rewrite_metadata(artifact, missing, lambda m, t: t.pop("layers.2.k_proj.weight"))
    with pytest.raises(ArtifactError, match=r"tensor layers.2.k_proj.weight is missing; re-export it"):
        load_selector(missing)
    nonsense = tmp_path / "ratio.safetensors"
    _rewrite_metadata(artifact, nonsense, lambda m, t: m["keep_ratios"].update({"1": 3.0}))
    with pytest.raises(ArtifactError, match=r"keep_ratios\['1'\] must be in \[0.0, 1.0\], got 3.0"):
        load_selector(nonsense)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_fuzz_only_raises_artifact_errors(artifact, tmp_path, data):
    original = artifact.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "random", "header"]))
    if kind == "truncate":
        blob = original[: data.draw(st.integers(0, len(original) - 1))]
    elif kind == "flip":
        position = data.draw(st.integers(0, len(original) - 1))
        blob = original[:position] + bytes([original[position] ^ data.draw(st.integers(1, 255))]) + original[
            position + 1 :]
    elif kind == "header":
        header_length = int.from_bytes(original[:8], "little")
        position = data.draw(st.integers(8, 8 + header_length - 1))
        blob = original[:position] + data.draw(st.binary(min_size=1, max_size=8)) + original[position + 1 :]
    else:
        blob = data.draw(st.binary(max_size=512))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(blob)
    try:
        selector = load_selector(path)
    except ArtifactError:
        return
    assert selector.layers  # a mutation that still parses must give a usable selector


def _one_line_error(path, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as error:
        load_selector(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m, t: m.update(fingerprint={}), r"metadata.fingerprint lacks family, num_layers"),
    (lambda m, t: m.update(fingerprint={"head_dim": 16}), r"metadata.fingerprint lacks family"),
    (lambda m, t: m.update(fingerprint="llava"), r"metadata.fingerprint must be an object, got a string"),
    (lambda m, t: m.update(keep_ratios=[0.25, 0.25]), r"metadata.keep_ratios must be an object, got a list"),
    (lambda m, t: m.update(keep_ratios={}), r"metadata.keep_ratios must not be empty"),
    (lambda m, t: m["keep_ratios"].update({"-1": 0.25}), r"has key '-1', which is not a layer index"),
    (lambda m, t: m["keep_ratios"].update({"30": 0.25}), r"keep_ratios names layer\(s\) \[30\] outside 0..3"),
    (lambda m, t: m.update(rank="32"), r"metadata.rank must be a whole number, got a string"),
    (lambda m, t: m["fingerprint"].update(num_layers=True), r"num_layers must be a whole number, got true/false"),
    (lambda m, t: m.update(calibration="none"), r"metadata.calibration must be an object, got a string"),
    (lambda m, t: m["calibration"].update(options="fast"), r"calibration.options must be an object, got a string"),
    (lambda m, t: m.pop("importance"), r"metadata lacks importance"),
    (lambda m, t: m.update(surprise=1), r"metadata has unexpected key\(s\) 'surprise'"),
    (lambda m, t: m["fingerprint"]["architecture"].update(deep=[[[[[1]]]]]), r"is nested too deeply"),
    (lambda m, t: t["layers.1.q_proj.weight"].__setitem__((0, 0), float("nan")),
     r"tensor layers.1.q_proj.weight holds NaN or infinite values"),
    (lambda m, t: t.update({"extra": torch.zeros(1)}), r"tensor extra is not part of the format"),
    (lambda m, t: t.update({"layers.2.q_proj.bias": torch.zeros(5)}), r"tensor layers.2.q_proj.bias has shape \(5,\)"),
])
def test_every_metadata_field_and_tensor_is_checked_in_one_line(artifact, tmp_path, change, message):
    broken = tmp_path / "broken.safetensors"
    _rewrite_metadata(artifact, broken, change)
    _one_line_error(broken, message + r".*; re-export it with `alvts export`")


def test_deeply_nested_metadata_is_one_line(artifact, tmp_path):
    deep = tmp_path / "deep.safetensors"
    save_file({"x": torch.zeros(1)}, deep, metadata={METADATA_KEY: "[" * 100_000 + "]" * 100_000})
    _one_line_error(deep, "nested too deeply")


def test_calibration_metadata_is_checked_too(tmp_path):
    from alvts_calib import load_calibration

    model = demo_model()
    path = calibrate(model, demo_samples(model, 1), rank=16, refine_steps=0, sensitivity_samples=0,
                     progress=False).save(tmp_path / "calib.safetensors")
    for change, message in ((lambda m, t: m.update(options="fast"), "metadata.options must be an object"),
                            (lambda m, t: m.pop("summary"), "metadata lacks summary"),
                            (lambda m, t: m["options"].update(rank=-16), r"options.rank must be at least 1"),
                            (lambda m, t: m["layer_stats"].update({"9": {}}), r"layer_stats names layer\(s\) \[9\]"),
                            (lambda m, t: t.pop("heldout.0.target"), "tensor heldout.0.target is missing")):
        broken = tmp_path / "broken.safetensors"
        _rewrite_metadata(path, broken, change)
        with pytest.raises(ArtifactError, match=message + r".*; re-run `alvts calibrate`"):
            load_calibration(broken)


def test_fingerprint_samples_every_layer_and_names_the_part_that_differs(artifact):
    from alvts_calib.model.fingerprint import check_fingerprint

    fingerprint = load_selector(artifact).fingerprint
    layer_one = demo_model()  # the old probe read layers 0, 2 and 3 only
    with torch.no_grad():
        layer_one.model.language_model.layers[1].mlp.down_proj.weight.normal_()
    with pytest.raises(ModelMismatchError, match=r"different weights .*: layer 1 mlp.down_proj.weight differs"):
        check_fingerprint(fingerprint, layer_one)
    tower = demo_model()
    with torch.no_grad():
        tower.model.multi_modal_projector.linear_2.weight.mul_(-1)
    with pytest.raises(ModelMismatchError, match=r"multi_modal_projector.linear_2.weight \(outside the decoder"):
        check_fingerprint(fingerprint, tower)
    norm = demo_model()
    norm.config.text_config.rms_norm_eps = 1e-3
    with pytest.raises(ModelMismatchError, match=r"text.rms_norm_eps is 1e-0\d in the artifact but 0.001"):
        check_fingerprint(fingerprint, norm)
    check_fingerprint(fingerprint, demo_model().to(torch.bfloat16))  # another dtype is the same model


def test_attach_refuses_a_bad_selector_and_leaves_the_model_untouched(artifact):
    from alvts_calib import detach
    from alvts_calib.model.adapters import decoder_layers

    model = demo_model()
    classes = [type(layer) for layer in decoder_layers(model)]
    selector = load_selector(artifact)
    beyond = Selector({**selector.layers, 9: selector.layers[0]}, {**selector.keep_ratios, 9: 0.5},
                      selector.importance, selector.fingerprint)
    broken = load_selector(artifact)
    with torch.no_grad():
        broken.layers[2].k_proj.weight[0, 0] = float("nan")
    for bad, message in ((beyond, r"keep_ratios names layer\(s\) \[9\] outside 0..3"),
                         (broken, "layers.2.k_proj.weight holds NaN")):
        with pytest.raises(ArtifactError, match=message):
            attach(model, bad)
        assert [type(layer) for layer in decoder_layers(model)] == classes
    attach(model, selector)
    with pytest.raises(AlvtsError, match="already attached"):
        attach(model, artifact)
    detach(model)
    assert [type(layer) for layer in decoder_layers(model)] == classes


def test_a_failure_while_patching_undoes_every_patched_layer(artifact, monkeypatch):
    import importlib

    from alvts_calib.model.adapters import decoder_layers

    attach_module = importlib.import_module("alvts_calib.runtime.attach")

    model = demo_model()
    classes = [type(layer) for layer in decoder_layers(model)]
    original = attach_module.route_layer
    calls = []

    def fail_on_the_third(layer, *args):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        original(layer, *args)

    monkeypatch.setattr(attach_module, "route_layer", fail_on_the_third)
    with pytest.raises(RuntimeError, match="out of memory"):
        attach(model, artifact)
    assert [type(layer) for layer in decoder_layers(model)] == classes
    assert not any(hasattr(layer, "alvts_policy") for layer in decoder_layers(model))
    assert not [name for name, _ in model.named_parameters() if "alvts" in name]
    monkeypatch.setattr(attach_module, "route_layer", original)
    attach(model, artifact)  # and a later attach works


def test_fingerprint_samples_stay_inside_large_matrices():
    from alvts_calib.model.fingerprint import SAMPLES_PER_MATRIX, _sampled

    large = torch.ones(1).expand(4096 * 11008)  # a 7B model's MLP matrix, without the memory: float32 positions
    assert _sampled([("mlp", large)], SAMPLES_PER_MATRIX) == [1.0] * SAMPLES_PER_MATRIX  # would round past its end

"""Selector artifacts: round trip, atomic writes, clear errors for corrupt or foreign files, fuzzing."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from alvts_calib import ArtifactError, ModelMismatchError, attach, calibrate, export, load_selector
from alvts_calib.artifact import METADATA_KEY
from alvts_calib.demo import demo_model, demo_samples
from alvts_calib.tiny_models import tiny_qwen2_5_vl


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

"""Models dispatched with accelerate (CPU and disk offload): attach and calibrate follow each layer's device.

A GPU-less machine can still dispatch: offloaded layers keep meta weights that accelerate hooks load around
each forward, which is the situation of a layer on another device. Multi-GPU placement is not exercised here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alvts_calib import attach, calibrate, detach
from alvts_calib.errors import AlvtsError
from alvts_calib.model.adapters import decoder_layers, get_adapter
from alvts_calib.model.devices import align_tensors, execution_device
from alvts_calib.testing.tiny_models import TINY_MODELS, tiny_inputs

accelerate = pytest.importorskip("accelerate")

FAMILIES = ("llava", "qwen2_5_vl")
RATIO = 0.25


def _mixed_device_map(model: nn.Module) -> dict[str, str]:
    """Decoder layers alternate between CPU and disk, the input embeddings go to disk, everything else to CPU."""
    text = get_adapter(model).text_model(model)
    layers = {id(layer): "disk" if i % 2 else "cpu" for i, layer in enumerate(text.layers)}
    layers[id(model.get_input_embeddings())] = "disk"
    device_map, covered = {}, set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if id(module) in layers:
            device_map[name] = layers[id(module)]
            covered.add(name)
        elif list(module.parameters(recurse=False)) or list(module.buffers(recurse=False)):
            device_map[name] = "cpu"
            covered.add(name)
    return device_map


def _dispatch(model: nn.Module, how: str, tmp_path) -> nn.Module:
    model = copy.deepcopy(model)
    if how == "cpu_offload":  # every weight offloaded, loaded around each module's forward
        return accelerate.cpu_offload(model, execution_device="cpu")
    return accelerate.dispatch_model(model, device_map=_mixed_device_map(model), offload_dir=str(tmp_path))


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


@pytest.fixture(params=[(f, h) for f in FAMILIES for h in ("cpu_offload", "disk")], ids=lambda p: "-".join(p))
def dispatched(request, tmp_path, make_selector):
    family, how = request.param
    model = TINY_MODELS[family]("eager")
    inputs = tiny_inputs(model, batch=2)
    selector = make_selector(model, RATIO)
    plain = _logits(model, inputs)
    attach(model, selector)
    routed = _logits(model, inputs)
    detach(model)
    assert (routed - plain).abs().max() > 1e-3, "the keep ratio must change the logits for the test to mean anything"
    remote = _dispatch(model, how, tmp_path)
    assert any(p.is_meta for p in decoder_layers(remote)[1].parameters()), "layer 1 must be offloaded"
    return remote, model, inputs, selector, plain, routed


def test_attach_at_keep_ratio_one_is_bit_identical(dispatched):
    remote, _, inputs, selector, _, _ = dispatched
    unpatched = _logits(remote, inputs)
    attach(remote, selector, keep_ratio=1.0)
    assert torch.equal(_logits(remote, inputs), unpatched)
    detach(remote)
    assert torch.equal(_logits(remote, inputs), unpatched)


def test_routed_dispatched_model_matches_the_routed_local_model(dispatched):
    remote, _, inputs, selector, plain, routed = dispatched
    attach(remote, selector)
    torch.testing.assert_close(_logits(remote, inputs), routed, rtol=1e-5, atol=1e-5)
    for layer in decoder_layers(remote)[1:]:
        weight = layer.alvts_policy.selector.q_proj.weight
        assert weight.device == execution_device(layer) == torch.device("cpu") and weight.dtype == torch.float32
    detach(remote)
    torch.testing.assert_close(_logits(remote, inputs), plain, rtol=0, atol=0)


def test_calibration_on_the_dispatched_model_equals_local_calibration(dispatched):
    remote, local, _, _, _, _ = dispatched
    samples = [tiny_inputs(local, batch=2, seed=seed) for seed in range(3)]
    options = dict(refine_steps=3, progress=False)
    expected = calibrate(local, samples, **options)
    result = calibrate(remote, samples, **options)
    assert sorted(result.layers) == sorted(expected.layers) == [0, 1, 2, 3]
    for index, layer in expected.layers.items():
        for name, tensor in layer.selector.items():
            torch.testing.assert_close(result.layers[index].selector[name], tensor, rtol=1e-5, atol=1e-6)
    assert all(p.is_meta for p in decoder_layers(remote)[1].parameters()), "offloaded weights must be offloaded again"


def test_meta_weights_without_accelerate_hooks_give_a_one_line_error(make_selector):
    model = TINY_MODELS["llava"]("eager")
    selector = make_selector(model, RATIO)
    samples = [tiny_inputs(model, batch=2)]
    model.to("meta")
    for call in (lambda: attach(model, selector), lambda: calibrate(model, samples, progress=False)):
        with pytest.raises(AlvtsError, match="meta device and no accelerate hook loads them") as error:
            call()
        assert "\n" not in str(error.value)


def test_bfloat16_offloaded_layers_get_a_bfloat16_selector(tmp_path, make_selector):
    model = TINY_MODELS["llava"]("eager").to(torch.bfloat16)
    remote = _dispatch(model, "cpu_offload", tmp_path)
    attach(remote, make_selector(model, RATIO))
    weight = decoder_layers(remote)[2].alvts_policy.selector.q_proj.weight
    assert weight.dtype == torch.bfloat16 and weight.device == torch.device("cpu")


def test_per_pass_state_follows_the_layer_device():
    class State:
        def __init__(self):
            self.mask = torch.ones(2, 3, dtype=torch.bool)
            self.counts: dict[int, torch.Tensor] = {}

    state = State()
    align_tensors(state, torch.device("meta"))
    assert state.mask.is_meta and state.counts == {}

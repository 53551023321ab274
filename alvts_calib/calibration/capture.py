"""Capture what decoder layer 0 receives for each calibration sample, then stop the forward pass."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AlvtsError
from ..model.adapters import decoder_layers
from ..model.devices import execution_device
from ..model.visual import VisualTracker

DROPPED_LAYER_KWARGS = ("cache", "past_key_values", "use_cache")


@dataclass
class CapturedBatch:
    """One calibration sample (a batch of rows) as seen by the current decoder layer."""

    hidden: torch.Tensor  # (B, L, D)
    layer_kwargs: dict[str, Any]  # attention_mask, position_embeddings, position_ids, ...
    visual: torch.Tensor  # (B, L) bool
    valid: torch.Tensor  # (B, L) bool

    @property
    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer_kwargs["position_embeddings"]


class _StopForward(Exception):
    pass


def move(value: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the device its input embeddings compute on."""
    return execution_device(model.get_input_embeddings())


def capture_layer_inputs(
    model: nn.Module, sample: Mapping[str, Any], tracker: VisualTracker, storage: torch.device | str
) -> CapturedBatch:
    """Run `model` on `sample` up to decoder layer 0 and return that layer's input and keyword arguments."""
    inputs = dict(sample)
    explicit = inputs.pop("visual_mask", None)
    inputs = move(inputs, input_device(model))
    tracker.reset()
    tracker.explicit = None if explicit is None else torch.as_tensor(explicit).bool()
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, length = hidden.shape[:2]
        captured["hidden"] = hidden.detach()
        captured["kwargs"] = {
            k: v for k, v in kwargs.items() if k not in DROPPED_LAYER_KWARGS and k != "hidden_states"
        }
        captured["visual"] = tracker.take(batch, length, 0, hidden.device)
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
        tracker.explicit = None
    if "hidden" not in captured:
        raise AlvtsError("the model's forward pass never reached decoder layer 0")
    hidden = captured["hidden"]
    mask = inputs.get("attention_mask")
    valid = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    return CapturedBatch(
        hidden=hidden.to(storage),
        layer_kwargs=move(captured["kwargs"], storage),
        visual=captured["visual"].to(storage),
        valid=valid.to(storage),
    )


def sample_length(sample: Mapping[str, Any]) -> int:
    """The sequence length of a sample (batch of rows) of model inputs."""
    tokens = sample.get("input_ids", sample.get("inputs_embeds"))
    if tokens is None:
        return 0
    shape = torch.as_tensor(tokens).shape
    return int(shape[1] if len(shape) > 1 else shape[0])


def data_digest(samples: list[Mapping[str, Any]]) -> str:
    """sha256 over every tensor of every sample, in key order."""
    digest = hashlib.sha256()
    for sample in samples:
        for key in sorted(sample):
            value = sample[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(str((value.dtype, tuple(value.shape))).encode())
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()

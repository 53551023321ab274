"""One adapter per model family: where the decoder layers live and how visual positions are found.

Everything architecture-specific is data in this table; the calibration, solver and routing code
never asks which model it is looking at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AlvtsError

PlaceholderReader = Callable[[Any, dict[str, Any]], torch.Tensor]


def _single_mask(result: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """LLaVA-style get_placeholder_mask returns one (B, L, D) mask."""
    return result[..., 0]


def _image_and_video_masks(result: tuple[torch.Tensor, torch.Tensor], call_kwargs: dict[str, Any]) -> torch.Tensor:
    """Qwen-VL-style get_placeholder_mask returns (image, video); only the one whose features were given counts."""
    image_mask, video_mask = result
    visual = torch.zeros_like(image_mask[..., 0])
    if call_kwargs.get("image_features") is not None:
        visual |= image_mask[..., 0]
    if call_kwargs.get("video_features") is not None:
        visual |= video_mask[..., 0]
    return visual


@dataclass(frozen=True)
class FamilyAdapter:
    """How to find the parts ALVTS touches in one model family."""

    name: str
    model_types: tuple[str, ...]
    auto_class: str  # the transformers Auto* class that loads a checkpoint of this family
    text_model_paths: tuple[str, ...]
    placeholder_paths: tuple[str, ...] = ()
    read_placeholder: PlaceholderReader | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.read_placeholder is not None

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module that owns `.layers` and builds the attention mask)."""
        return _first_submodule(model, self.text_model_paths, f"{self.name} text model")

    def placeholder_owner(self, model: nn.Module) -> nn.Module | None:
        """The module whose `get_placeholder_mask` marks visual positions (None for language models)."""
        if not self.placeholder_paths:
            return None
        return _first_submodule(model, self.placeholder_paths, f"{self.name} multimodal model")


def _first_submodule(model: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    for path in paths:
        try:
            return model.get_submodule(path) if path else model
        except AttributeError:
            continue
    raise AlvtsError(f"could not find the {what} in {type(model).__name__} (looked at {', '.join(map(repr, paths))})")


ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(
        name="llava",
        model_types=("llava",),
        auto_class="AutoModelForImageTextToText",
        text_model_paths=("model.language_model", "language_model"),
        placeholder_paths=("model", ""),
        read_placeholder=_single_mask,
    ),
    FamilyAdapter(
        name="llava_next",
        model_types=("llava_next",),
        auto_class="AutoModelForImageTextToText",
        text_model_paths=("model.language_model", "language_model"),
        placeholder_paths=("model", ""),
        read_placeholder=_single_mask,
    ),
    FamilyAdapter(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        auto_class="AutoModelForImageTextToText",
        text_model_paths=("model.language_model", "language_model"),
        placeholder_paths=("model", ""),
        read_placeholder=_image_and_video_masks,
    ),
    FamilyAdapter(
        name="llama",
        model_types=("llama",),
        auto_class="AutoModelForCausalLM",
        text_model_paths=("model", ""),
    ),
    FamilyAdapter(
        name="qwen2",
        model_types=("qwen2",),
        auto_class="AutoModelForCausalLM",
        text_model_paths=("model", ""),
    ),
)

SUPPORTED_FAMILIES = tuple(adapter.name for adapter in ADAPTERS)


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for `model`, or a clear error listing the supported families."""
    return adapter_for_model_type(getattr(getattr(model, "config", None), "model_type", None))


def adapter_for_model_type(model_type: str | None) -> FamilyAdapter:
    """The adapter for a config's `model_type`, or a clear error listing the supported families."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise AlvtsError(
        f"unsupported model type {model_type!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape facts about a decoder layer's self-attention."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> AttentionGeometry:
        return cls.of_config(model.config)

    @classmethod
    def of_config(cls, model_config: Any) -> AttentionGeometry:
        """The geometry a model config describes (no weights needed)."""
        config = model_config.get_text_config(decoder=True)
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return get_adapter(model).text_model(model).layers

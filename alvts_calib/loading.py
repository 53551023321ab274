"""Load a supported model (and its processor) from a local transformers directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from .adapters import adapter_for_model_type
from .errors import AlvtsError
from .options import torch_dtype


def load_model(
    path: str | Path, *, dtype: str = "auto", attn_implementation: str = "sdpa", device: str | None = None
) -> nn.Module:
    """`from_pretrained` on a local directory, with the Auto class of the model's family; eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AlvtsError(f"{path}: not a transformers model directory (no config.json); pass a local checkpoint folder")
    model_dtype = torch_dtype(dtype, allow_auto=True)
    config = AutoConfig.from_pretrained(path)
    adapter = adapter_for_model_type(config.model_type)
    auto_class = getattr(transformers, adapter.auto_class)
    kwargs: dict[str, Any] = {"dtype": model_dtype, "attn_implementation": attn_implementation}
    if device is not None:
        kwargs["device_map"] = device
    return auto_class.from_pretrained(path, **kwargs).eval()


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor (multimodal) or tokenizer (language model)."""
    config = AutoConfig.from_pretrained(path)
    loader = AutoProcessor if adapter_for_model_type(config.model_type).is_multimodal else AutoTokenizer
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise AlvtsError(
            f"{path}: could not load the processor ({error}); the folder needs its processor files"
        ) from None

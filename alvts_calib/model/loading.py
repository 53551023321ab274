"""Load a supported model (and its processor) from a local transformers directory: safetensors weights only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from ..errors import AlvtsError
from ..options import check_device, torch_dtype
from .adapters import adapter_for_model_type
from .doctor import attention_backend

ATTENTION_CHOICES = ("eager", "sdpa", "flash_attention_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_model(
    path: str | Path, *, dtype: str = "auto", attn_implementation: str = "sdpa", device: str | None = None
) -> nn.Module:
    """`from_pretrained` on a local directory, with the Auto class of the model's family; eval mode.

    Options are checked before anything is loaded: the dtype, an attention implementation usable here, a device
    that exists, and safetensors weights (pickle weights are never loaded).
    """
    path = Path(path)
    config = model_config(path)
    check_load_options(dtype, attn_implementation, device)
    _check_safetensors(path)
    auto_class = getattr(transformers, adapter_for_model_type(config.model_type).auto_class)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, allow_auto=True), "attn_implementation": attn_implementation,
                              "use_safetensors": True}
    if device is not None:
        kwargs["device_map"] = device
    try:
        return auto_class.from_pretrained(path, **kwargs).eval()
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise AlvtsError(f"{path}: could not load the model ({reason})") from error


def model_config(path: str | Path) -> Any:
    """The checkpoint's config, after checking the folder is a transformers model of a supported family."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AlvtsError(f"{path}: not a transformers model directory (no config.json); pass a local checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise AlvtsError(f"{path}: unreadable config.json ({' '.join(str(error).split())})") from error
    adapter_for_model_type(config.model_type)
    return config


def max_positions(path: str | Path) -> int | None:
    """The number of positions the checkpoint's text model takes (None if its config does not say)."""
    return getattr(model_config(path).get_text_config(decoder=True), "max_position_embeddings", None)


def check_load_options(dtype: str, attn_implementation: str, device: str | None) -> None:
    """Check how a model is to be loaded (dtype, attention, device) before anything is read."""
    torch_dtype(dtype, allow_auto=True)
    check_attention(attn_implementation)
    check_device(device)


def check_attention(implementation: str) -> None:
    """Fail unless `implementation` is one the toolkit routes and it can run here (flash_attn installed, a GPU)."""
    if implementation not in ATTENTION_CHOICES:
        raise AlvtsError(
            f"attention implementation must be one of {', '.join(ATTENTION_CHOICES)}, got {implementation!r}"
        )
    backend = attention_backend(implementation)
    if not backend.usable:
        raise AlvtsError(
            f"{implementation} cannot run here: {backend.reason}; use sdpa (`alvts doctor` lists the usable backends)"
        )


def _check_safetensors(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"it holds {', '.join(pickles[:3])}" if pickles else "it holds no weights"
    raise AlvtsError(
        f"{path}: no safetensors weights ({found}); alvts loads safetensors only, never pickle: convert the checkpoint "
        "once where you trust it (save_pretrained(..., safe_serialization=True))"
    )


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor (multimodal) or tokenizer (language model)."""
    config = model_config(path)
    loader = AutoProcessor if adapter_for_model_type(config.model_type).is_multimodal else AutoTokenizer
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise AlvtsError(
            f"{path}: could not load the processor ({' '.join(str(error).split())}); the folder needs its "
            "processor files"
        ) from None

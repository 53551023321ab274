"""Validation of user options, with one-line errors that say what to do."""

from __future__ import annotations

import importlib.util
from enum import Enum
from typing import TypeVar

import torch

from .errors import AlvtsError

E = TypeVar("E", bound=Enum)
DEFAULT_START_LAYER = 0  # the first routed layer; measured on the demo (docs/DESIGN.md)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements over devices
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, *, allow_auto: bool = False) -> torch.dtype | str:
    """The torch dtype called `name` ("auto" passes through where allowed), or a one-line error."""
    if allow_auto and name == "auto":
        return name
    if name not in TORCH_DTYPES:
        choices = (["auto"] if allow_auto else []) + list(TORCH_DTYPES)
        raise AlvtsError(f"dtype must be one of {', '.join(choices)}, got {name!r}")
    return TORCH_DTYPES[name]


def check_keep_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise AlvtsError(f"keep ratio must be in (0, 1], got {keep_ratio}; e.g. 0.11 keeps 64 of 576 visual tokens")


def check_skip_update_rank(rank: int, hidden_size: int) -> None:
    if not 0 <= rank <= hidden_size:
        raise AlvtsError(
            f"skip-update rank must be between 0 (no fitted update) and the hidden size {hidden_size}, got {rank}"
        )


def parse_choice(kind: type[E], value: E | str, name: str) -> E:
    """`value` as a member of the str enum `kind`, or a one-line error naming `name` and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise AlvtsError(f"{name} must be one of {choices}, got {value!r}") from None


def check_device(device: str | None) -> None:
    """Fail unless `device` (a device_map for loading) names a device this machine has, or an accelerate placement."""
    if device is None:
        return
    if device in DEVICE_MAPS:
        if importlib.util.find_spec("accelerate") is None:
            raise AlvtsError(
                f"device {device!r} spreads the model with accelerate, which is not installed; "
                "pip install 'alvts-calib[accelerate]'"
            )
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise AlvtsError(f"device must be cpu, cuda, cuda:N, mps or auto, got {device!r}")
    backend = getattr(torch, parsed.type, None) if parsed.type != "cpu" else None
    available = parsed.type == "cpu" or (backend is not None and backend.is_available())
    if not available:
        raise AlvtsError(f"device {device!r}: no {parsed.type} device is available here (see `alvts doctor`); use cpu")
    if parsed.index is not None and parsed.type != "cpu" and parsed.index >= backend.device_count():
        raise AlvtsError(f"device {device!r}: this machine has {backend.device_count()} {parsed.type} device(s)")

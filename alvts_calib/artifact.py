"""Selector artifacts: safetensors tensors plus JSON metadata in the file header. No pickle anywhere."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ArtifactError
from .importance import Importance
from .selector import SELECTOR_TENSOR_NAMES, LayerSelector
from .skip_update import SkipUpdate, stored_skip_update

SELECTOR_FORMAT = "alvts-selector"
FORMAT_VERSION = 1
METADATA_KEY = "alvts"


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in sorted(tensors.items())}
        save_file(contiguous, temporary, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _read(
    path: str | Path, formats: tuple[str, ...], load_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read metadata (and tensors if asked), checking the file is a readable artifact of one of `formats`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if load_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ArtifactError(f"{path}: not a readable safetensors file ({error}); re-export it") from None
    try:
        metadata = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError, TypeError):
        raise ArtifactError(f"{path}: has no ALVTS metadata; is it an ALVTS artifact?") from None
    if not isinstance(metadata, dict) or metadata.get("format") not in formats:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ArtifactError(f"{path}: expected a {' or '.join(formats)} file, found format {found!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {metadata.get('format_version')!r} is not supported (this toolkit reads "
            f"version {FORMAT_VERSION}); upgrade alvts-calib or re-export the artifact"
        )
    return tensors, metadata


def read_safetensors(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata, checking the file is a readable artifact of `expected_format`."""
    return _read(path, (expected_format,), load_tensors=True)


def read_metadata(path: str | Path, *formats: str) -> dict[str, Any]:
    """Only the checked metadata of an artifact of one of `formats` (no tensor is loaded)."""
    return _read(path, formats, load_tensors=False)[1]


@dataclass
class Selector:
    """An exported selector: per-layer projections, keep ratios and everything needed to check and explain it."""

    layers: dict[int, LayerSelector]
    keep_ratios: dict[int, float]
    importance: Importance
    fingerprint: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    skip_updates: dict[int, SkipUpdate] = field(default_factory=dict)  # fitted updates for skipped tokens

    @property
    def start_layer(self) -> int:
        return min(self.layers)

    @property
    def has_skip_updates(self) -> bool:
        """Whether every routed layer carries a fitted skip update (what "linear" and "stand-in" need)."""
        return set(self.layers) <= set(self.skip_updates)

    def save(self, path: str | Path) -> Path:
        """Write the artifact (atomic)."""
        tensors = {
            f"layers.{index}.{name}": tensor
            for index, selector in self.layers.items()
            for name, tensor in selector.state_dict().items()
        }
        for index, module in self.skip_updates.items():
            tensors.update({f"skip.{index}.{name}": tensor for name, tensor in module.state_dict().items()})
        metadata = {
            **self.metadata,
            "format": SELECTOR_FORMAT,
            "format_version": FORMAT_VERSION,
            "importance": self.importance.value,
            "fingerprint": self.fingerprint,
            "keep_ratios": {str(index): ratio for index, ratio in sorted(self.keep_ratios.items())},
        }
        return write_safetensors(path, tensors, metadata)


def load_selector(path: str | Path) -> Selector:
    """Read a selector artifact written by `export`, with clear errors for anything malformed."""
    tensors, metadata = read_safetensors(path, SELECTOR_FORMAT)
    try:
        head_dim = int(metadata["fingerprint"]["head_dim"])
        keep_ratios = {int(index): float(ratio) for index, ratio in metadata["keep_ratios"].items()}
        layers = {
            index: LayerSelector.from_tensors(
                {name: tensors[f"layers.{index}.{name}"] for name in SELECTOR_TENSOR_NAMES}, head_dim
            )
            for index in keep_ratios
        }
        importance = Importance(metadata["importance"])
        stored = {index: stored_skip_update(tensors, index) for index in keep_ratios}
        skip_updates = {index: SkipUpdate.from_tensors(state) for index, state in stored.items() if state is not None}
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
        raise ArtifactError(
            f"{path}: selector artifact is incomplete or inconsistent ({error!r}); re-export it"
        ) from None
    if not keep_ratios or any(not 0.0 <= ratio <= 1.0 for ratio in keep_ratios.values()):
        raise ArtifactError(f"{path}: selector artifact has no layers or keep ratios outside [0, 1]; re-export it")
    return Selector(layers, keep_ratios, importance, metadata["fingerprint"], metadata, skip_updates)


"""Selector artifacts: safetensors tensors plus JSON metadata in the file header. No pickle anywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ArtifactError
from ..outputs import atomic_write
from ..selector.importance import Importance
from ..selector.layer import SELECTOR_TENSOR_NAMES, LayerSelector
from ..selector.skip_map import SkipUpdate, stored_skip_update
from .config import RuntimeConfig
from .schema import FORMAT_VERSION, SELECTOR_FORMAT, check_metadata, check_selector_tensors

METADATA_KEY = "alvts"


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata atomically (see `outputs.atomic_write`)."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in sorted(tensors.items())}
    header = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata=header))


def _read(
    path: str | Path, formats: tuple[str, ...], load_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read metadata (and tensors if asked), checking the file is a readable artifact of one of `formats` whose
    metadata fits the schema (`schema.check_metadata`)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
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
    except RecursionError:
        raise ArtifactError(f"{path}: its metadata is nested too deeply to be ALVTS metadata; re-export it") from None
    return tensors, check_metadata(metadata, formats, path)


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
    def runtime(self) -> RuntimeConfig:
        """The runtime this artifact records (what `attach` runs unless told otherwise)."""
        return RuntimeConfig.of_artifact(self.metadata, self.keep_ratios, self.importance)

    @property
    def has_skip_updates(self) -> bool:
        """Whether every routed layer carries a fitted skip update (what "linear" and "stand-in" need)."""
        return set(self.layers) <= set(self.skip_updates)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored: `layers.{i}.{q,k}_proj.{weight,bias}` and `skip.{i}.*`."""
        tensors = {
            f"layers.{index}.{name}": tensor
            for index, selector in self.layers.items()
            for name, tensor in selector.state_dict().items()
        }
        for index, module in self.skip_updates.items():
            tensors.update({f"skip.{index}.{name}": tensor for name, tensor in module.state_dict().items()})
        return tensors

    def header(self) -> dict[str, Any]:
        """The metadata as stored."""
        return {
            **self.metadata,
            "format": SELECTOR_FORMAT,
            "format_version": FORMAT_VERSION,
            "importance": getattr(self.importance, "value", self.importance),
            "fingerprint": self.fingerprint,
            "keep_ratios": {str(index): ratio for index, ratio in self.keep_ratios.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact (atomic), after checking it as `load_selector` would."""
        check_selector(self)
        return write_safetensors(path, self.tensors(), self.header())


def check_selector(selector: Selector, where: str = "selector") -> None:
    """Check an in-memory selector against the artifact schema, as if it were saved and read back."""
    header = check_metadata(selector.header(), (SELECTOR_FORMAT,), where)
    check_selector_tensors(header, selector.tensors(), where)


def load_selector(path: str | Path) -> Selector:
    """Read a selector artifact written by `export`; anything malformed is a one-line error (see `schema`)."""
    tensors, metadata = read_safetensors(path, SELECTOR_FORMAT)
    check_selector_tensors(metadata, tensors, path)
    head_dim = metadata["fingerprint"]["head_dim"]
    keep_ratios = {int(index): float(ratio) for index, ratio in metadata["keep_ratios"].items()}
    layers = {
        index: LayerSelector.from_tensors(
            {name: tensors[f"layers.{index}.{name}"] for name in SELECTOR_TENSOR_NAMES}, head_dim
        )
        for index in keep_ratios
    }
    stored = {index: stored_skip_update(tensors, index) for index in keep_ratios}
    skip_updates = {index: SkipUpdate.from_tensors(state) for index, state in stored.items() if state is not None}
    importance = Importance(metadata["importance"])
    return Selector(layers, keep_ratios, importance, metadata["fingerprint"], metadata, skip_updates)

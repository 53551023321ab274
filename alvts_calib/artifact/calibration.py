"""The result of calibration: per-layer selectors plus held-out statistics, stored as safetensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AlvtsError
from ..selector.importance import Importance
from ..selector.layer import SELECTOR_TENSOR_NAMES, LayerSelector
from ..selector.skip_map import stored_skip_update
from ..selector.solver import fidelity
from .budgets import LayerStatistics, LayerUpdates
from .schema import CALIBRATION_FORMAT, FORMAT_VERSION, check_calibration_tensors, check_metadata
from .selector import SELECTOR_FORMAT, Selector, load_selector, read_metadata, read_safetensors, write_safetensors


@dataclass
class LayerResult:
    """The solved selector of one layer and how well it matches the full attention on held-out samples."""

    selector: dict[str, torch.Tensor]  # LayerSelector state dict (float32)
    heldout_parts: torch.Tensor  # (P, G, N) selector parts over held-out visual tokens
    heldout_target: torch.Tensor  # (N,) full-attention importance of the same tokens
    stats: dict[str, float] = field(default_factory=dict)  # refinement losses, skip-update fit
    budget: LayerStatistics | None = None  # full-attention statistics for budgets (None in older files)
    skip_update: dict[str, torch.Tensor] | None = None  # fitted update for skipped tokens (see `selector.skip_map`)


@dataclass
class Calibration:
    """Everything `export` needs: solved layers, held-out statistics, and how they were made."""

    layers: dict[int, LayerResult]
    heldout_counts: list[int]  # visual tokens per held-out row, in order
    metadata: dict[str, Any]

    @property
    def head_dim(self) -> int:
        return int(self.metadata["fingerprint"]["head_dim"])

    @property
    def rank(self) -> int:
        return int(self.metadata["options"]["rank"])

    @property
    def importance(self) -> Importance:
        return Importance(self.metadata["options"]["importance"])

    @property
    def complete(self) -> bool:
        return set(self._expected_layers) <= set(self.layers)

    @property
    def _expected_layers(self) -> range:
        return range(int(self.metadata["options"]["start_layer"]), int(self.metadata["fingerprint"]["num_layers"]))

    def unfinished(self) -> str | None:
        """What an interrupted run's checkpoint still lacks, in words; None when the calibration is complete."""
        expected = self._expected_layers
        done = len(set(expected) & set(self.layers))
        if done < len(expected):
            return f"{done} of {len(expected)} layers calibrated"
        measured = all(self.layers[i].budget is not None and self.layers[i].budget.damage is not None for i in expected)
        unfinished = self.metadata["summary"].get("sensitivity_unfinished", False)  # set while measuring
        if self.metadata["options"]["sensitivity_samples"] and (unfinished or not measured):
            return "every layer calibrated, the sensitivity measurement unfinished"
        return None

    def budget_statistics(self) -> tuple[dict[int, LayerStatistics], int]:
        """Per-layer budget statistics and the reference visual token count (median per calibration row)."""
        statistics = {index: result.budget for index, result in self.layers.items()}
        visual_tokens = self.metadata["summary"].get("visual_tokens")
        if visual_tokens is None or any(value is None for value in statistics.values()):
            raise AlvtsError(
                "this calibration has no budget statistics (made by an older alvts-calib); re-run `alvts calibrate` "
                "for adaptive budgets, or export with --budget uniform"
            )
        return statistics, int(visual_tokens)

    def refined_budget(self, tokens_per_layer: int) -> dict[int, int] | None:
        """The sensitivity split jointly refined at calibration for this average (layer -> tokens), if any."""
        entry = self.metadata.get("refined_budgets", {}).get(str(tokens_per_layer))
        return None if entry is None else {int(index): int(k) for index, k in entry["tokens"].items()}

    def selector(self, index: int, rank: int | None = None) -> LayerSelector:
        """The solved selector of layer `index`, optionally keeping only its leading `rank` dimensions."""
        selector = LayerSelector.from_tensors(self.layers[index].selector, self.head_dim)
        return selector if rank is None or rank == self.rank else selector.truncated(rank)

    def fidelity(self, index: int, keep_ratio: float, rank: int | None = None) -> dict[str, float]:
        """Held-out top-k recall and Spearman correlation of layer `index` at `keep_ratio` (and, where recorded, the
        share of the skipped-token update's variance the fitted map explains on calibration data and the layer's
        relative update of text rows and visual tokens, which "adaptive-update" budgets follow)."""
        result = self.layers[index]
        heads = None if rank is None else rank // self.head_dim
        measured = fidelity(result.heldout_parts, result.heldout_target, self.heldout_counts, keep_ratio, heads)
        if "skip_update_explained" in result.stats:
            measured["update_explained"] = result.stats["skip_update_explained"]
        if result.budget is not None and result.budget.updates is not None:
            measured["text_update"] = result.budget.updates.text
            measured["visual_update"] = result.budget.updates.visual
        return measured

    def save(self, path: str | Path) -> Path:
        """Write atomically as safetensors with JSON metadata, after checking it as `load_calibration` would."""
        tensors: dict[str, torch.Tensor] = {"heldout.counts": torch.tensor(self.heldout_counts, dtype=torch.long)}
        stats = {}
        for index, result in self.layers.items():
            for name, tensor in result.selector.items():
                tensors[f"layers.{index}.{name}"] = tensor
            tensors[f"heldout.{index}.parts"] = result.heldout_parts
            tensors[f"heldout.{index}.target"] = result.heldout_target
            stats[str(index)] = result.stats
            if result.budget is not None:
                tensors.update(_budget_tensors(index, result.budget))
            for name, tensor in (result.skip_update or {}).items():
                tensors[f"skip.{index}.{name}"] = tensor
        metadata = {**self.metadata, "format": CALIBRATION_FORMAT, "format_version": FORMAT_VERSION,
                    "layer_stats": stats}
        check_calibration_tensors(check_metadata(metadata, (CALIBRATION_FORMAT,), path), tensors, path)
        return write_safetensors(path, tensors, metadata)


def _budget_tensors(index: int, budget: LayerStatistics) -> dict[str, torch.Tensor]:
    """Layer `index`'s budget statistics as named tensors (read back by `_budget_statistics`)."""
    tensors = {
        f"budget.{index}.coverage": budget.coverage,
        f"budget.{index}.visual_share": torch.tensor(budget.visual_share, dtype=torch.float64),
    }
    if budget.updates is not None:
        sizes = [budget.updates.text, budget.updates.visual]
        tensors[f"budget.{index}.updates"] = torch.tensor(sizes, dtype=torch.float64)
        tensors[f"budget.{index}.update_coverage"] = budget.updates.coverage
    if budget.damage is not None:
        tensors[f"budget.{index}.damage_budgets"] = budget.damage_budgets
        tensors[f"budget.{index}.damage"] = budget.damage
    return tensors


def _budget_statistics(tensors: dict[str, torch.Tensor], index: str) -> LayerStatistics | None:
    """Layer `index`'s stored budget statistics, or None for files written before they existed."""
    coverage = tensors.get(f"budget.{index}.coverage")
    if coverage is None:
        return None
    sizes = tensors.get(f"budget.{index}.updates")
    updates = None if sizes is None else LayerUpdates(
        text=float(sizes[0]), visual=float(sizes[1]), coverage=tensors[f"budget.{index}.update_coverage"]
    )
    return LayerStatistics(
        coverage=coverage, visual_share=float(tensors[f"budget.{index}.visual_share"]), updates=updates,
        damage_budgets=tensors.get(f"budget.{index}.damage_budgets"), damage=tensors.get(f"budget.{index}.damage"),
    )


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration (or an unfinished run's checkpoint) written by `Calibration.save`; anything malformed is a
    one-line error (see `schema`)."""
    tensors, metadata = read_safetensors(path, CALIBRATION_FORMAT)
    check_calibration_tensors(metadata, tensors, path)
    metadata = {k: v for k, v in metadata.items() if k not in ("format", "format_version")}
    layers = {
        int(index): LayerResult(
            selector={name: tensors[f"layers.{index}.{name}"] for name in SELECTOR_TENSOR_NAMES},
            heldout_parts=tensors[f"heldout.{index}.parts"],
            heldout_target=tensors[f"heldout.{index}.target"],
            stats=stats,
            budget=_budget_statistics(tensors, index),
            skip_update=stored_skip_update(tensors, index),
        )
        for index, stats in metadata.pop("layer_stats").items()
    }
    return Calibration(layers=layers, heldout_counts=tensors["heldout.counts"].tolist(), metadata=metadata)


def checkpoint_path(out: str | Path) -> Path:
    """Where a calibration written to `out` keeps its progress until it finishes: OUT.partial.safetensors."""
    out = Path(out)
    return out.with_name(out.name + ".partial.safetensors")


def load_artifact(path: str | Path) -> Selector | Calibration:
    """The selector artifact or the calibration at `path`, whichever it is (a one-line error if neither)."""
    if read_metadata(path, SELECTOR_FORMAT, CALIBRATION_FORMAT)["format"] == CALIBRATION_FORMAT:
        return load_calibration(path)
    return load_selector(path)

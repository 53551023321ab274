"""Rendering of artifacts and results for people (rich tables) and scripts (JSON)."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from alvts_calib.doctor import Diagnosis

console = Console()


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout (NaN becomes null)."""
    print(json.dumps(_finite(payload), indent=2, sort_keys=True))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def fidelity_table(fidelity: dict[str, dict[str, float]], keep_ratios: dict[str, float] | None = None) -> Table:
    """Per-layer held-out fidelity, with the mean as the last row."""
    table = Table(title="per-layer selector fidelity (held-out)")
    table.add_column("layer", justify="right")
    if keep_ratios:
        table.add_column("keep ratio", justify="right")
    table.add_column("top-k recall", justify="right")
    table.add_column("spearman", justify="right")
    for layer in sorted(fidelity, key=int):
        ratio = [f"{keep_ratios[layer]:.3f}"] if keep_ratios else []
        table.add_row(layer, *ratio, f"{fidelity[layer]['recall']:.3f}", f"{fidelity[layer]['spearman']:.3f}")
    recalls = [f["recall"] for f in fidelity.values()]
    spearmans = [f["spearman"] for f in fidelity.values()]
    table.add_row("mean", *([""] if keep_ratios else []), f"{_mean(recalls):.3f}", f"{_mean(spearmans):.3f}")
    return table


def key_value_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def doctor_tables(diagnosis: Diagnosis) -> Group:
    """Versions, GPUs, attention backends and model families, one table each."""
    versions = key_value_table("versions", {k: v or "not installed" for k, v in diagnosis.versions.items()})
    gpus = Table(title=f"GPUs (CUDA {diagnosis.cuda_version or 'not in this torch build'})")
    for column in ("index", "name", "memory GiB", "capability", "bf16"):
        gpus.add_column(column)
    for gpu in diagnosis.gpus:
        gpus.add_row(str(gpu.index), gpu.name, f"{gpu.memory_gib:.1f}", gpu.capability, "yes" if gpu.bf16 else "no")
    if not diagnosis.gpus:
        gpus.add_row("-", "no CUDA GPU available (CPU only)", "", "", "")
    backends = Table(title="attention backends")
    for column in ("backend", "usable", "why"):
        backends.add_column(column)
    for backend in diagnosis.attention_backends:
        backends.add_row(backend.name, "yes" if backend.usable else "no", backend.reason)
    families = key_value_table("model families", {"supported": ", ".join(diagnosis.families)})
    return Group(versions, gpus, backends, families)
